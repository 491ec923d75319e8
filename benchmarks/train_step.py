"""Our train step vs transformers' IdeficsForVisionText2Text + torch.optim.AdamW, side by side.

    python benchmarks/train_step.py [--steps 10] [--batch 4] [--seq 256] [--hidden 256] [--layers 8]

Same model config, same batch, same freezing (the published flags: vision tower, LLaMA layers and
base vocabulary frozen), fp32 on this CPU, one process. Each side: AdamW (weight decay 0.1),
global-norm clipping at 1.0, masked next-token cross-entropy (z-loss off: HF has none). Prints
tokens/s of each and their ratio, the forward pass alone (ours jitted vs HF's eager
`torch.no_grad()` in eval mode, same batch), and our achieved FLOP/s (model FLOPs, train/metrics.py) against
the fp32 matmul FLOP/s of XLA and of torch measured in the same process (the speed-up a step made
of matmuls can reach is XLA's matmul rate over HF's achieved rate). Prints only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from flax import nnx
from transformers import IdeficsConfig as HFConfig
from transformers import IdeficsForVisionText2Text

from configs import common
from idefics_jax import hf, run_config, sharding
from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig
from idefics_jax.data.schema import MODEL_INPUTS, check_batch
from idefics_jax.train import state as state_lib
from idefics_jax.train.metrics import model_flops_per_step
from idefics_jax.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(hidden: int = 256, layers: int = 8) -> IdeficsConfig:
    """A small IDEFICS with every part of the real one (published freeze flags, qk norms, resampler);
    LLaMA's MLP ratio (11008 / 4096) and head dim 32 at width `hidden`."""
    return IdeficsConfig(
        vocab_size=4000,
        additional_vocab_size=2,
        hidden_size=hidden,
        intermediate_size=hidden * 43 // 16,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        cross_layer_interval=4,
        qk_layer_norms=True,
        use_resampler=True,
        alpha_type="vector",
        alpha_initializer="normal",
        alphas_initializer_range=0.5,
        freeze_text_layers=True,
        freeze_vision_layers=True,
        freeze_lm_head=True,
        vision=VisionConfig(
            embed_dim=192,
            image_size=64,
            intermediate_size=768,
            patch_size=8,
            num_hidden_layers=4,
            num_attention_heads=6,
        ),
        perceiver=PerceiverConfig(
            resampler_n_latents=32,
            resampler_depth=2,
            resampler_n_heads=6,
            resampler_head_dim=32,
            qk_layer_norms_perceiver=True,
        ),
    )


def batch(cfg: IdeficsConfig, b: int, t: int, n: int) -> dict[str, np.ndarray]:
    """A synthetic batch in the schema's layout (data/schema.py): random tokens, every token a target,
    image i seen from position i·t/n on."""
    rng = np.random.default_rng(0)
    iam = np.zeros((b, t, n), np.int32)
    for i in range(n):  # image i is seen from position i*t/n on, until the next one
        iam[:, i * t // n : (i + 1) * t // n, i] = 1
    return dict(
        input_ids=rng.integers(0, cfg.total_vocab_size, (b, t)).astype(np.int32),
        attention_mask=np.ones((b, t), np.int32),
        position_ids=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        segment_ids=np.ones((b, t), np.int32),
        pixel_values=rng.standard_normal((b, n, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32),
        image_attention_mask=iam,
        loss_mask=np.ones((b, t), np.float32),
        dataset_id=np.zeros((b,), np.int32),
    )


def setup_ours(cfg: IdeficsConfig, data: dict) -> tuple[Callable, Callable, dict, dict, dict]:
    """(jitted train step, jitted forward `(state, batch) -> float32 logits [B, T, V]`, initial state,
    the batch on device, params as HF tensors) for `data`."""
    b, t = data["input_ids"].shape
    c = common.base(cfg)
    c.mesh.fsdp = 1
    c.data.update(global_batch_size=b, seq_len=t, max_num_images=data["pixel_values"].shape[1])
    c.data.update(image_size=cfg.vision.image_size, tokenizer_path="(synthetic batch)")
    c.data.datasets = ml_collections.ConfigDict({"synthetic": dict(kind="documents", paths="(none)", weight=1.0)})
    c.train.z_loss = 0.0
    c.train.optimizer.update(lr=1e-4, end_lr=1e-4, warmup_steps=0, decay_steps=1, weight_decay=0.1, clip_norm=1.0)
    check_batch(data, c.data, b)
    lay = state_lib.layout(run_config.parse(c, files=False), sharding.make_mesh(c.mesh))
    state = state_lib.init(lay, 0)
    weights = {
        name: t
        for e in hf.entries(cfg)
        for name, t in hf.iter_hf(e, np.asarray(dict(_flat(state_lib.full_params(state)))[e.path]))
    }
    step = make_train_step(lay, 0.0, 1, 1)
    forward = jax.jit(lambda s, x: nnx.merge(lay.graphdef, s["params"], s["frozen"])(**{k: x[k] for k in MODEL_INPUTS}))
    return step, forward, state, {k: jnp.asarray(v) for k, v in data.items()}, weights


def step_args(state: dict, x: dict) -> tuple:
    """The train step's arguments for one plain update (no spike threshold, loss scale 1)."""
    return state, x, jnp.float32(np.inf), jnp.float32(1.0)


def time_ours(cfg: IdeficsConfig, data: dict, steps: int) -> tuple[float, float, float, dict]:
    """(seconds per train step, seconds per forward, first loss, params as HF tensors), jitted."""
    step, forward, state, x, weights = setup_ours(cfg, data)
    state, m = step(*step_args(state, x))  # compile
    first = float(m["loss"])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = step(*step_args(state, x))
    jax.block_until_ready(state)
    train = (time.perf_counter() - start) / steps
    jax.block_until_ready(forward(state, x))  # compile
    start = time.perf_counter()
    for _ in range(steps):
        logits = forward(state, x)
    jax.block_until_ready(logits)
    return train, (time.perf_counter() - start) / steps, first, weights


def _flat(params):
    return [(tuple(str(k) for k in p), v.get_value()) for p, v in nnx.to_flat_state(params)]


def time_hf(cfg: IdeficsConfig, data: dict, steps: int, weights: dict) -> tuple[float, float, float]:
    """(seconds per train step, seconds per `torch.no_grad()` eval-mode forward, first loss) of HF's
    model with torch AdamW, from the same weights, eager."""
    model = IdeficsForVisionText2Text(HFConfig(**cfg.to_hf()))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    x = {
        k: torch.from_numpy(data[k]).long() if data[k].dtype == np.int32 else torch.from_numpy(data[k])
        for k in ("input_ids", "attention_mask", "pixel_values", "image_attention_mask")
    }
    mask = torch.from_numpy(data["loss_mask"])[:, 1:]

    def one_step():
        opt.zero_grad(set_to_none=True)
        logits = model(**x, use_cache=False).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x["input_ids"][:, 1:], reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return float(loss)

    first = one_step()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    train = (time.perf_counter() - start) / steps
    model.eval()
    with torch.no_grad():
        model(**x, use_cache=False)
        start = time.perf_counter()
        for _ in range(steps):
            model(**x, use_cache=False)
    return train, (time.perf_counter() - start) / steps, first


def matmul_flops(n: int = 1024, reps: int = 20) -> tuple[float, float]:
    """(XLA, torch) fp32 FLOP/s of a chain of n×n matmuls, in this process: each framework's own
    ceiling for a step made of matmuls."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: (x @ x) * 1e-3)
    jax.block_until_ready(f(a))
    start = time.perf_counter()
    for _ in range(reps):
        a = f(a)
    jax.block_until_ready(a)
    xla = 2 * n**3 * reps / (time.perf_counter() - start)
    t = torch.ones(n, n)
    t = (t @ t) * 1e-3
    start = time.perf_counter()
    for _ in range(reps):
        t = (t @ t) * 1e-3
    return xla, 2 * n**3 * reps / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256, help="LLaMA width (heads of 32)")
    ap.add_argument("--layers", type=int, default=8, help="LLaMA layers (a gated cross-attention every 4)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = model_config(args.hidden, args.layers)
    data = batch(cfg, args.batch, args.seq, args.images)
    tokens = args.batch * args.seq
    ours, ours_fwd, our_loss, weights = time_ours(cfg, data, args.steps)
    theirs, theirs_fwd, hf_loss = time_hf(cfg, data, args.steps, weights)
    flops = model_flops_per_step(cfg, args.batch, args.seq, args.images)
    peak, torch_peak = matmul_flops()
    print(
        f"config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} LLaMA layers (+{cfg.num_blocks} gated "
        f"xattn), ViT {cfg.vision.embed_dim}x{cfg.vision.num_hidden_layers}; batch {args.batch} x {args.seq} "
        f"tokens, {args.images} images/row; fp32, {jax.devices()[0].platform}, {os.cpu_count()} cores"
    )
    print(f"first-step loss: ours {our_loss:.5f}  HF {hf_loss:.5f}  (same weights, same batch)")
    print(f"idefics_jax step: {ours * 1e3:8.1f} ms  {tokens / ours:9.0f} tokens/s")
    print(f"HF + torch AdamW: {theirs * 1e3:8.1f} ms  {tokens / theirs:9.0f} tokens/s")
    print(f"speed-up (ours / HF tokens/s): {theirs / ours:.2f}x")
    print(
        f"forward only: ours {ours_fwd * 1e3:.1f} ms, HF no_grad {theirs_fwd * 1e3:.1f} ms: {theirs_fwd / ours_fwd:.2f}x"
    )
    print(
        f"our achieved {flops / ours / 1e9:.1f} GFLOP/s of model FLOPs = {flops / ours / peak:.0%} of the "
        f"{peak / 1e9:.1f} GFLOP/s fp32 matmul peak measured here (XLA, 1024 x 1024)"
    )
    print(
        f"HF's achieved {flops / theirs / 1e9:.1f} GFLOP/s = {flops / theirs / torch_peak:.0%} of torch's "
        f"{torch_peak / 1e9:.1f} GFLOP/s matmul peak; ours / HF can reach at most "
        f"{peak / (flops / theirs):.2f}x while matmuls dominate"
    )


if __name__ == "__main__":
    main()
