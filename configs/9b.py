"""IDEFICS-9B: LLaMA-7B + ViT-H/14, a gated cross-attention block every 4 layers (published config).

    python -m idefics_jax.plan --config configs/9b.py

Layout: FSDP across nodes, tensor parallelism inside an 8-GPU node (fsdp=-1 takes the rest).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config():
    c = common.base(common.published(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, rms_norm_eps=1e-6))
    c.mesh.fsdp, c.mesh.tensor = -1, 8
    common.web_mixture(c)
    c.data.global_batch_size = 1280        # x 1024 tokens = 1.31M tokens per step, as IDEFICS-9B
    c.train.micro_batches = 10
    c.train.steps = 60_000
    c.train.optimizer.update(lr=1e-5, end_lr=6e-6, warmup_steps=2000, decay_steps=60_000)
    c.train.checkpoint_every = 250
    c.train.keep_period = 5000
    return c
