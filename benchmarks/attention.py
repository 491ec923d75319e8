"""Our attention kernels side by side: error against a float32 reference, and time, forward + backward.

    python benchmarks/attention.py [--batch 4] [--seq 512] [--heads 8] [--head-dim 32] [--dtype float32]
    python benchmarks/attention.py --seq 1024 --heads 32 --head-dim 128 --dtype bfloat16   # GPU, 9B layer

For each mask the model makes (`models.layers.Mask`): plain causal self-attention; packed rows
(causal + three segments + left padding on one row, so some queries see no key); and the gated
cross-attention (queries see the 64 latents of the images they follow; one row sees no image).
Each `model.attention` kernel (xla, blockwise, cudnn; cudnn falls back to xla off a GPU, and says
so) runs `attention` and its VJP in `--dtype`; errors are ‖x − ref‖ / ‖ref‖ of the output and of
dq, dk, dv against the xla kernel on float32 copies of the same inputs. Prints only.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.models import layers as L

LATENTS = 64


def masks(b: int, t: int, images: int) -> dict[str, tuple[L.Mask, int]]:
    """{name: (mask, key length)} for rows of `t` tokens."""
    slots = jnp.asarray(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)))  # causality is by slot
    seg = np.ones((b, t), np.int32)
    seg[:, t // 3 : 2 * t // 3], seg[:, 2 * t // 3 :] = 2, 3
    valid = np.ones((b, t), bool)
    valid[-1, : t // 8] = False  # the last row left-padded: its first queries see no key
    q_images = np.zeros((b, t, images), bool)
    for i in range(images):
        q_images[:, (i + 1) * t // (images + 1) :, i] = True
    q_images[0] = False  # a row that sees no image
    j = jnp.asarray
    return {
        "causal": (L.Mask(q_pos=slots, kv_pos=slots), t),
        "packed": (L.Mask(kv_valid=j(valid), q_pos=slots, kv_pos=slots, q_seg=j(seg), kv_seg=j(seg)), t),
        "cross": (L.Mask(q_images=j(q_images), kv_image=j(np.repeat(np.arange(images), LATENTS))), images * LATENTS),
    }


def run(impl: str, q, k, v, w, mask: L.Mask, scale: float):
    """(out, (dq, dk, dv)) of `attention` with cotangent w, jitted: one forward, one backward."""

    def fwd_bwd(q, k, v):
        out, pull = jax.vjp(lambda q, k, v: L.attention(q, k, v, mask, scale, impl), q, k, v)
        return out, pull(w.astype(out.dtype))

    return jax.jit(fwd_bwd)


def rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--kernels", default="xla,blockwise,cudnn")
    ap.add_argument("--masks", default="causal,packed,cross")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    b, t, n, h = args.batch, args.seq, args.heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    print(
        f"attention, forward + backward: batch {b} x {t} queries, {n} heads of {h}, {args.dtype}, "
        f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    )
    print(f"{'mask':8s} {'kernel':10s} {'ms':>9s} {'out err':>9s} {'dq err':>9s} {'dk err':>9s} {'dv err':>9s}")
    rng = np.random.default_rng(0)
    for name, (mask, s) in masks(b, t, args.images).items():
        if name not in args.masks.split(","):
            continue
        q32 = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
        k32, v32 = (jnp.asarray(rng.standard_normal((b, s, n, h)), jnp.float32) for _ in range(2))
        w = jnp.asarray(rng.standard_normal((b, t, n * h)), jnp.float32)
        scale = h**-0.5
        ref_out, ref_grads = run("xla", q32, k32, v32, w, mask, scale)(q32, k32, v32)
        q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
        for impl in args.kernels.split(","):
            fn = run(impl, q, k, v, w, mask, scale)
            try:
                out, grads = jax.block_until_ready(fn(q, k, v))
            except Exception as e:  # one kernel failing (e.g. cuDNN refusing a shape) must not hide the others
                print(f"{name:8s} {impl:10s} FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                continue
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times.append(time.perf_counter() - start)
            errs = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(grads, ref_grads, strict=True)]
            print(
                f"{name:8s} {impl:10s} {np.median(times) * 1e3:9.2f} " + " ".join(f"{e:9.2e}" for e in errs), flush=True
            )


if __name__ == "__main__":
    main()
