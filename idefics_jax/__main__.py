"""`python -m idefics_jax --config configs/tiny.py`: build the configured model and run one forward pass
on a random batch (images included), printing shapes, parameter counts and timings."""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app
from flax import nnx
from ml_collections import config_flags

from idefics_jax.config import IdeficsConfig
from idefics_jax.models import Idefics, count_params

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)


def main(argv):
    del argv
    cfg = IdeficsConfig.from_dict(_CONFIG.value.model)
    start = time.perf_counter()
    model = Idefics(cfg, rngs=nnx.Rngs(_CONFIG.value.seed))
    graphdef, state = nnx.split(model)
    print(f"model: {count_params(state):,} parameters, {cfg.num_blocks} blocks of 1 gated cross-attention + "
          f"{cfg.cross_layer_interval} LLaMA layers; init {time.perf_counter() - start:.1f}s")
    rng = np.random.default_rng(0)
    b, t, n, v = 2, 64, 2, cfg.vision
    batch = dict(
        input_ids=rng.integers(0, cfg.total_vocab_size, (b, t)),
        pixel_values=rng.standard_normal((b, n, v.num_channels, v.image_size, v.image_size)).astype(np.float32),
        image_attention_mask=np.ones((b, t, n), np.int32),
    )
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))
    start = time.perf_counter()
    logits = jax.block_until_ready(forward(state, batch))
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(forward(state, batch))
    print(f"forward: logits {logits.shape} {logits.dtype}; compile+run {compiled:.1f}s, "
          f"run {time.perf_counter() - start:.3f}s on {jax.devices()[0].platform}")


if __name__ == "__main__":
    app.run(main)
