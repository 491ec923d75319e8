"""Flax NNX modules of IDEFICS; `Idefics` is the whole model."""

from idefics_jax.models.idefics import Idefics, count_params

__all__ = ["Idefics", "count_params"]
