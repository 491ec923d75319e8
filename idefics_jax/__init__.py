"""idefics_jax: IDEFICS (the open Flamingo reproduction) in JAX / Flax NNX.

Public entry points:
- `from_hf(path)`: the model loaded from an HF IDEFICS directory (config.json + safetensors).
- `load(ckpt_dir, step=None)`: the model restored from one of our Orbax checkpoints.
- `generate(model, input_ids, ...)`: tokens as transformers' `generate` (idefics_jax.generation).
- `Idefics`, `IdeficsConfig`: the module and its config.

JAX, Flax and Orbax are imported on first use of these, so that light users of the package (the
data pipeline's worker processes, config files) do not pay for them.
"""

from __future__ import annotations

import os
from typing import Any

from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig


def from_hf(path: str | os.PathLike, *, mesh: Any = None, rules: Any = None, **config_overrides):
    """The model (`Idefics`) loaded from an HF IDEFICS directory.

    `path` holds config.json and model.safetensors (or sharded safetensors with
    model.safetensors.index.json, or pytorch_model*.bin). `config_overrides` set our own config fields
    (e.g. dtype='bfloat16', param_dtype, remat). With `mesh`, parameters are placed sharded by the
    logical-axis `rules` (default: the active table, `sharding.DEFAULT_RULES` unless changed) as
    they are read.
    """
    from flax import nnx

    from idefics_jax import hf

    config = IdeficsConfig.from_hf(path, **config_overrides)
    graphdef, state = hf.load_state(config, hf.HFReader(path), mesh=mesh, rules=rules)
    return nnx.merge(graphdef, state)


def __getattr__(name: str):
    if name == "load":
        from idefics_jax.ckpt_format import load

        return load
    if name == "generate":
        from idefics_jax.generation import generate

        return generate
    if name == "Idefics":
        from idefics_jax.models import Idefics

        return Idefics
    raise AttributeError(f"module 'idefics_jax' has no attribute {name!r}")


__all__ = ["Idefics", "IdeficsConfig", "PerceiverConfig", "VisionConfig", "from_hf", "generate", "load"]
