"""Our train step vs transformers' IdeficsForVisionText2Text + torch.optim.AdamW, side by side.

    python benchmarks/train_step.py [--steps 10] [--batch 4] [--seq 256] [--hidden 256] [--layers 8] [--scan-unroll 1]
    python benchmarks/train_step.py --preset 9b --layers 4 --dtype bfloat16 --attention xla,cudnn  # GPU

Same model config, same batch, same freezing (the published flags: vision tower, LLaMA layers and
base vocabulary frozen), one process. Each side: AdamW (weight decay 0.1), global-norm clipping at
1.0, masked next-token cross-entropy (z-loss off: HF has none). Prints tokens/s of each and their
ratio, the forward pass alone (ours jitted vs HF's eager `torch.no_grad()` in eval mode, same
batch), and our achieved FLOP/s (model FLOPs, train/metrics.py) against the matmul FLOP/s of XLA and
of torch measured in the same process (the speed-up a step made of matmuls can reach is XLA's matmul
rate over HF's achieved rate). Prints only; nothing is asserted.

`--preset small` (default) is a small IDEFICS at `--hidden`, fp32, both sides from the same weights
(first-step losses printed side by side). `--preset 9b` / `80b` are the published widths (LLaMA-7B /
-65B layers, ViT-H/14, the resampler) with `--layers` LLaMA layers and `--vision-layers` ViT layers,
for a GPU: `--dtype bfloat16` is our GPU recipe (bf16 compute, fp32 trainable params, bf16 frozen
params) against HF under `torch.autocast(bfloat16)` with fp32 params (HF Trainer's `bf16=True`) and
fused AdamW; HF then initialises its own weights on the device (copying billions of parameters
through the host would cost more than the run). `--attention` takes a comma list of our kernels,
each timed in turn.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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


def preset_config(preset: str, layers: int, vision_layers: int) -> IdeficsConfig:
    """The published IDEFICS at the 9B or 80B width with `layers` LLaMA layers and `vision_layers`
    ViT-H layers (the resampler whole)."""
    widths = {
        "9b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, rms_norm_eps=1e-6),
        "80b": dict(hidden_size=8192, intermediate_size=22016, num_attention_heads=64, rms_norm_eps=1e-5),
    }
    cfg = common.published(num_hidden_layers=layers, **widths[preset])
    return cfg.replace(vision=dataclasses.replace(cfg.vision, num_hidden_layers=vision_layers))


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


def setup_ours(cfg: IdeficsConfig, data: dict, want_weights: bool) -> tuple[Callable, Callable, dict, dict, dict]:
    """(jitted train step, jitted forward `(state, batch) -> logits [B, T, V]`, initial state, the
    batch on device, params as float32 HF tensors or {} unless `want_weights`) for `data`. Frozen
    params are stored in the compute dtype (the GPU configs' `train.frozen_dtype`)."""
    b, t = data["input_ids"].shape
    c = common.base(cfg)
    c.train.frozen_dtype = cfg.dtype
    c.mesh.fsdp = 1
    c.data.update(global_batch_size=b, seq_len=t, max_num_images=data["pixel_values"].shape[1])
    c.data.update(image_size=cfg.vision.image_size, tokenizer_path="(synthetic batch)")
    c.data.datasets = ml_collections.ConfigDict({"synthetic": dict(kind="documents", paths="(none)", weight=1.0)})
    c.train.z_loss = 0.0
    c.train.optimizer.update(lr=1e-4, end_lr=1e-4, warmup_steps=0, decay_steps=1, weight_decay=0.1, clip_norm=1.0)
    check_batch(data, c.data, b)
    lay = state_lib.layout(run_config.parse(c, files=False), sharding.make_mesh(c.mesh))
    state = state_lib.init(lay, 0)
    weights = {}
    if want_weights:
        flat = dict(_flat(state_lib.full_params(state)))
        weights = {n: t for e in hf.entries(cfg) for n, t in hf.iter_hf(e, np.asarray(flat[e.path], np.float32))}
    step = make_train_step(lay, 0.0, 1, 1)
    forward = jax.jit(lambda s, x: nnx.merge(lay.graphdef, s["params"], s["frozen"])(**{k: x[k] for k in MODEL_INPUTS}))
    return step, forward, state, {k: jnp.asarray(v) for k, v in data.items()}, weights


def step_args(state: dict, x: dict) -> tuple:
    """The train step's arguments for one plain update (no spike threshold, loss scale 1)."""
    return state, x, jnp.float32(np.inf), jnp.float32(1.0)


def time_ours(cfg: IdeficsConfig, data: dict, steps: int, want_weights: bool) -> tuple[float, float, float, dict]:
    """(seconds per train step, seconds per forward, first loss, params as HF tensors or {}), jitted."""
    step, forward, state, x, weights = setup_ours(cfg, data, want_weights)
    start = time.perf_counter()
    state, m = step(*step_args(state, x))  # compile
    first = float(m["loss"])
    print(f"  [{cfg.attention}] compile + first step {time.perf_counter() - start:.1f} s", flush=True)
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


def time_hf(cfg: IdeficsConfig, data: dict, steps: int, weights: dict, device: str) -> tuple[float, float, float]:
    """(seconds per train step, seconds per `torch.no_grad()` eval-mode forward, first loss) of HF's
    model with torch AdamW, eager, on torch `device`: from `weights` (float32 HF tensors) unless
    empty (then HF's own init, on the device). fp32 params; under `torch.autocast` when
    `cfg.dtype` is bfloat16."""
    with torch.device(device):
        model = IdeficsForVisionText2Text(HFConfig(**cfg.to_hf()))
    if weights:
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
        fused=device != "cpu",
    )
    x = {
        k: (torch.from_numpy(data[k]).long() if data[k].dtype == np.int32 else torch.from_numpy(data[k])).to(device)
        for k in ("input_ids", "attention_mask", "pixel_values", "image_attention_mask")
    }
    mask = torch.from_numpy(data["loss_mask"])[:, 1:].to(device)
    autocast = (
        torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
        if cfg.dtype == "bfloat16"
        else contextlib.nullcontext()
    )

    def one_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(**x, use_cache=False).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), x["input_ids"][:, 1:], reduction="none"
            )
            loss = (nll * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return loss.detach()

    first = float(one_step())
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    _sync(device)
    train = (time.perf_counter() - start) / steps
    model.eval()
    with torch.no_grad(), autocast:
        model(**x, use_cache=False)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(**x, use_cache=False)
        _sync(device)
    return train, (time.perf_counter() - start) / steps, first


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def matmul_flops(device: str, dtype: str, n: int, reps: int = 20) -> tuple[float, float]:
    """(XLA, torch) FLOP/s of a chain of n×n matmuls in `dtype`, in this process: each framework's
    own ceiling for a step made of matmuls (torch on `device`). Random operands (constant ones run
    faster on a GPU than real data does), scaled so that the chain neither grows nor vanishes."""
    a = (np.random.default_rng(0).standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    t = torch.from_numpy(a).to(device=device, dtype=getattr(torch, dtype))
    a = jnp.asarray(a, dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    start = time.perf_counter()
    for _ in range(reps):
        a = f(a)
    jax.block_until_ready(a)
    xla = 2 * n**3 * reps / (time.perf_counter() - start)
    t = t @ t
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        t = t @ t
    _sync(device)
    return xla, 2 * n**3 * reps / (time.perf_counter() - start)


def _memory(hf_ran: bool) -> str:
    """Peak device memory of this process so far (JAX, and torch's if HF ran on a GPU), or '' on the CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return ""
    out = f"peak memory: ours {stats['peak_bytes_in_use'] / 2**30:.1f} GiB"
    if hf_ran and torch.cuda.is_available():
        out += f", HF {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--preset", choices=("small", "9b", "80b"), default="small")
    ap.add_argument("--hidden", type=int, default=256, help="LLaMA width of the small preset (heads of 32)")
    ap.add_argument("--layers", type=int, default=8, help="LLaMA layers (a gated cross-attention every 4)")
    ap.add_argument("--vision-layers", type=int, default=2, help="ViT-H layers of the 9b/80b presets")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    ap.add_argument("--attention", default="xla", help="comma list of model.attention kernels to time")
    ap.add_argument("--remat", default=None, help="model.remat (default: the preset's)")
    ap.add_argument("--scan-unroll", type=int, default=1, help="model.scan_unroll (layers per scan iteration)")
    ap.add_argument("--no-hf", action="store_true", help="time ours only")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    small = args.preset == "small"
    cfg = (
        model_config(args.hidden, args.layers) if small else preset_config(args.preset, args.layers, args.vision_layers)
    )
    cfg = cfg.replace(dtype=args.dtype, scan_unroll=args.scan_unroll, **({"remat": args.remat} if args.remat else {}))
    platform = jax.devices()[0].platform
    device = "cuda" if platform == "gpu" else "cpu"
    data = batch(cfg, args.batch, args.seq, args.images)
    tokens = args.batch * args.seq
    flops = model_flops_per_step(cfg, args.batch, args.seq, args.images)
    peak, torch_peak = matmul_flops(device, args.dtype, 1024 if device == "cpu" else 8192)
    print(
        f"config: {args.preset}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} LLaMA layers (+{cfg.num_blocks} "
        f"gated xattn), ViT {cfg.vision.embed_dim}x{cfg.vision.num_hidden_layers}; batch {args.batch} x {args.seq} "
        f"tokens, {args.images} images/row; {args.dtype}, remat {cfg.remat}, scan unroll {cfg.scan_unroll}, "
        f"{platform} "
        f"({jax.devices()[0].device_kind}), {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}",
        flush=True,
    )
    ours = {}
    weights = {}
    for impl in args.attention.split(","):
        try:
            ours[impl] = time_ours(cfg.replace(attention=impl), data, args.steps, want_weights=small and not weights)
        except Exception as e:  # one kernel failing (e.g. cuDNN refusing a shape) must not hide the others
            print(f"idefics_jax step [{impl}]: FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        weights = weights or ours[impl][3]
        step_s, fwd_s, loss = ours[impl][:3]
        print(
            f"idefics_jax step [{impl}]: {step_s * 1e3:8.1f} ms  {tokens / step_s:9.0f} tokens/s  "
            f"{flops / step_s / 1e12:.3g} TFLOP/s = {flops / step_s / peak:.0%} of XLA's matmul rate; "
            f"forward {fwd_s * 1e3:.1f} ms; first-step loss {loss:.5f}",
            flush=True,
        )
    if not args.no_hf:
        theirs, theirs_fwd, hf_loss = time_hf(cfg, data, args.steps, weights, device)
        print(
            f"HF + torch AdamW: {theirs * 1e3:8.1f} ms  {tokens / theirs:9.0f} tokens/s  forward "
            f"{theirs_fwd * 1e3:.1f} ms; first-step loss {hf_loss:.5f} "
            + ("(same weights, same batch)" if weights else "(HF's own init)")
        )
        for impl, (step_s, fwd_s, _, _) in ours.items():
            print(
                f"speed-up [{impl}] (ours / HF tokens/s): train {theirs / step_s:.2f}x, forward only "
                f"(HF no_grad) {theirs_fwd / fwd_s:.2f}x"
            )
        print(
            f"HF's achieved {flops / theirs / 1e12:.3g} TFLOP/s = {flops / theirs / torch_peak:.0%} of torch's "
            f"{torch_peak / 1e12:.3g} TFLOP/s matmul rate; ours / HF can reach at most "
            f"{peak / (flops / theirs):.2f}x while matmuls dominate"
        )
    print(
        f"matmul rate measured here: XLA {peak / 1e12:.3g} TFLOP/s, torch {torch_peak / 1e12:.3g} TFLOP/s ({args.dtype})"
    )
    print(_memory(not args.no_hf))


if __name__ == "__main__":
    main()
