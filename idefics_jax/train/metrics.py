"""Metrics: TensorBoard event files + a JSONL log in the workdir, a progress line on the console
(process 0 only), and the model-FLOPs count behind MFU."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax

from idefics_jax.config import IdeficsConfig


class Writer:
    """Writes scalars to `WORKDIR/tensorboard` and `WORKDIR/metrics.jsonl` (only on process 0)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)  # noqa: SIM115 (closed by close())

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One record: {"step": step, **scalars} (numbers; nested dicts are flattened with '/')."""
        if not self.active:
            return
        flat = _flatten(scalars)
        self.jsonl.write(json.dumps({"step": step, **flat}) + "\n")
        for k, v in flat.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def log_step(self, step: int, steps: int, record: Mapping[str, Any], counters=None) -> None:
        """Writes one step's record; with `counters` (a callable giving the data pipeline's
        per-dataset counters, passed on logging steps) also adds them and prints the progress line."""
        if counters is not None:
            record = {**record, "data": counters()}
            g = record["guards"]
            self.console(
                f"step {step}/{steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | "
                f"{record['images_per_s']:.0f} img/s | mfu {100 * record['mfu']:.1f}% | "
                f"skipped {g['nonfinite_steps'] + g['spike_steps']}"
            )
        self.write(step, record)

    def log_eval(self, step: int, result: Mapping[str, float], batches: int) -> None:
        """Writes a held-out evaluation under `eval/` and prints it."""
        self.write(step, {"eval": result})
        self.console(f"eval at step {step} | held-out loss {result['loss']:.4f} over {batches} batches")

    def log_fewshot(self, step: int, task: str, result: Mapping[str, Mapping[str, Any]]) -> None:
        """Writes few-shot scores (`idefics_jax.eval.evaluate`'s result) as eval/<task>/<k>shot and prints them."""
        self.write(step, {"eval": {task: {f"{k}shot": r["mean"] for k, r in result.items()}}})
        scores = ", ".join(f"{k}-shot {r['mean']:.2f}" for k, r in result.items())
        metric = next(iter(result.values()))["metric"]
        self.console(f"eval at step {step} | {task} {metric}: {scores}")

    def console(self, line: str) -> None:
        if self.active:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.active:
            self.tb.close()
            self.jsonl.close()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def model_flops_per_step(cfg: IdeficsConfig, batch: int, seq_len: int, num_images: int) -> float:
    """Model FLOPs of one training step (no remat recomputation), counting what training needs:

    forward everywhere; backward for activation gradients (1× forward) wherever a trainable
    parameter sits at or before that point; weight gradients (1× forward) only for trainable
    matmuls. With the published freeze flags that is: ViT forward only; perceiver and gated
    cross-attention 3×; frozen LLaMA layers and LM head 2× (activation gradients flow through them
    back to the cross-attention layers, their weights need none). Attention scores count the full
    T×S product (causal masking not halved). Multiply-add = 2 FLOPs.
    """
    d, f, t = cfg.hidden_size, cfg.intermediate_size, seq_len
    v, p = cfg.vision, cfg.perceiver
    img_tokens = v.num_patches + 1
    s = cfg.image_seq_len * num_images  # image tokens the cross-attention reads per row

    vit = (
        img_tokens
        * v.num_hidden_layers
        * (2 * (4 * v.embed_dim**2 + 2 * v.embed_dim * v.intermediate_size) + 4 * img_tokens * v.embed_dim)
    )
    vit += 2 * v.num_patches * v.num_channels * v.patch_size**2 * v.embed_dim
    perceiver = 0
    if cfg.use_resampler:
        inner, lat = p.resampler_n_heads * p.resampler_head_dim, p.resampler_n_latents
        kv = img_tokens + lat
        perceiver = p.resampler_depth * (
            2 * lat * v.embed_dim * inner * 2
            + 2 * kv * v.embed_dim * inner * 2
            + 4 * lat * kv * inner
            + 2 * lat * 2 * v.embed_dim * 4 * v.embed_dim
        )
    llama_layer = t * (2 * (4 * d * d + 3 * d * f) + 4 * t * d)
    xattn_layer = t * (2 * (2 * d * d + 3 * d * f) + 4 * s * d) + 2 * 2 * s * v.embed_dim * d
    head = 2 * t * d * cfg.total_vocab_size

    def factor(trainable: bool, grads_flow: bool) -> int:
        return 1 + int(grads_flow) + int(trainable)

    vision_trains = not cfg.freeze_vision_layers
    per_row = (
        num_images * vit * factor(vision_trains, vision_trains)
        + num_images * perceiver * factor(True, True)
        + cfg.num_blocks * xattn_layer * factor(True, True)
        + cfg.num_hidden_layers * llama_layer * factor(not cfg.freeze_text_layers, True)
        + head * factor(not cfg.freeze_lm_head, True)
    )
    return float(per_row * batch)
