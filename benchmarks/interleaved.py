"""Our train step under several `model.scan_unroll` values, their steps interleaved in one process.

    python benchmarks/interleaved.py [--hidden 512] [--seq 512] [--attention blockwise] [--scan-unroll 1,8] [--steps 6]

Separate runs of benchmarks/train_step.py on a shared 2-core host differ by up to ~20% for one
and the same program, more than the effects measured here. So every variant is compiled first
(the same model, weights and batch as train_step.py's small preset), and then their steps run in
turns, A B A B …, so that the host's drift falls on all of them alike. Prints each variant's
median and every step time, its first-step loss (equal across variants: unrolling does not change
the function) and in how many turns each variant beat the first one. Prints only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import train_step as bench


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--attention", default="blockwise", help="model.attention kernel")
    ap.add_argument("--scan-unroll", default="1,8", help="comma list of model.scan_unroll values")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    args = ap.parse_args()
    cfg = bench.model_config(args.hidden, args.layers).replace(attention=args.attention)
    data = bench.batch(cfg, args.batch, args.seq, args.images)
    variants = {}
    for unroll in (int(u) for u in args.scan_unroll.split(",")):
        step, _, state, x, _ = bench.setup_ours(cfg.replace(scan_unroll=unroll), data, want_weights=False)
        state, m = step(*bench.step_args(state, x))  # compile
        variants[unroll] = dict(step=step, state=state, x=x, loss=float(m["loss"]), times=[])
    for _ in range(args.steps):
        for v in variants.values():
            start = time.perf_counter()
            v["state"], _ = v["step"](*bench.step_args(v["state"], v["x"]))
            jax.block_until_ready(v["state"])
            v["times"].append(time.perf_counter() - start)
    print(
        f"hidden {args.hidden}, batch {args.batch} x {args.seq}, attention {args.attention}, {args.steps} "
        f"interleaved steps per variant"
    )
    first = next(iter(variants.values()))["times"]
    for unroll, v in variants.items():
        wins = sum(t < f for t, f in zip(v["times"], first, strict=True))
        print(
            f"scan_unroll {unroll}: median {statistics.median(v['times']) * 1e3:.0f} ms, faster than the first "
            f"variant in {wins} of {args.steps} turns, first-step loss {v['loss']:.5f}; steps "
            + ", ".join(f"{t * 1e3:.0f}" for t in v["times"])
        )


if __name__ == "__main__":
    main()
