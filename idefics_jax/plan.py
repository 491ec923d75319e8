"""python -m idefics_jax.plan --config configs/80b.py [--config.a.b=v ...] [--devices N] [--json OUT] [--cache_dir DIR]
python -m idefics_jax.plan --config configs/80b.py --compare [--compare_micro_batches 7,8,14,28]  (fsdp vs zero1)
python -m idefics_jax.plan --config configs/80b.py --generate [--gen_tensor 8 --gen_batch 8 --gen_prompt_len 1024
    --gen_new_tokens 64 --gen_images 4 --gen_num_beams 1]  (generation: see `plan_generate`)

Proves a layout the way the compiler sees it, without the cluster: builds the abstract train state
(nothing allocated), lowers and compiles the trainer's own jitted step (`train.step.make_train_step`)
for the configured mesh on fake CPU devices (`--xla_force_host_platform_device_count`, set by
re-executing this module before JAX starts), and prints

- total and trainable parameters;
- per-device bytes: parameters, optimizer state, the batch, and the compiled step's temporaries
  (`compiled.memory_analysis()`; zero1's compute copy and gradient accumulator named within them),
  against a limit (default 80 GB; exit status 1 above it);
- the collectives of one step by kind, mesh axis and place (inside a loop or once per step; count
  and bytes, loops multiplied out, bytes into the busiest node over the network);
- model FLOPs per step and an estimated step time and MFU on A100-80GB nodes (assumptions printed,
  and which collectives it counts as overlapped with compute and why: `estimate`).

Two things differ between this CPU compile and the GPU one, and the report accounts for both:

1. XLA:CPU has no bf16 arithmetic or collectives: its `float-normalization-bf16` pass rewrites every
   bf16 op (collectives included) to f32. So the collectives and matmuls are read from the program
   as the SPMD partitioner leaves it (XLA's dump after `spmd-partitioning`, before any
   backend-specific pass), where bf16 weight gathers are still bf16 as on the GPU; and the memory
   figures, which come from the CPU executable, are an upper bound (buffers the GPU keeps in bf16 are
   f32 here).
2. The GPU run also needs memory XLA does not see (CUDA context, cuBLAS/cuDNN workspaces, NCCL
   buffers): `--runtime_reserve_gb` (default 3) is added before comparing with the limit.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from idefics_jax import run_config
from idefics_jax.errors import UserError, cli_main, quiet_start

_CONFIG = run_config.define_flag()
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of input errors too.")
_DEVICES = flags.DEFINE_integer(
    "devices",
    512,
    "Devices to plan for when the config's mesh has a -1 axis (a mesh with fixed sizes sets the count itself).",
)
_LIMIT = flags.DEFINE_float("memory_limit_gb", 80.0, "Per-device memory limit, GB (1e9 bytes).")
_RESERVE = flags.DEFINE_float(
    "runtime_reserve_gb",
    3.0,
    "Per-device memory outside XLA's buffers on the GPU (CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers), GB.",
)
_PEAK = flags.DEFINE_float("peak_tflops", 312.0, "Dense bf16 peak per device, TFLOP/s (A100: 312).")
_EFFICIENCY = flags.DEFINE_float("matmul_efficiency", 0.75, "Fraction of peak the step's matmuls reach.")
_NVLINK = flags.DEFINE_float(
    "nvlink_gbytes",
    240.0,
    "Per-GPU NVLink bandwidth one way, GB/s (A100 NVLink3: 300 GB/s per direction, ~240 achieved by NCCL rings).",
)
_NETWORK = flags.DEFINE_float(
    "internode_gbits", 400.0, "Per-node network bandwidth one way, Gbit/s (p4d.24xlarge: 4 x 100 Gbit/s EFA)."
)
_PER_NODE = flags.DEFINE_integer("gpus_per_node", 8, "Devices per node (devices are numbered node by node).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures as JSON to this file.")
_COMPARE = flags.DEFINE_bool(
    "compare",
    False,
    "Plan the config's train step under train.trainable_layout fsdp and zero1 for each of "
    "--compare_micro_batches (one compile each) and print them side by side.",
)
_COMPARE_MICRO = flags.DEFINE_list("compare_micro_batches", ["7", "8", "14", "28"], "--compare: micro-batch counts.")
_CACHE = flags.DEFINE_string(
    "cache_dir",
    None,
    "Keep each compile's figures here, keyed by a digest of the lowered program (and the JAX version and "
    "the plan's HLO reader), and reuse them: a rerun of an unchanged program, e.g. --compare after "
    "changing only estimate flags, lowers but does not compile.",
)
_GENERATE = flags.DEFINE_bool(
    "generate",
    False,
    "Plan generation instead of training: AOT-compile idefics_jax.generate's program (vision, prefill, "
    "decode loop; bf16) for the config's model with tensor parallelism over --gen_tensor devices.",
)
_GEN_TENSOR = flags.DEFINE_integer("gen_tensor", 8, "--generate: devices (all on the 'tensor' mesh axis).")
_GEN_BATCH = flags.DEFINE_integer("gen_batch", 8, "--generate: prompts per request.")
_GEN_PROMPT = flags.DEFINE_integer("gen_prompt_len", 1024, "--generate: prompt tokens.")
_GEN_NEW = flags.DEFINE_integer("gen_new_tokens", 64, "--generate: new tokens.")
_GEN_IMAGES = flags.DEFINE_integer("gen_images", 4, "--generate: images per prompt.")
_GEN_BEAMS = flags.DEFINE_integer("gen_num_beams", 1, "--generate: beams (1 = greedy).")

_CHILD_ENV = "IDEFICS_PLAN_DEVICES"
_DUMP_ENV = "IDEFICS_PLAN_DUMP"
GB = 1e9


# HLO text ----------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def array_bytes(type_text: str) -> int:
    """Bytes of an HLO type: 'bf16[2,3]{1,0}' → 12; a tuple '(f32[4], s32[])' sums its arrays."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        size = _DTYPE_BYTES.get(dtype, 1)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _dims(type_text: str) -> list[int]:
    m = _ARRAY.search(type_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start] ('(' / '{' / '[')."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO: {text[start : start + 80]!r}")


@dataclasses.dataclass
class Instr:
    name: str
    type: str  # result type text
    op: str  # opcode, e.g. 'all-gather'
    operands: list[str]  # operand instruction names
    args: str  # the text between the operand parentheses (a constant's value)
    attrs: str  # everything after the operand list


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """HLO module text → ({computation name: instructions}, entry computation name)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m and not line.startswith("HloModule"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        pos = m.end()
        if line[pos] == "(":
            end = _balanced(line, pos)
        else:
            end = line.index(" ", pos)
        type_text = line[pos:end]
        op_start = end + 1
        paren = line.index("(", op_start)
        close = _balanced(line, paren)
        operands = re.findall(r"%([\w.\-]+)", line[paren:close])
        comps[current].append(
            Instr(m.group(1), type_text, line[op_start:paren], operands, line[paren + 1 : close - 1], line[close:])
        )
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _trip_count(while_instr: Instr, comps: dict[str, list[Instr]]) -> int | None:
    """Iterations of a while loop: XLA's known_trip_count, or the bound N of a `i < N` condition
    with a constant N (how lax.scan/fori_loop lower: i counts up from 0)."""
    m = re.search(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', while_instr.attrs)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_instr.attrs)
    body = comps.get(cond.group(1), []) if cond else []
    by_name = {i.name: i for i in body}

    def source(name):  # through the copies SPMD partitioning of a manual (shard_map) region adds
        while name in by_name and by_name[name].op == "copy":
            name = by_name[name].operands[0]
        return by_name.get(name)

    for i in body:
        if i.op == "compare" and "direction=LT" in i.attrs:
            found = [source(o) for o in i.operands]
            bound = [c for c in found if c is not None and c.op == "constant" and re.match(r"[su](32|64)\[\]", c.type)]
            if len(bound) == 1 and re.fullmatch(r"-?\d+", bound[0].args.strip()):
                return int(bound[0].args)
    return None


def looped(comps: dict[str, list[Instr]]) -> set[str]:
    """The computations that run inside a while loop: loop bodies and everything they call."""
    out: set[str] = set()
    todo = [re.search(r"body=%?([\w.\-]+)", i.attrs).group(1) for ins in comps.values() for i in ins if i.op == "while"]
    while todo:
        c = todo.pop()
        if c in out:
            continue
        out.add(c)
        for ins in comps.get(c, ()):
            todo += re.findall(
                r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)", ins.attrs
            )
            branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
            if branches:
                todo += re.findall(r"%?([\w.\-]+)", branches.group(1))
    return out


def multiplicities(comps: dict[str, list[Instr]], entry: str) -> tuple[dict[str, int], list[str]]:
    """How many times each computation runs per execution of the entry one (while bodies × trip
    counts; fusions, calls and conditional branches × 1). Returns (counts, warnings)."""
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    warnings = []
    for cname, instrs in comps.items():
        for ins in instrs:
            if ins.op == "while":
                body = re.search(r"body=%?([\w.\-]+)", ins.attrs).group(1)
                trips = _trip_count(ins, comps)
                if trips is None:
                    warnings.append(f"while loop {ins.name}: trip count unknown, counted once")
                    trips = 1
                edges[cname].append((body, trips))
                continue
            keys = ("calls", "true_computation", "false_computation") + (("to_apply",) if ins.op == "call" else ())
            for key in keys:
                for callee in re.findall(rf"{key}=%?([\w.\-]+)", ins.attrs):
                    edges[cname].append((callee, 1))
            branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
            if branches:
                edges[cname].extend((b, 1) for b in re.findall(r"%?([\w.\-]+)", branches.group(1)))
    order, seen = [], set()

    def visit(c):  # post-order DFS; the call graph of an HLO module is acyclic
        if c in seen:
            return
        seen.add(c)
        for callee, _ in edges.get(c, ()):
            visit(callee)
        order.append(c)

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    visit(entry)
    counts = defaultdict(int, {entry: 1})
    for c in reversed(order):
        for callee, k in edges.get(c, ()):
            counts[callee] += counts[c] * k
    return dict(counts), warnings


# Replica groups ----------------------------------------------------------------------------------


def _iota(dims: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
    a = np.arange(math.prod(dims)).reshape(dims)
    return a.transpose(perm) if perm else a


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """The device (partition) groups of a collective from its attribute text, in any of XLA's three
    spellings: explicit `{{0,1},{2,3}}`, iota `[G,S]<=[dims]T(perm)`, and mesh axes
    `mesh['axis_0'=a,...][, device_ids=(...)] {'axis_i'[:(pre)size], ...}`."""
    m = re.search(r"replica_groups=", attrs)
    if not m:
        return [list(range(num_devices))]
    text = attrs[m.end() :]
    if text.startswith("{"):
        body = text[1 : _balanced(text, 0) - 1]
        groups = [_ints(g) for g in re.findall(r"\{([^}]*)\}", body)]
        return groups or [list(range(num_devices))]
    if text.startswith("["):
        m = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
        g, s = int(m.group(1)), int(m.group(2))
        perm = _ints(m.group(4)) if m.group(4) else None
        return _iota(_ints(m.group(3)), perm).reshape(g, s).tolist()
    if text.startswith("mesh"):
        return _mesh_groups(text)
    raise ValueError(f"unrecognised replica_groups: {text[:120]!r}")


def _mesh_groups(text: str) -> list[list[int]]:
    close = _balanced(text, 4)
    axes = re.findall(r"'([^']+)'=(\d+)", text[4:close])
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    rest = text[close:]
    ids = np.arange(math.prod(sizes))
    d = re.match(r"\s*,\s*device_ids=\(", rest)
    if d:
        inner_end = _balanced(rest, d.end() - 1)
        inner = rest[d.end() : inner_end - 1]
        t = re.match(r"\[([\d,]+)\](?:T\(([\d,]+)\))?$", inner.strip())
        if t:
            ids = _iota(_ints(t.group(1)), _ints(t.group(2)) if t.group(2) else None).reshape(-1)
        else:
            ids = np.asarray(_ints(inner))
        rest = rest[inner_end:]
    brace = rest.index("{")
    refs = re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", rest[brace : _balanced(rest, brace)])
    # Each mesh dimension is split into [pre, size, post] pieces around the sub-axes it is grouped
    # by (XLA's AxisRef `name:(pre)size`); the grouped pieces go last, then rows are the groups.
    by_dim: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for name, pre, size in refs:
        i = names.index(name)
        by_dim[i].append((int(pre), int(size)) if size else (1, sizes[i]))
    shape, grouped = [], []
    for i, full in enumerate(sizes):
        prefix = 1
        for pre, size in sorted(by_dim.get(i, [])):
            if pre != prefix:
                shape.append(pre // prefix)
                prefix = pre
            grouped.append(len(shape))
            shape.append(size)
            prefix *= size
        if prefix != full or i not in by_dim:
            shape.append(full // prefix)
    keep = [k for k in range(len(shape)) if k not in grouped]
    group_size = math.prod(shape[k] for k in grouped)
    return ids.reshape(shape).transpose(keep + grouped).reshape(-1, group_size).tolist()


# Collectives and FLOPs of one step -----------------------------------------------------------------


@dataclasses.dataclass
class Collective:
    kind: str  # all-gather | reduce-scatter | all-reduce | all-to-all | collective-permute
    axes: str  # mesh axes it runs over, e.g. 'fsdp', 'tensor', 'fsdp+tensor'
    count: int  # executions per step
    payload: float  # bytes per device per step: the full buffer (gathered result / reduced input)
    traffic: float  # bytes per device per step on the wire (ring algorithms)
    node_bytes: float  # bytes into the busiest node per step over the network (0 within a node)
    intra_node: bool
    in_loop: bool  # issued inside a while loop (the micro-batch / layer scans), not once per step
    # Paired with matmuls the way windowed einsum (collective matmul) decomposes: an all-gather
    # feeding only dots, or a reduce-scatter of a dot's output, within a node (`_dot_pairs`).
    with_dot: bool = False
    # with_dot only: [executions per step, bytes on the wire per execution, FLOPs of the paired
    # dots per execution, group size], one entry per distinct (bytes, FLOPs, group).
    pairs: list[list[float]] = dataclasses.field(default_factory=list)


def _axes_of(members: Iterable[int], coords: np.ndarray, axis_names: Sequence[str]) -> tuple[str, ...]:
    pts = coords[list(members)]
    return tuple(a for k, a in enumerate(axis_names) if len(set(pts[:, k])) > 1)


def collectives_and_flops(
    text: str, mesh_shape: Sequence[int], axis_names: Sequence[str], device_ids: Sequence[int], gpus_per_node: int
):
    """Per-device collectives (merged by kind and axes) and matmul FLOPs of one execution of an HLO
    module partitioned over a mesh of `mesh_shape`; partition p is `device_ids[p]` (node p // per node).

    An all-reduce whose users are all dynamic-slices taking 1/group of it is counted as the
    reduce-scatter that XLA:GPU's reduce-scatter-creator turns it into. Intra-node all-gathers and
    reduce-scatters paired with dots (`_dot_pairs`) are kept apart (`with_dot`), with the FLOPs of
    the dots they pair with.
    """
    comps, entry = parse_hlo(text)
    mult, warnings = multiplicities(comps, entry)
    in_loops = looped(comps)
    n = len(device_ids)
    coords = np.stack(np.unravel_index(np.arange(n), mesh_shape), axis=1)
    node = np.asarray(device_ids) // gpus_per_node
    types = {i.name: i.type for ins in comps.values() for i in ins}
    by_name = {i.name: i for ins in comps.values() for i in ins}
    users: dict[str, list[Instr]] = defaultdict(list)
    for ins in comps.values():
        for i in ins:
            for o in i.operands:
                users[o].append(i)

    merged: dict[tuple[str, str], Collective] = {}
    flops = 0.0
    for cname, instrs in comps.items():
        k = mult.get(cname, 0)
        if not k:
            continue
        for ins in instrs:
            if ins.op == "dot":
                flops += k * _dot_flops(ins, types)
                continue
            kind = ins.op.removesuffix("-start")
            if kind not in COLLECTIVES or ins.op.endswith("-done"):
                continue
            if kind == "collective-permute":
                start = ins.attrs.index("source_target_pairs=") + len("source_target_pairs=")
                listed = ins.attrs[start : _balanced(ins.attrs, start)]
                pairs = [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", listed) if a != b]
                if not pairs:
                    continue
                axes = sorted({a for p in pairs for a in _axes_of(p, coords, axis_names)}, key=list(axis_names).index)
                size = array_bytes(ins.type)
                crossing = defaultdict(int)
                for a, b in pairs:
                    if node[a] != node[b]:
                        crossing[node[b]] += 1
                node_bytes = max(crossing.values(), default=0) * size
                _add(merged, kind, axes, k, size, size, node_bytes, not crossing, cname in in_loops)
                continue
            groups = replica_groups(ins.attrs, n)
            g = len(groups[0])
            if g <= 1:
                continue
            axes = _axes_of(groups[0], coords, axis_names)
            out = array_bytes(ins.type)
            if (
                kind == "all-reduce"
                and users[ins.name]
                and all(u.op == "dynamic-slice" and array_bytes(u.type) * g == out for u in users[ins.name])
            ):
                kind = "reduce-scatter"
            if kind == "all-gather":
                payload, wire = out, out * (g - 1) / g
            elif kind == "reduce-scatter":
                payload = out if ins.op == "all-reduce" else out * g
                wire = payload * (g - 1) / g
            elif kind == "all-reduce":
                payload, wire = out, 2 * out * (g - 1) / g
            else:  # all-to-all
                payload, wire = out, out * (g - 1) / g
            # Into each node over the network: per group, the part of the data held off the node
            # (x2 for all-reduce: reduce-scatter + all-gather); all groups on a node share its link.
            factor = {"all-reduce": 2.0}.get(kind, 1.0)
            per_node = defaultdict(float)
            for grp in groups:
                nodes, counts = np.unique(node[grp], return_counts=True)
                if len(nodes) == 1:
                    continue
                for nd, m in zip(nodes, counts):
                    share = m * payload / g if kind == "all-to-all" else payload
                    per_node[nd] += factor * share * (1 - m / g)
            intra, network = not per_node, max(per_node.values(), default=0.0)
            dots = _dot_pairs(ins, kind, users, by_name) if intra else None
            pair = None if dots is None else (wire, sum(_dot_flops(d, types) for d in dots), g)
            _add(merged, kind, axes, k, payload, wire, network, intra, cname in in_loops, pair)
    return sorted(merged.values(), key=lambda c: (c.axes, c.kind, not c.in_loop, c.with_dot)), flops, warnings


def _dot_flops(dot: Instr, types: dict[str, str]) -> float:
    """FLOPs of one execution of an HLO dot: 2 × output elements × contracted elements."""
    lhs = _dims(types.get(dot.operands[0], ""))
    contracting = _ints(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot.attrs).group(1))
    return 2.0 * math.prod(_dims(dot.type)) * math.prod(lhs[c] for c in contracting)


# Ops the pairing looks through between a collective and its dot (layout and dtype changes the
# partitioner leaves there): they move no data across devices. That windowed einsum decomposes
# the pair across them too is an assumption, stated with the estimate in docs/cluster.md.
_PASS_THROUGH = ("bitcast", "copy", "reshape", "convert")


def _dot_pairs(ins: Instr, kind: str, users: dict[str, list[Instr]], by_name: dict[str, Instr]) -> list[Instr] | None:
    """The dots a collective pairs with as windowed einsum (collective matmul) decomposes them, or None.

    - all-gather → dot: every use of the gathered array (through `_PASS_THROUGH` ops) is a dot
      operand; windowed einsum multiplies the local chunk while the next one arrives around the ring.
    - dot → reduce-scatter (or the all-reduce + dynamic-slice the partitioner writes for one): the
      reduced array is a dot's output (through `_PASS_THROUGH` ops); each partial chunk is sent on
      while the next one is computed.
    This is the shape XLA's SPMD partitioner gives a dot whose operand is split along a
    non-contracted dimension (sequence parallelism: the sequence over 'tensor') or whose output must
    come out split; an all-reduce of a whole dot output (plain tensor parallelism) is not such a pair.
    """
    if kind == "all-gather":
        found, todo = [], list(users[ins.name])
        while todo:
            u = todo.pop()
            if u.op in _PASS_THROUGH:
                todo += users[u.name]
            elif u.op == "dot":
                found.append(u)
            else:
                return None
        return found or None
    if kind == "reduce-scatter":
        src = by_name.get(ins.operands[0]) if ins.operands else None
        while src is not None and src.op in _PASS_THROUGH:
            src = by_name.get(src.operands[0])
        return [src] if src is not None and src.op == "dot" else None
    return None


def _add(merged, kind, axes, k, payload, wire, node_bytes, intra, in_loop, pair=None):
    key = (kind, "+".join(axes) or "-", in_loop, pair is not None)
    c = merged.setdefault(key, Collective(kind, key[1], 0, 0.0, 0.0, 0.0, True, in_loop, pair is not None))
    c.count += k
    c.payload += k * payload
    c.traffic += k * wire
    c.node_bytes += k * node_bytes
    c.intra_node = c.intra_node and intra
    if pair is not None:
        for entry in c.pairs:
            if tuple(entry[1:]) == pair:
                entry[0] += k
                break
        else:
            c.pairs.append([k, *pair])


# The plan ------------------------------------------------------------------------------------------


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs / nnx Variables) under `shardings`."""
    import jax

    total = 0
    for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
    return total


def plan(config, gpus_per_node: int = 8, cache_dir: str | None = None) -> dict[str, Any]:
    """Compiles the train step of `config` for its mesh over this process's (fake) devices and
    returns the raw figures (see `report`). The caller must have set up the fake devices and, to get
    bf16-faithful collectives, the XLA dump of the partitioned program (`main` does both).

    With `cache_dir`, the figures are kept there under a digest of what they are a function of: the
    lowered program (StableHLO text: the model, the step, the layout and the shardings), the JAX
    version, `gpus_per_node` and the source of the functions that read the compiled program; a
    later plan of the same program reads them instead of compiling (`compile_s` is then the
    original compile's)."""
    import jax

    from idefics_jax import run_config, sharding
    from idefics_jax.data.schema import batch_spec
    from idefics_jax.models.idefics import count_params
    from idefics_jax.train import state as state_lib
    from idefics_jax.train.metrics import model_flops_per_step
    from idefics_jax.train.step import make_train_step

    run = run_config.parse(config, files=False)
    tc, d = run.train, run.data
    mesh = sharding.make_mesh(config.mesh)
    lay = state_lib.layout(run, mesh)
    gbs, micro = d.global_batch_size, tc.micro_batches
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), lay.abstract, lay.shardings)
    batch = batch_spec(d, mesh)
    step = make_train_step(lay, tc.z_loss, micro, len(d.datasets))
    scalar = jax.ShapeDtypeStruct((), np.float32)
    dump = os.environ.get(_DUMP_ENV)
    for old in glob.glob(os.path.join(dump, "*")) if dump else ():
        # --compare compiles several steps in one process: read this one's dump.
        if os.path.isdir(old):
            shutil.rmtree(old)
        else:
            os.remove(old)
    with lay.activate():
        lowered = step.lower(state, batch, scalar, scalar)
    cached = None
    if cache_dir is not None:
        cached = os.path.join(cache_dir, f"plan-{_digest(lowered.as_text(), gpus_per_node)}.json")
        if os.path.exists(cached):
            with open(cached) as f:
                return json.load(f)
    t0 = time.perf_counter()
    with lay.activate():
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    text, source = compiled.as_text(), "the compiled CPU executable (no bf16 in the program)"
    if dump:
        found = sorted(glob.glob(os.path.join(dump, "*jit_step*after_spmd-partitioning*.txt")))
        if found:
            with open(found[-1]) as f:
                text, source = f.read(), "the partitioned program (after spmd-partitioning)"
    device_ids = [dev.id for dev in mesh.devices.flat]
    colls, hw_flops, warnings = collectives_and_flops(
        text, mesh.devices.shape, mesh.axis_names, device_ids, gpus_per_node
    )
    params = count_params(lay.abstract["params"])
    frozen = count_params(lay.abstract["frozen"])
    state_bytes = {k: shard_bytes(lay.abstract[k], lay.shardings[k]) for k in ("params", "frozen", "opt_state")}
    # Step-long buffers the layout adds inside the temporaries: zero1's compute copy (in the dtypes
    # the model reads) and its float32 gradient accumulator, both split over 'tensor' only. fsdp's
    # accumulator is float32 sharded like the params; its gathered weights live one layer at a time.
    as_dtype = lambda dt: jax.tree.map(lambda a, t: jax.ShapeDtypeStruct(a.shape, t), lay.abstract["params"], dt)
    f32 = jax.tree.map(lambda _: np.dtype(np.float32), lay.compute_dtypes)
    if tc.trainable_layout == "zero1":
        copy = shard_bytes(as_dtype(lay.compute_dtypes), lay.compute_shardings)
        accumulator = shard_bytes(as_dtype(f32), lay.compute_shardings)
    else:
        copy, accumulator = 0, shard_bytes(as_dtype(f32), lay.shardings["params"])
    batch_bytes = sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a in batch.values())
    fig = {
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "compile_s": compile_s,
        "hlo_source": source,
        "warnings": warnings,
        "params_total": params + frozen,
        "params_trainable": params,
        "global_batch": gbs,
        "seq_len": d.seq_len,
        "micro_batches": micro,
        "trainable_layout": tc.trainable_layout,
        "rows_per_device_per_micro_batch": lay.micro_batch_rows_per_device,
        "bytes": {
            "trainable_params": state_bytes["params"],
            "compute_copy": copy,
            "gradient_accumulator": accumulator,
            "frozen_params": state_bytes["frozen"],
            "optimizer_state": state_bytes["opt_state"],
            "batch": batch_bytes,
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
        },
        "collectives": [dataclasses.asdict(c) for c in colls],
        "hw_flops_per_device": hw_flops,
        "model_flops": model_flops_per_step(lay.model_config, gbs, d.seq_len, d.max_num_images),
    }
    if cached is not None:
        os.makedirs(cache_dir, exist_ok=True)
        with open(cached + ".tmp", "w") as f:
            json.dump(fig, f)
        os.replace(cached + ".tmp", cached)
    return fig


def _digest(program: str, gpus_per_node: int) -> str:
    """What `plan`'s figures are a function of, hashed: the program, JAX, the node size, and the
    source of the code that reads the compiled program."""
    import hashlib
    import inspect

    import jax

    h = hashlib.sha256(program.encode())
    h.update(f"{jax.__version__} {gpus_per_node}".encode())
    readers = (plan, collectives_and_flops, parse_hlo, multiplicities, looped, _trip_count, replica_groups)
    for fn in readers + (_mesh_groups, _add, _dot_flops, _dot_pairs, array_bytes, shard_bytes):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:24]


def estimate(
    fig: dict[str, Any],
    *,
    peak_tflops: float,
    efficiency: float,
    nvlink_gbytes: float,
    internode_gbits: float,
    limit_gb: float,
    reserve_gb: float,
) -> dict[str, Any]:
    """Adds the memory total and verdict and the step-time / MFU estimate to `plan`'s figures.

    Step time: matmuls at `efficiency` × peak; collectives bandwidth-bound (no latency term): within
    a node at `nvlink_gbytes` per GPU, across nodes at `internode_gbits` per node shared by its
    GPUs. What overlaps with what (`OVERLAP` says it in words, and the report prints it):
    - intra-node all-gathers feeding dots and reduce-scatters of dot outputs (`with_dot`: sequence
      parallelism's, see `_dot_pairs`) overlap with those dots only, as windowed einsum (collective
      matmul, `--xla_gpu_threshold_for_windowed_einsum_mib=0` in launch/slurm/env.sh) runs them: over
      a group of g devices the dot is cut into g chunks and the g−1 ring transfers run under g−1 of
      them, so per execution the exposed part is max(0, transfer − (g−1)/g × the paired dots' matmul
      time). The dots' time itself is in `compute` already; nothing else is counted under them;
    - the other intra-node collectives (tensor parallelism's all-reduces, each between two dependent
      matmuls) are exposed;
    - inter-node collectives inside the scans (fsdp's per-layer weight all-gathers and gradient
      reduce-scatters) overlap with compute: the latency-hiding scheduler and the pipelined
      collectives of launch/slurm/env.sh move the next layer's gather (and the previous layer's
      reduction) under this layer's matmuls;
    - inter-node collectives outside every loop (zero1's one gather before the micro-batch scan and
      one reduce-scatter after it) are exposed: the first micro-batch needs every gathered weight,
      and the update needs every reduced gradient.
    step = max(compute + intra-node exposed + windowed exposed, inter-node in loops) + inter-node
    outside loops. The no-overlap bound (every collective's full time added to compute) is reported
    too.
    """
    b = fig["bytes"]
    total = b["arguments"] + b["temporaries"] + b["outputs"] - b["aliased"] + reserve_gb * GB
    matmul = peak_tflops * 1e12 * efficiency
    compute = fig["hw_flops_per_device"] / matmul
    colls = fig["collectives"]
    nvlink = nvlink_gbytes * GB
    intra = sum(c["traffic"] for c in colls if c["intra_node"] and not c.get("with_dot")) / nvlink
    windowed = windowed_exposed = 0.0
    for count, wire, dot_flops, group in (p for c in colls if c.get("with_dot") for p in c["pairs"]):
        transfer = wire / nvlink
        windowed += count * transfer
        windowed_exposed += count * max(0.0, transfer - (group - 1) / group * dot_flops / matmul)
    network = internode_gbits / 8 * GB
    inter_loop = sum(c["node_bytes"] for c in colls if c["in_loop"]) / network
    inter_step = sum(c["node_bytes"] for c in colls if not c["in_loop"]) / network
    step = max(compute + intra + windowed_exposed, inter_loop) + inter_step
    no_overlap = compute + intra + windowed + inter_loop + inter_step
    peak_all = peak_tflops * 1e12 * fig["devices"]
    return dict(
        fig,
        memory_total=total,
        memory_limit=limit_gb * GB,
        fits=total <= limit_gb * GB,
        time={
            "compute_s": compute,
            "intra_node_s": intra,
            "windowed_einsum_s": windowed,
            "windowed_einsum_exposed_s": windowed_exposed,
            "inter_node_in_loops_s": inter_loop,
            "inter_node_per_step_s": inter_step,
            "step_s": step,
            "no_overlap_step_s": no_overlap,
        },
        mfu=fig["model_flops"] / step / peak_all,
        mfu_no_overlap=fig["model_flops"] / no_overlap / peak_all,
        overlap=OVERLAP,
        assumptions={
            "peak_tflops": peak_tflops,
            "matmul_efficiency": efficiency,
            "nvlink_gbytes": nvlink_gbytes,
            "internode_gbits": internode_gbits,
            "runtime_reserve_gb": reserve_gb,
        },
    )


OVERLAP = {
    "overlapped": "intra-node all-gathers feeding only dots and reduce-scatters of a dot's output (sequence "
    "parallelism's; 'with dot' in the table): windowed einsum runs g-1 of each ring's g steps under g-1 of the "
    "paired dots' g chunks, hiding at most (g-1)/g of those dots' matmul time; inter-node collectives inside "
    "the scans (fsdp's per-layer weight all-gathers and gradient reduce-scatters): the latency-hiding scheduler "
    "and pipelined collectives run them under the neighbouring layer's matmuls",
    "exposed": "the rest of the intra-node collectives, e.g. tensor parallelism's all-reduces, each between two "
    "dependent matmuls (windowed einsum decomposes only all-gather→dot and dot→reduce-scatter pairs); the part "
    "of a paired collective its dots cannot hide; inter-node collectives outside every loop (zero1's "
    "once-per-step gather and reduce-scatter): nothing independent is left to compute under them",
}


def plan_generate(
    model_config, tensor: int, batch: int, prompt_len: int, new_tokens: int, num_images: int, num_beams: int
) -> dict[str, Any]:
    """Compiles `idefics_jax.generate`'s whole program (vision tower, perceiver, cross-attention
    keys/values, prefill, decode loop) for `model_config` in bf16 on a mesh of `tensor` devices on the
    'tensor' axis (the default rules: heads, MLP and vocabulary split, the caches by heads), from
    abstract inputs; returns per-device bytes (parameters, caches, XLA's arguments / temporaries)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from idefics_jax import hf, sharding
    from idefics_jax.generation import search
    from idefics_jax.models.idefics import count_params

    cfg = model_config.replace(dtype="bfloat16", param_dtype="bfloat16", remat="none")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": tensor})
    graphdef, abstract = hf.abstract_state(cfg)
    shardings = sharding.state_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    rep = NamedSharding(mesh, PartitionSpec())
    size = cfg.vision.image_size
    inputs = (
        jax.ShapeDtypeStruct((batch, prompt_len), np.int32, sharding=rep),
        jax.ShapeDtypeStruct((batch, prompt_len), np.bool_, sharding=rep),
        jax.ShapeDtypeStruct((batch, num_images, 3, size, size), np.float32, sharding=rep),
        jax.ShapeDtypeStruct((batch, prompt_len, num_images), np.bool_, sharding=rep),
    )
    opts = search.options(cfg, max_new_tokens=new_tokens, num_beams=num_beams)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = search._program.lower(graphdef, opts, state, *inputs, jax.random.key(0), opts.warp_args())
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    rows, length = batch * num_beams, prompt_len + new_tokens
    self_cache = 2 * cfg.num_hidden_layers * rows * length * cfg.hidden_size * 2 / tensor
    cross_cache = 2 * cfg.num_blocks * rows * num_images * cfg.image_seq_len * cfg.hidden_size * 2 / tensor
    return {
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "compile_s": compile_s,
        "params_total": count_params(abstract),
        "request": dict(
            batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, images=num_images, num_beams=num_beams
        ),
        "bytes": {
            "params": shard_bytes(abstract, shardings),
            "self_attention_cache": self_cache,
            "cross_attention_cache": cross_cache,
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
        },
    }


def report_generate(fig: dict[str, Any], limit_gb: float, reserve_gb: float) -> tuple[str, bool]:
    """The human-readable generation plan and whether it fits under `limit_gb` per device."""
    b, r = fig["bytes"], fig["request"]
    total = b["arguments"] + b["outputs"] + b["temporaries"] + reserve_gb * GB
    fits = total <= limit_gb * GB
    mesh = " × ".join(f"{k} {v}" for k, v in fig["mesh"].items())
    lines = [
        f"generate: mesh {mesh} = {fig['devices']} devices; bf16; compiled in {fig['compile_s']:.0f} s",
        f"parameters: {fig['params_total']:,}",
        f"request: {r['batch']} prompts × {r['prompt_len']} tokens, {r['images']} images each, "
        f"{r['new_tokens']} new tokens, {r['num_beams']} beam(s)",
        "",
        "memory per device",
        f"  parameters        {_gb(b['params'])}",
        f"  self-attn cache   {_gb(b['self_attention_cache'])}  (k and v, every layer, prompt + new tokens)",
        f"  cross-attn cache  {_gb(b['cross_attention_cache'])}  (image keys/values, every gated layer)",
        f"  = arguments       {_gb(b['arguments'])}  (memory_analysis: parameters + inputs)",
        f"  outputs           {_gb(b['outputs'])}",
        f"  temporaries       {_gb(b['temporaries'])}  (caches, activations; CPU compile: an upper bound)",
        f"  runtime reserve   {_gb(reserve_gb * GB)}",
        f"  total             {_gb(total)}  of {limit_gb:g} GB: " + ("fits" if fits else "DOES NOT FIT"),
    ]
    return "\n".join(lines), fits


def _gb(x: float) -> str:
    return f"{x / GB:8.2f} GB" if x >= 0.1 * GB else f"{x / 1e6:8.2f} MB"


def report(fig: dict[str, Any]) -> str:
    """The human-readable plan."""
    b, t = fig["bytes"], fig["time"]
    mesh = " × ".join(f"{k} {v}" for k, v in fig["mesh"].items())
    tokens = fig["global_batch"] * fig["seq_len"]
    lines = [
        f"mesh {mesh} = {fig['devices']} devices; compiled in {fig['compile_s']:.0f} s",
        f"parameters: {fig['params_total']:,} total, {fig['params_trainable']:,} trainable",
        f"batch: {fig['global_batch']} rows × {fig['seq_len']} tokens = {tokens / 1e6:.2f}M tokens per step, "
        f"{fig['micro_batches']} micro-batches of {fig['rows_per_device_per_micro_batch']:g} rows per device",
        "",
        "memory per device",
        f"  trainable params  {_gb(b['trainable_params'])}  (fp32 master weights, layout {fig['trainable_layout']})",
        f"  frozen params     {_gb(b['frozen_params'])}",
        f"  optimizer state   {_gb(b['optimizer_state'])}",
        f"  batch             {_gb(b['batch'])}",
        f"  = step arguments  {_gb(b['arguments'])}  (memory_analysis; outputs alias the donated state)",
        f"  temporaries       {_gb(b['temporaries'])}  (CPU compile: an upper bound, see --help), of which",
        f"    compute copy    {_gb(b['compute_copy'])}  "
        + (
            "(zero1: trainable params in the compute dtype, split over 'tensor' only)"
            if b["compute_copy"]
            else "(fsdp: weights gathered one layer at a time)"
        ),
        f"    grad accumulator{_gb(b['gradient_accumulator'])}  (fp32, "
        + ("split over 'tensor' only)" if b["compute_copy"] else "sharded like the params)"),
        f"  runtime reserve   {_gb(fig['assumptions']['runtime_reserve_gb'] * GB)}",
        f"  total             {_gb(fig['memory_total'])}  of {fig['memory_limit'] / GB:g} GB: "
        + ("fits" if fig["fits"] else "DOES NOT FIT"),
        "",
        f"collectives per step (from {fig['hlo_source']}; bytes per device)",
        f"  {'axes':<14}{'kind':<20}{'where':<7}{'with dot':<10}{'count':>8}{'payload':>14}{'on the wire':>14}"
        f"{'network/node':>14}",
    ]
    for c in fig["collectives"]:
        lines.append(
            f"  {c['axes']:<14}{c['kind']:<20}{'loop' if c['in_loop'] else 'step':<7}"
            f"{'yes' if c.get('with_dot') else '':<10}{c['count']:>8}"
            f"{_gb(c['payload']):>14}{_gb(c['traffic']):>14}{_gb(c['node_bytes']):>14}"
        )
    lines.append("  (where: loop = inside the micro-batch / layer scans; step = once per step, outside every loop;")
    lines.append("   with dot: an intra-node all-gather feeding only dots or reduce-scatter of a dot's output)")
    a = fig["assumptions"]
    lines += [
        "",
        f"model FLOPs per step {fig['model_flops']:.3e} (train/metrics.py); compiled matmul FLOPs per device "
        f"{fig['hw_flops_per_device']:.3e} (× {fig['devices']} = "
        f"{fig['hw_flops_per_device'] * fig['devices'] / fig['model_flops']:.2f}× model: remat recompute)",
        f"estimate on A100-80GB ({a['peak_tflops']:g} TFLOP/s bf16 at {a['matmul_efficiency']:.0%} for "
        f"matmuls; NVLink {a['nvlink_gbytes']:g} GB/s per GPU; network {a['internode_gbits']:g} Gbit/s per "
        f"node):",
        f"  compute {t['compute_s']:.2f} s + intra-node collectives {t['intra_node_s']:.2f} s + windowed-einsum "
        f"collectives {t['windowed_einsum_exposed_s']:.2f} s exposed (of {t['windowed_einsum_s']:.2f} s), "
        f"overlapped with inter-node collectives in loops {t['inter_node_in_loops_s']:.2f} s; "
        f"then inter-node collectives per step {t['inter_node_per_step_s']:.2f} s",
        f"  step {t['step_s']:.2f} s → MFU {fig['mfu']:.1%} "
        f"(no overlap at all: {t['no_overlap_step_s']:.2f} s, MFU {fig['mfu_no_overlap']:.1%})",
        f"  counted as overlapped: {fig['overlap']['overlapped']}",
        f"  counted as exposed: {fig['overlap']['exposed']}",
    ]
    lines += [f"warning: {w}" for w in fig["warnings"]]
    return "\n".join(lines)


def compare_table(figs: Sequence[dict[str, Any]]) -> str:
    """The side-by-side table of estimated plans (one row per layout × micro-batch count)."""
    head = (
        f"{'layout':<8}{'micro':>6}{'rows/dev':>9}{'memory':>10}{'':>5}{'net/node loop':>15}{'net/node step':>15}"
        f"{'compute+TP':>12}{'step':>9}{'MFU':>8}"
    )
    lines = [head]
    for f in figs:
        t = f["time"]
        loop = sum(c["node_bytes"] for c in f["collectives"] if c["in_loop"])
        step = sum(c["node_bytes"] for c in f["collectives"] if not c["in_loop"])
        lines.append(
            f"{f['trainable_layout']:<8}{f['micro_batches']:>6}{f['rows_per_device_per_micro_batch']:>9g}"
            f"{f['memory_total'] / GB:>7.1f} GB{'' if f['fits'] else ' OVER':>5}{loop / GB:>12.1f} GB{step / GB:>12.1f} GB"
            f"{t['compute_s'] + t['intra_node_s'] + t['windowed_einsum_exposed_s']:>10.2f} s{t['step_s']:>7.2f} s"
            f"{f['mfu']:>8.1%}"
        )
    return "\n".join(lines)


def _mesh_size(mesh_cfg, devices: int) -> int:
    sizes = [int(mesh_cfg.get(a, 1)) for a in ("data", "fsdp", "tensor")]
    return math.prod(sizes) if -1 not in sizes else devices


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cli_main("plan", _plan, _DEBUG.value)


def _plan() -> None:
    quiet_start()
    config = _CONFIG.value
    if config is None:
        raise UserError("--config is required, e.g. --config configs/80b.py")
    n = _GEN_TENSOR.value if _GENERATE.value else _mesh_size(config.mesh, _DEVICES.value)
    if os.environ.get(_CHILD_ENV) != str(n):
        # Fake devices and the dump must be in place before JAX creates its CPU backend: re-execute.
        dump = tempfile.mkdtemp(prefix="idefics-plan-")
        env = dict(os.environ, **{_CHILD_ENV: str(n), _DUMP_ENV: dump, "JAX_PLATFORMS": "cpu"})
        env["XLA_FLAGS"] = " ".join(
            [
                os.environ.get("XLA_FLAGS", ""),
                f"--xla_force_host_platform_device_count={n}",
                f"--xla_dump_to={dump}",
                "--xla_dump_hlo_pass_re=^spmd-partitioning$",
                "--xla_dump_hlo_module_re=jit_step",
            ]
        )
        os.execve(sys.executable, [sys.executable, "-m", "idefics_jax.plan", *sys.argv[1:]], env)
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would skip the dump
    if _GENERATE.value:
        shutil.rmtree(os.environ.get(_DUMP_ENV, ""), ignore_errors=True)
        model_config = run_config.parse(config, files=False).model
        fig = plan_generate(
            model_config, n, _GEN_BATCH.value, _GEN_PROMPT.value, _GEN_NEW.value, _GEN_IMAGES.value, _GEN_BEAMS.value
        )
        text, fits = report_generate(fig, _LIMIT.value, _RESERVE.value)
        print(text, flush=True)
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(fig, f, indent=1)
        sys.exit(0 if fits else 1)
    est = lambda fig: estimate(
        fig,
        peak_tflops=_PEAK.value,
        efficiency=_EFFICIENCY.value,
        nvlink_gbytes=_NVLINK.value,
        internode_gbits=_NETWORK.value,
        limit_gb=_LIMIT.value,
        reserve_gb=_RESERVE.value,
    )
    if _COMPARE.value:
        figs = []
        try:
            for layout in ("fsdp", "zero1"):
                for micro in _COMPARE_MICRO.value:
                    variant = config.copy_and_resolve_references()
                    variant.train.trainable_layout, variant.train.micro_batches = layout, int(micro)
                    figs.append(est(plan(variant, _PER_NODE.value, _CACHE.value)))
                    print(f"planned {layout} × {micro} micro-batches", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(os.environ.get(_DUMP_ENV, ""), ignore_errors=True)
        print(compare_table(figs), flush=True)
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(figs, f, indent=1)
        return
    try:
        fig = plan(config, _PER_NODE.value, _CACHE.value)
    finally:
        shutil.rmtree(os.environ.get(_DUMP_ENV, ""), ignore_errors=True)
    fig = est(fig)
    print(report(fig), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(fig, f, indent=1)
    if not fig["fits"]:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
