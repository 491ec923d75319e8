"""Flax NNX modules of IDEFICS; `Idefics` is the whole model, `abstract_model` / `abstract_state` its
shapes and dtypes without allocating anything."""

from idefics_jax.models.idefics import Idefics, abstract_model, abstract_state, count_params

__all__ = ["Idefics", "abstract_model", "abstract_state", "count_params"]
