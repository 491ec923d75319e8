"""Where the train step's time goes: XLA's per-op timing of benchmarks/train_step.py's step, by category.

    python benchmarks/profile_step.py [--hidden 512] [--seq 512] [--steps 3] [--attention xla] [--scan-unroll 1] [--top 15]

Compiles the same step as benchmarks/train_step.py (same model, batch and optimizer), runs `--steps`
steps under `jax.profiler.trace`, and charges every executed XLA op (CPU thunk) to one category:

  attention    ops traced from `models/layers.py` attention code (scores, softmax, weighted sum, and
               their backward), whatever their kind
  loss/logits  ops traced from the LM head and the loss (`_logits`, `loss_sums`)
  matmul       other ops that contain a dot or convolution (projections, MLPs, patch embedding)
  transpose/copy  ops that only move data (transpose, copy, concatenate, pad, slice, gather…)
  scan bookkeeping  dynamic-slice / dynamic-update-slice of the scans' stacked inputs and outputs,
               and the while loops' own time outside their bodies
  elementwise  everything else (norms, activations, rotary, optimizer update, reductions)

Time is each op's exclusive duration (a while loop's body ops are charged to themselves), summed
over the CPU threads that ran them, so the total can exceed the wall time when ops overlap. Prints
the table per step and the `--top` most expensive ops. Prints only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as bench

# Ops that only move or reindex data.
MOVES = {
    "transpose",
    "copy",
    "concatenate",
    "pad",
    "slice",
    "reshape",
    "bitcast",
    "broadcast",
    "gather",
    "reverse",
    "tuple",
    "get-tuple-element",
    "parameter",
    "constant",
    "iota",
    "copy-start",
    "copy-done",
}
# models/layers.py's attention code: the entry point, both kernels and their custom VJPs.
ATTENTION_FNS = {
    "attention",
    "allowed",
    "_scores",
    "_finite",
    "_dense",
    "_dense_probs",
    "_dense_fwd",
    "_dense_bwd",
    "_row_dot",
    "_block_grads",
    "_tile_len",
    "_pad",
    "_split",
    "_join",
    "_tiled",
    "_tile_mask",
    "_tile_scores",
    "per_query_tile",
    "per_key_tile",
    "attend_tile",
    "grad_tile",
    "_blockwise",
    "_flash_fwd_pass",
    "_flash_fwd",
    "_flash_bwd",
}
SCAN_OPS = {"dynamic-slice", "dynamic-update-slice", "while", "conditional", "call"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([a-z][\w\-]*)\((.*)$")


def parse_hlo(text: str) -> tuple[dict, dict, dict]:
    """Optimised HLO text → (instruction name → (opcode, called computations, stack frame id, shape),
    computation name → [instruction names], frame id → innermost function name)."""
    instrs, comps, current = {}, collections.defaultdict(list), None
    functions, locations, frames = {}, {}, {}
    section = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section and line.strip() and not line.startswith(("%", "ENTRY")) and " = " not in line:
            parts = line.split(" ", 1)
            if section == "FunctionNames":
                functions[parts[0]] = parts[1].strip('"')
            elif section == "FileLocations":
                fn = re.search(r"function_name_id=(\d+)", parts[1])
                fl = re.search(r"file_name_id=(\d+)", parts[1])
                locations[parts[0]] = (fn.group(1), fl.group(1))
            elif section == "StackFrames":
                frames[parts[0]] = re.search(r"file_location_id=(\d+)", parts[1]).group(1)
            continue
        section = None
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+) \(", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
            continue
        m = _INSTR.match(line)
        if m and current:
            name, shape, opcode, rest = m.groups()
            called = re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)", rest)
            frame = re.search(r"stack_frame_id=(\d+)", rest)
            instrs[name] = (opcode, called, frame.group(1) if frame else None, shape.split("{")[0])
            comps[current].append(name)
    frame_fn = {f: functions.get(locations.get(loc, (None,))[0], "") for f, loc in frames.items()}
    return instrs, comps, frame_fn


def functions(name: str, instrs: dict, comps: dict, frame_fn: dict) -> set[str]:
    """The Python functions that the op `name` (and, for a fusion, what it fuses) was traced from."""
    opcode, called, frame, _ = instrs.get(name, ("?", [], None, ""))
    inner = [instrs[i] for c in called for i in comps.get(c, [])] if opcode == "fusion" else []
    return {frame_fn.get(f, "") for f in [frame] + [x[2] for x in inner] if f}


def categorise(name: str, instrs: dict, comps: dict, frame_fn: dict) -> str:
    """The category (see the module docstring) of the executed op `name`."""
    opcode, called, _, _ = instrs.get(name, ("?", [], None, ""))
    inner = [instrs[i] for c in called for i in comps.get(c, [])] if opcode == "fusion" else []
    fns = functions(name, instrs, comps, frame_fn)
    ops = {x[0] for x in inner} or {opcode}
    if fns & ATTENTION_FNS:
        return "attention"
    if fns & {"_logits", "loss_sums", "_nll", "logits"}:
        return "loss/logits"
    if ops & {"dot", "convolution"} or name.startswith("ynn_") or opcode == "custom-call":
        return "matmul"
    if opcode in SCAN_OPS or (ops & {"dynamic-slice", "dynamic-update-slice"} and ops <= MOVES | SCAN_OPS):
        return "scan bookkeeping"
    if ops <= MOVES:
        return "transpose/copy"
    return "elementwise"


def exclusive(events: list[dict]) -> list[tuple[str, float]]:
    """(name, exclusive µs) of nested 'X' events on one thread (children's time removed)."""
    out, stack = [], []
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
            out.append(_close(stack.pop()))
        if stack:
            stack[-1][1] += e["dur"]
        stack.append([e, 0.0])
    out.extend(_close(s) for s in reversed(stack))
    return out


def _close(entry) -> tuple[str, float]:
    e, children = entry
    return e["name"], max(e["dur"] - children, 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--attention", default="xla", help="model.attention kernel")
    ap.add_argument("--scan-unroll", type=int, default=1, help="model.scan_unroll (layers per scan iteration)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    cfg = bench.model_config(args.hidden, args.layers).replace(attention=args.attention, scan_unroll=args.scan_unroll)
    data = bench.batch(cfg, args.batch, args.seq, args.images)
    step, _, state, x, _ = bench.setup_ours(cfg, data, want_weights=False)
    instrs, comps, frame_fn = parse_hlo(step.lower(*bench.step_args(state, x)).compile().as_text())
    state, _ = step(*bench.step_args(state, x))
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            start = time.perf_counter()
            for _ in range(args.steps):
                state, _ = step(*bench.step_args(state, x))
            jax.block_until_ready(state)
            wall = (time.perf_counter() - start) / args.steps
        with gzip.open(sorted(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True))[-1]) as f:
            trace = json.load(f)
    per_thread = collections.defaultdict(list)
    for e in trace["traceEvents"]:
        # Thunk events carry HLO instruction names; 'end: …' markers and runtime spans are skipped.
        if e.get("ph") == "X" and e["name"] in instrs:
            per_thread[e["tid"]].append(e)
    by_cat, by_op = collections.Counter(), collections.Counter()
    for events in per_thread.values():
        for name, us in exclusive(events):
            by_cat[categorise(name, instrs, comps, frame_fn)] += us / args.steps / 1e3
            by_op[name] += us / args.steps / 1e3
    total = sum(by_cat.values())
    print(
        f"hidden {args.hidden}, batch {args.batch} x {args.seq}, attention {args.attention}, scan unroll {args.scan_unroll}: {wall * 1e3:.0f} ms/step wall, "
        f"{total:.0f} ms/step of XLA op time ({os.cpu_count()} cores)"
    )
    print("| category | ms/step | share |\n|---|---:|---:|")
    for cat, ms in by_cat.most_common():
        print(f"| {cat} | {ms:.0f} | {ms / total:.0%} |")
    print(f"\ntop {args.top} ops:")
    for name, ms in by_op.most_common(args.top):
        cat, fns = categorise(name, instrs, comps, frame_fn), ",".join(sorted(functions(name, instrs, comps, frame_fn)))
        print(f"  {ms:8.1f} ms  {cat:16s} {name} {instrs[name][3]} from {fns or '?'}")


if __name__ == "__main__":
    main()
