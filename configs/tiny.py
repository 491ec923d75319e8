"""Tiny IDEFICS for this CPU: every feature of the real model at toy size, fp32, trained on the
bundled tiny dataset (generated on first use, a few seconds).

    python -m idefics_jax.train --config configs/tiny.py

trains 300 steps in about a minute on 2 CPU cores (workdir ./workdir/tiny unless
--workdir is given): the loss falls from ~6.3 (uniform over 514 tokens) to well under 2, with a
held-out evaluation every 100 steps and a checkpoint every 100 steps.
"""

from configs import common
from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig
from idefics_jax.data import tiny


def get_config():
    model = IdeficsConfig(
        vocab_size=512,
        additional_vocab_size=2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        cross_layer_interval=2,
        qk_layer_norms=True,
        alpha_type="float",
        alpha_initializer="zeros",
        use_resampler=True,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        freeze_lm_head=False,
        vision=VisionConfig(
            embed_dim=48,
            image_size=32,
            intermediate_size=96,
            patch_size=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu",
        ),
        perceiver=PerceiverConfig(
            resampler_n_latents=8,
            resampler_depth=2,
            resampler_n_heads=4,
            resampler_head_dim=12,
            qk_layer_norms_perceiver=True,
        ),
        dtype="float32",
        param_dtype="float32",
        remat="none",
    )
    c = common.base(model)
    c.mesh.fsdp = -1
    c.data = tiny.config()
    c.data.image_size = model.vision.image_size
    c.eval_data = tiny.config(split="heldout")
    c.eval_data.image_size = model.vision.image_size
    c.train.steps = 300
    c.train.optimizer.update(lr=3e-3, end_lr=3e-4, warmup_steps=20, decay_steps=300, weight_decay=0.0)
    c.train.checkpoint_every = 100
    c.train.eval_every = 100
    c.train.log_every = 20
    c.train.guards.spike_window = 20
    c.train.peak_flops_per_device = 1e11  # rough fp32 peak of a 2-core CPU, for the MFU column
    c.workdir = "workdir/tiny"
    return c
