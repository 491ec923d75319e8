"""Shared defaults for every config file (model architecture aside).

A config is a Python file with `get_config()` returning an `ml_collections.ConfigDict` with sections:
`model` (the fields of `idefics_jax.config.IdeficsConfig`, nested `vision` / `perceiver`),
`mesh` ({data, fsdp, tensor}; one -1 takes the remaining devices) and `sharding_rules` (None = the
default table in `idefics_jax.sharding`).
"""

from __future__ import annotations

import ml_collections

from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig


def model_section(config: IdeficsConfig) -> ml_collections.ConfigDict:
    """An `IdeficsConfig` as a ConfigDict (so `--config.model.x=v` overrides work)."""
    return ml_collections.ConfigDict(config.to_dict())


def published(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
              rms_norm_eps: float) -> IdeficsConfig:
    """The published IDEFICS architecture around a LLaMA of the given size (HuggingFaceM4/idefics-*).

    LLaMA vocab 32000 + 2 additional tokens (<fake_token_around_image>, <image>), a gated
    cross-attention block before every 4th LLaMA layer, qk layer norms in both the cross-attention
    and the perceiver, float gates initialised at zero, a 6-layer perceiver resampler to 64 latents,
    the ViT-H/14 vision tower; vision and LLaMA frozen (only the new parts train), bf16 compute.
    """
    return IdeficsConfig(
        vocab_size=32000, additional_vocab_size=2, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, rms_norm_eps=rms_norm_eps, hidden_act="silu",
        max_position_embeddings=2048, cross_layer_interval=4, qk_layer_norms=True,
        alpha_type="float", alpha_initializer="zeros", alphas_initializer_range=0.0,
        use_resampler=True, tie_word_embeddings=False,
        freeze_text_layers=True, freeze_vision_layers=True, freeze_lm_head=True,
        vision=VisionConfig(embed_dim=1280, image_size=224, intermediate_size=5120, patch_size=14,
                            num_hidden_layers=32, num_attention_heads=16, hidden_act="gelu",
                            layer_norm_eps=1e-5),
        perceiver=PerceiverConfig(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                                  resampler_head_dim=96, qk_layer_norms_perceiver=True),
        dtype="bfloat16", param_dtype="float32", remat="full",
    )


def base(model: IdeficsConfig) -> ml_collections.ConfigDict:
    """The config skeleton around `model`."""
    c = ml_collections.ConfigDict()
    c.model = model_section(model)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding_rules = ml_collections.FieldReference(None, field_type=list)
    c.seed = 0
    return c
