"""Parameter counts of the 9b / 80b configs equal transformers' for the same config, and the bytes
their checkpoints write (nothing allocated)."""

import numpy as np
import pytest
import torch
from conftest import load_config
from flax import nnx
from transformers import IdeficsConfig as HFConfig
from transformers import IdeficsForVisionText2Text

from idefics_jax.config import IdeficsConfig
from idefics_jax.models import abstract_model, count_params
from idefics_jax.models.freeze import trainable_mask

# Also stated in README.md ("Model sizes").
EXPECTED = {"9b": (8_929_679_632, 1_560_497_936), "80b": (79_967_843_624, 14_051_416_872)}


def ours(config: IdeficsConfig) -> tuple[int, int]:
    model = abstract_model(config)
    params = nnx.state(model, nnx.Param)
    mask = dict(nnx.to_flat_state(trainable_mask(model)))
    trainable = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(params) if mask[p].get_value())
    return count_params(params), trainable


def hf(config: IdeficsConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = IdeficsForVisionText2Text(HFConfig(**config.to_hf()))
    params = list(model.parameters())  # tied weights appear once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@pytest.mark.parametrize("name", ["9b", "80b"])
def test_param_counts_equal_transformers(name):
    config = IdeficsConfig.from_dict(load_config(name).model)
    assert ours(config) == hf(config) == EXPECTED[name]


def test_trainable_part_follows_freeze_flags():
    config = IdeficsConfig.from_dict(load_config("9b").model)
    total, frozen_default = ours(config)
    variants = [
        config.replace(freeze_vision_module_exceptions=("LayerNorm", "Embedding")),
        config.replace(freeze_text_module_exceptions=("Linear",), freeze_lm_head=False),
        config.replace(freeze_text_layers=False, freeze_vision_layers=False, freeze_lm_head=False),
    ]
    for variant in variants:
        got = ours(variant)
        assert got == hf(variant)
        assert got[1] > frozen_default
    assert ours(variants[-1])[1] == total


# Bytes of array data per checkpoint (train/checkpointer.py saved_bytes) as the config trains:
# (every step: fp32 trainable params + AdamW's two fp32 moments + counters, the frozen store written
# once: the frozen params in train.frozen_dtype). Before the store, every step held both.
# Also stated in README.md (80b) and docs/training.md ("Checkpoint size").
CHECKPOINT_BYTES = {"9b": (18_725_975_248, 14_738_363_392), "80b": (168_617_002_480, 131_832_853_504)}


@pytest.mark.parametrize("name", ["9b", "80b"])
def test_checkpoint_bytes_per_step_and_frozen_store(name):
    from idefics_jax import run_config, sharding
    from idefics_jax.train import state as state_lib
    from idefics_jax.train.checkpointer import saved_bytes

    # Global array sizes do not depend on the mesh: lay the state out on this one device.
    config = load_config(name, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1")
    lay = state_lib.layout(run_config.parse(config, files=False), sharding.make_mesh(config.mesh))
    got = saved_bytes(lay.abstract)
    step, frozen = CHECKPOINT_BYTES[name]
    print(
        f"{name}: {step / 1e9:.1f} GB per step + {frozen / 1e9:.1f} GB once (before: {(step + frozen) / 1e9:.1f} GB per step)"
    )
    assert (got["step"], got["frozen"]) == CHECKPOINT_BYTES[name]
    trainable, total = ours(IdeficsConfig.from_dict(config.model))[::-1]
    assert got["frozen"] == 2 * (total - trainable)  # bf16 frozen weights
    assert 0 <= got["step"] - 3 * 4 * trainable < 100  # fp32 params, mu and nu; the rest: int32 counters
