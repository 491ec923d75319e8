"""Tiny IDEFICS for this CPU: every feature of the real model at toy size, fp32.

    python -m idefics_jax --config configs/tiny.py

runs one forward pass on a random batch and prints the logits' shape and timing (the trainer,
`python -m idefics_jax.train --config configs/tiny.py`, replaces this once it exists).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig  # noqa: E402


def get_config():
    model = IdeficsConfig(
        vocab_size=512, additional_vocab_size=2, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256,
        cross_layer_interval=2, qk_layer_norms=True, alpha_type="float", alpha_initializer="zeros",
        use_resampler=True, freeze_text_layers=False, freeze_vision_layers=False, freeze_lm_head=False,
        vision=VisionConfig(embed_dim=48, image_size=32, intermediate_size=96, patch_size=8,
                            num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
        perceiver=PerceiverConfig(resampler_n_latents=8, resampler_depth=2, resampler_n_heads=4,
                                  resampler_head_dim=12, qk_layer_norms_perceiver=True),
        dtype="float32", param_dtype="float32", remat="none",
    )
    c = common.base(model)
    c.mesh.fsdp = -1
    return c
