"""python -m idefics_jax.eval: few-shot scores of a checkpoint (docs/evaluation.md).

    python -m idefics_jax.eval (--ckpt DIR [--step N] | --hf DIR) --tokenizer DIR --task NAME[,NAME]
        --data DIR --shots 0,4,8,16,32 [--num-samples N] [--seeds 42,...] [--rices] [--batch-size B]
        [--mesh data=1,fsdp=-1,tensor=1] --output DIR

Writes OUTPUT/predictions-<task>-<shots>shot-seed<s>.json and OUTPUT/results.json (merged with the
results already there), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from idefics_jax.errors import UserError, cli_main, quiet_start


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _mesh(text: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected data=N,fsdp=N,tensor=N, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m idefics_jax.eval", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="one of our checkpoint directories")
    src.add_argument("--hf", help="an HF IDEFICS directory (config.json + safetensors)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    p.add_argument("--task", required=True, help="task name(s), comma-separated: " + "coco, flickr30k, vqav2, …")
    p.add_argument("--data", required=True, help="the task's data directory (docs/evaluation.md gives the tree)")
    p.add_argument("--shots", type=_ints, default=[0, 4, 8, 16, 32])
    p.add_argument("--num-samples", type=int, help="test examples per seed (default: all)")
    p.add_argument("--seeds", type=_ints, default=[42])
    p.add_argument("--query-set-size", type=int, default=2048, help="random demonstrations come from this many")
    p.add_argument("--rices", action="store_true", help="demonstrations by image similarity (RICES)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--mesh", type=_mesh, help="place the model on a mesh, e.g. data=1,fsdp=-1,tensor=1")
    p.add_argument("--dtype", help="compute dtype override (float32, bfloat16)")
    p.add_argument("--output", required=True, help="directory for predictions and results.json")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    return cli_main("python -m idefics_jax.eval", lambda: run(args), args.debug)


def run(args: argparse.Namespace) -> dict:
    quiet_start()
    from idefics_jax import distributed, sharding
    from idefics_jax.data import Processor
    from idefics_jax.eval import evaluate, tasks

    names = [t for t in args.task.split(",") if t]
    for name in names:
        tasks.get(name)  # unknown names fail before the model loads
    if not os.path.isdir(args.tokenizer):
        raise UserError(f"--tokenizer {args.tokenizer}: not a directory")
    distributed.initialize()
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    overrides = {"dtype": args.dtype} if args.dtype else {}
    if args.ckpt:
        import idefics_jax

        if not os.path.isdir(args.ckpt):
            raise UserError(f"--ckpt {args.ckpt}: not a directory")
        model = idefics_jax.load(args.ckpt, args.step, mesh=mesh, **overrides)
        model_id = f"{os.path.realpath(args.ckpt)}@{args.step}"
    else:
        from idefics_jax import from_hf

        if not os.path.isdir(args.hf):
            raise UserError(f"--hf {args.hf}: not a directory")
        model = from_hf(args.hf, mesh=mesh, **overrides)
        model_id = os.path.realpath(args.hf)
    processor = Processor(args.tokenizer, image_size=model.config.vision.image_size)
    results_path = os.path.join(args.output, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    import contextlib

    import jax

    for name in names:
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            results[name] = {
                **results.get(name, {}),
                **evaluate(
                    model,
                    processor,
                    name,
                    args.data,
                    shots=args.shots,
                    seeds=args.seeds,
                    num_samples=args.num_samples,
                    query_set_size=args.query_set_size,
                    rices=args.rices,
                    batch_size=args.batch_size,
                    num_beams=args.num_beams,
                    output_dir=args.output,
                    cache_dir=os.path.join(args.output, "cache"),
                    model_id=model_id,
                ),
            }
    if jax.process_index() == 0:
        os.makedirs(args.output, exist_ok=True)
        with open(results_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(results_path + ".tmp", results_path)
        print(table(results, names))
    return results


def table(results: dict, names: list[str]) -> str:
    """The results of `names` as an aligned text table."""
    lines = [f"{'task':<14} {'shots':>5}  {'metric':<13} {'score':>14}  {'n':>6}  skipped"]
    for name in names:
        for k, r in sorted(results[name].items(), key=lambda kv: int(kv[0])):
            score = f"{r['mean']:.2f} ± {r['std']:.2f}"
            skipped = sum(r["skipped"].values())
            lines.append(f"{name:<14} {k:>5}  {r['metric']:<13} {score:>14}  {r['num_examples']:>6}  {skipped}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
