"""Parameter counts of the 9b / 80b configs equal transformers' for the same config (nothing allocated)."""

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
