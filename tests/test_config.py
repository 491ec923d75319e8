"""IdeficsConfig: HF round trip and clear errors for invalid configs."""

import re

import pytest
from conftest import load_config
from hf_models import hf_config
from transformers import IdeficsConfig as HFConfig

from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig


def test_hf_round_trip():
    hf = hf_config(alpha_type="vector", interval=4, layers=8, tie=True, freeze_text_module_exceptions=["Linear"])
    ours = IdeficsConfig.from_hf(hf)
    assert ours.alpha_type == "vector" and ours.cross_layer_interval == 4 and ours.tie_word_embeddings
    assert ours.vision.embed_dim == 24 and ours.perceiver.resampler_n_latents == 3 and ours.use_resampler
    assert ours.freeze_text_module_exceptions == ("Linear",)
    back = HFConfig(**ours.to_hf())
    for key, value in hf.to_dict().items():
        if key in ("vision_config", "perceiver_config"):
            for k, v in value.items():
                if k not in ("transformers_version", "architectures", "dtype", "_name_or_path"):
                    assert getattr(getattr(back, key), k) == v, (key, k)
        elif key not in ("transformers_version", "architectures", "dtype", "_name_or_path"):
            assert getattr(back, key) == value, key
    assert IdeficsConfig.from_hf(back) == ours


def test_from_config_json(tmp_path):
    hf = hf_config()
    hf.save_pretrained(tmp_path)
    assert IdeficsConfig.from_hf(tmp_path, remat="full").remat == "full"
    assert IdeficsConfig.from_hf(tmp_path / "config.json") == IdeficsConfig.from_hf(hf)


def test_dict_round_trip_through_config_files():
    for name in ("tiny", "9b", "80b"):
        model = load_config(name).model
        cfg = IdeficsConfig.from_dict(model)
        assert IdeficsConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: IdeficsConfig(num_hidden_layers=6, cross_layer_interval=4), "num_hidden_layers=6"),
        (lambda: IdeficsConfig(hidden_size=30, num_attention_heads=4), "num_attention_heads=4"),
        (lambda: IdeficsConfig(hidden_act="tanh"), "hidden_act='tanh'"),
        (lambda: IdeficsConfig(alpha_type="matrix"), "alpha_type='matrix'"),
        (lambda: IdeficsConfig(alpha_initializer="xavier"), "alpha_initializer='xavier'"),
        (lambda: VisionConfig(embed_dim=30, num_attention_heads=4), "vision_config.num_attention_heads=4"),
        (lambda: VisionConfig(hidden_act="swiglu"), "vision_config.hidden_act='swiglu'"),
        (lambda: VisionConfig(image_size=100, patch_size=14), "vision_config.patch_size=14"),
        (lambda: PerceiverConfig(resampler_depth=0), "perceiver_config.resampler_depth=0"),
        (lambda: IdeficsConfig(freeze_text_module_exceptions=("Conv2d",)), "freeze_text_module_exceptions=('Conv2d',)"),
        (lambda: IdeficsConfig(remat="sometimes"), "remat='sometimes'"),
        (lambda: IdeficsConfig(dtype="int8"), "dtype='int8'"),
        (lambda: IdeficsConfig(scan_unroll=0), "scan_unroll=0"),
        (lambda: IdeficsConfig(scan_unroll=True), "scan_unroll=True"),
        (lambda: IdeficsConfig.from_hf({"model_type": "llama"}), "model_type='llama'"),
        (
            lambda: IdeficsConfig.from_hf({"model_type": "idefics", "num_hidden_layers": 5, "cross_layer_interval": 2}),
            "num_hidden_layers=5",
        ),
    ],
)
def test_invalid_config_names_field_and_value(make, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        make()


def test_layer_tables_cover_exactly_the_names_the_config_accepts():
    # config.py validates activation and remat names without importing JAX; models/layers.py maps them.
    from idefics_jax import config
    from idefics_jax.models import layers

    assert set(layers.ACT_FNS) == set(config.ACTIVATIONS)
    assert set(layers.REMAT_POLICIES) | {"none"} == set(config.REMAT_POLICIES)
