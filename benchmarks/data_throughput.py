"""Input pipeline throughput on realistic images, beside what one A100 needs at the 80B step.

    python benchmarks/data_throughput.py [--workers 2] [--steps 6]

Writes a temporary dataset of 500×375 JPEGs (photo-like: noise plus shapes, ~40 KB each) as
OBELICS-layout documents (3 images, ~250 words) and pairs, mixes them 75/25 as the 80B mixture
roughly does, and measures packed rows at seq_len 1024, 5 images of 224² per row:
  1. built in this process, one thread (what one worker process does without thread overlap);
  2. through Grain with --workers processes.
Prints rows, images and tokens per second, per worker. Measured, printed, never asserted.

The rate one A100 needs: IDEFICS-80B costs at most 6·N FLOPs per token (N = 80e9; the frozen
LLaMA and CLIP need no weight gradients, so the true cost is lower and the need below is an upper
bound); at 312 TFLOP/s bf16 and 50% MFU a GPU consumes 312e12·0.5 / (6·80e9) tokens/s, i.e. that
divided by seq_len rows/s, each with at most max_num_images images.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import ml_collections
from PIL import Image, ImageDraw

from idefics_jax.data import pipeline, tiny

A100_BF16_FLOPS = 312e12
MFU = 0.5
PARAMS_80B = 80e9


def photo(rng: random.Random) -> bytes:
    """A 500×375 JPEG with photo-like entropy (noise + shapes), as OBELICS/LAION images."""
    base = Image.effect_noise((500, 375), 40).convert("RGB")
    d = ImageDraw.Draw(base)
    for _ in range(6):
        x, y = rng.randint(0, 450), rng.randint(0, 330)
        d.ellipse(
            (x, y, x + rng.randint(20, 120), y + rng.randint(20, 120)),
            fill=tuple(rng.randint(0, 255) for _ in range(3)),
        )
    return tiny.jpeg(base)


def write_dataset(root: str, n: int) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    images = [photo(rng) for _ in range(24)]  # reused: decode cost is what is measured
    words = " ".join(tiny._FILLER).split()
    docs_t, docs_i = [], []
    for _ in range(n):
        texts, imgs = [], []
        for _ in range(3):
            texts += [" ".join(rng.choices(words, k=80)), None]
            imgs += [None, rng.choice(images)]
        docs_t.append(texts)
        docs_i.append(imgs)
    pq.write_table(
        pa.table({"texts": docs_t, "images": pa.array(docs_i, pa.list_(pa.binary()))}),
        f"{root}/docs.parquet",
        row_group_size=16,
    )
    pq.write_table(
        pa.table({"image": pa.array([rng.choice(images) for _ in range(n)], pa.binary()), "text": [" ".join(rng.choices(words, k=12)) for _ in range(n)]}),
        f"{root}/pairs.parquet",
        row_group_size=16,
    )  # fmt: skip
    return {"docs": f"{root}/docs.parquet", "pairs": f"{root}/pairs.parquet"}


def rates(batches, seconds):
    rows = sum(len(b["dataset_id"]) for b in batches)
    images = sum(int(b["image_attention_mask"].any(1).sum()) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return rows / seconds, images / seconds, tokens / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows per step)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_dataset(tmp, 128)
        cfg = tiny.config(os.path.join(tmp, "tiny"))
        cfg.datasets = ml_collections.ConfigDict(
            {
                "obelics": {"kind": "documents", "paths": paths["docs"], "weight": 0.75},
                "laion": {"kind": "pairs", "paths": paths["pairs"], "weight": 0.25},
            }
        )
        cfg.seq_len, cfg.max_num_images, cfg.image_size, cfg.global_batch_size = 1024, 5, 224, args.batch
        cfg.min_image_side = 10

        p = pipeline(cfg)
        p.batch(0)  # warm up: tokenizer, shard footers
        t = time.perf_counter()
        batches = [p.batch(s) for s in range(1, args.steps + 1)]
        one = rates(batches, time.perf_counter() - t)

        cfg.worker_count, cfg.read_threads = args.workers, 1
        w = pipeline(cfg)
        next(w)  # worker start-up is not throughput
        t = time.perf_counter()
        batches = [next(w) for _ in range(args.steps * args.workers)]
        many = rates(batches, time.perf_counter() - t)
        w.close()

    need_tokens = A100_BF16_FLOPS * MFU / (6 * PARAMS_80B)
    need_rows = need_tokens / cfg.seq_len
    print(
        f"cores: {os.cpu_count()}; rows of {cfg.seq_len} tokens, ≤{cfg.max_num_images} images of {cfg.image_size}² from 500×375 JPEGs"
    )
    print(f"{'':34s}{'rows/s':>10s}{'images/s':>10s}{'tokens/s':>11s}")
    print(f"{'in-process, 1 thread':34s}{one[0]:10.1f}{one[1]:10.1f}{one[2]:11.0f}")
    print(
        f"{f'Grain, {args.workers} workers, per worker':34s}{many[0] / args.workers:10.1f}{many[1] / args.workers:10.1f}{many[2] / args.workers:11.0f}"
    )
    print(
        f"{'one A100 at the 80B step needs':34s}{need_rows:10.2f}{need_rows * cfg.max_num_images:10.2f}{need_tokens:11.0f}"
        f"   (upper bound: 6·80e9 FLOPs/token, {MFU:.0%} MFU of 312 TFLOP/s, {cfg.max_num_images} images/row)"
    )
    print(f"=> one worker feeds ≈{one[1] / (need_rows * cfg.max_num_images):.0f} A100s at the 80B step")


if __name__ == "__main__":
    main()
