"""idefics_jax.plan: the HLO reading (replica groups, loops, bytes, FLOPs) on hand-written HLO, and
the whole plan of a reduced config on a fake 16-device mesh checked against bytes computed by hand."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, load_config
from flax import nnx

from idefics_jax import plan
from idefics_jax.config import IdeficsConfig
from idefics_jax.models import abstract_model
from idefics_jax.models.freeze import trainable_mask


@pytest.mark.parametrize(
    "attrs, groups",
    [
        ("replica_groups={{0,1},{2,3}}, dimensions={0}", [[0, 1], [2, 3]]),
        ("replica_groups=[2,2]<=[4], to_apply=%add", [[0, 1], [2, 3]]),
        ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", [[0, 2], [1, 3]]),
        ("replica_groups=[1,8]<=[2,2,2]T(2,1,0)", [[0, 4, 2, 6, 1, 5, 3, 7]]),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, use_global_device_ids=true", [[0, 2], [1, 3]]),
        ("replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=2] {'axis_2'}", [[0, 1], [2, 3]]),
        # The mesh's devices listed transposed: position (i, j) holds device j*2 + i.
        ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}", [[0, 2], [1, 3]]),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=(3,2,1,0) {'axis_0'}", [[3, 1], [2, 0]]),
        # Sub-axis: the major half of an axis of 4.
        ("replica_groups=mesh['axis_0'=4] {'axis_0':(1)2}", [[0, 2], [1, 3]]),
        ("replica_groups={}", [[0, 1, 2, 3]]),
    ],
)
def test_replica_group_spellings(attrs, groups):
    assert plan.replica_groups(attrs, 4) == groups


HLO = """HloModule test

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (p0: (s32[], f32[8,16])) -> pred[] {
  %p0 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i0 = s32[] get-tuple-element(%p0), index=0
  %trips = s32[] constant(5)
  ROOT %lt = pred[] compare(%i0, %trips), direction=LT
}

%body (p1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i1 = s32[] get-tuple-element(%p1), index=0
  %x1 = f32[8,16]{1,0} get-tuple-element(%p1), index=1
  %w = f32[16,16]{1,0} constant({...})
  %y = f32[8,16]{1,0} dot(%x1, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = f32[8,16]{1,0} all-reduce(%y), channel_id=1, replica_groups=[2,2]<=[4], to_apply=%add
  %ag = bf16[8,64]{1,0} all-gather(%yb), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), dimensions={1}
  %rs = f32[8,16]{1,0} all-reduce(%ar), channel_id=3, replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add
  %zero = s32[] constant(0)
  %ds = f32[4,16]{1,0} dynamic-slice(%rs, %i1, %zero), dynamic_slice_sizes={4,16}
  %cp = f32[8,16]{1,0} collective-permute(%ar), channel_id=4, source_target_pairs={{0,1},{1,0},{2,2}}
  %one = s32[] constant(1)
  %next = s32[] add(%i1, %one)
  ROOT %out = (s32[], f32[8,16]{1,0}) tuple(%next, %cp)
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %start = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%start, %x)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %res = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_collectives_and_flops_are_counted_through_loops():
    # Mesh fsdp 2 × tensor 2 over devices 0..3, two per node: tensor groups stay in a node.
    colls, flops, warnings = plan.collectives_and_flops(HLO, (2, 2), ("fsdp", "tensor"), [0, 1, 2, 3], 2)
    assert warnings == []
    assert flops == 5 * 2 * 8 * 16 * 16
    got = {(c.axes, c.kind): c for c in colls}
    assert set(got) == {
        ("tensor", "all-reduce"),
        ("fsdp", "all-gather"),
        ("fsdp", "reduce-scatter"),
        ("tensor", "collective-permute"),
    }
    ar = got["tensor", "all-reduce"]
    assert (ar.count, ar.payload, ar.traffic, ar.node_bytes, ar.intra_node) == (5, 5 * 512, 5 * 512, 0, True)
    ag = got["fsdp", "all-gather"]  # bf16 [8, 64] gathered over 2 nodes; 2 groups share each node's link
    assert (ag.count, ag.payload, ag.traffic, ag.node_bytes, ag.intra_node) == (5, 5 * 1024, 5 * 512, 5 * 1024, False)
    rs = got["fsdp", "reduce-scatter"]  # an all-reduce only sliced afterwards: a reduce-scatter on GPU
    assert (rs.count, rs.payload, rs.traffic) == (5, 5 * 512, 5 * 256)
    cp = got["tensor", "collective-permute"]  # {2,2} moves nothing
    assert (cp.count, cp.payload, cp.node_bytes) == (5, 5 * 512, 0)


def test_collectives_through_a_call_and_outside_loops():
    # A shard_map body is a `call` (to_apply=) and its loop bounds reach the compare through copies.
    text = HLO.replace("%trips = s32[] constant(5)", "%five = s32[] constant(5)\n  %trips = s32[] copy(%five)").replace(
        """ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %start = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%start, %x)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %res = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}""",
        """%manual (m: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %m = (s32[], f32[8,16]{1,0}) parameter(0)
  ROOT %inner = (s32[], f32[8,16]{1,0}) while(%m), condition=%cond, body=%body
}

ENTRY %main (x: f32[8,16]) -> f32[8,32] {
  %x = f32[8,16]{1,0} parameter(0)
  %start = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%start, %x)
  %loop = (s32[], f32[8,16]{1,0}) call(%init), to_apply=%manual
  %res = f32[8,16]{1,0} get-tuple-element(%loop), index=1
  ROOT %once = f32[8,32]{1,0} all-gather(%res), channel_id=5, replica_groups=[2,2]<=[2,2]T(1,0), dimensions={1}
}""",
    )
    colls, flops, warnings = plan.collectives_and_flops(text, (2, 2), ("fsdp", "tensor"), [0, 1, 2, 3], 2)
    assert warnings == [] and flops == 5 * 2 * 8 * 16 * 16
    got = {(c.axes, c.kind, c.in_loop): c.count for c in colls}
    assert got == {
        ("tensor", "all-reduce", True): 5,
        ("fsdp", "all-gather", True): 5,
        ("fsdp", "reduce-scatter", True): 5,
        ("tensor", "collective-permute", True): 5,
        ("fsdp", "all-gather", False): 1,
    }


def test_unknown_trip_count_is_reported():
    text = HLO.replace("%trips = s32[] constant(5)", "%trips = s32[] get-tuple-element(%p0), index=0")
    _, flops, warnings = plan.collectives_and_flops(text, (2, 2), ("fsdp", "tensor"), [0, 1, 2, 3], 2)
    assert flops == 2 * 8 * 16 * 16 and "trip count unknown" in warnings[0]


MESH = {"data": 1, "fsdp": 4, "tensor": 4}


def by_hand(config) -> dict[str, int]:
    """Per-device bytes of trainable and frozen params: each leaf's bytes / its number of shards,
    a dimension being split by the mesh axis its logical name maps to when that axis divides it."""
    rules = {
        "embed": "fsdp",
        "vision_embed": "fsdp",
        "heads": "tensor",
        "mlp": "tensor",
        "vocab": "tensor",
        "vision_heads": "tensor",
        "vision_mlp": "tensor",
    }
    model = abstract_model(IdeficsConfig.from_dict(config.model))
    trains = {p: bool(v.get_value()) for p, v in nnx.to_flat_state(trainable_mask(model))}
    out = {"trainable": 0, "frozen": 0, "trainable_count": 0, "count": 0}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value, axes = var.get_value(), var.get_metadata()["axes"]
        shards, used = 1, set()
        for dim, name in zip(value.shape, axes):
            axis = rules.get(name)
            if axis and axis not in used and dim % MESH[axis] == 0:
                shards *= MESH[axis]
                used.add(axis)
        key = "trainable" if trains[path] else "frozen"
        out[key] += value.size * value.dtype.itemsize // shards
        out["count"] += value.size
        out["trainable_count"] += value.size if trains[path] else 0
    return out


def test_plan_of_a_reduced_config_on_16_devices(tmp_path):
    config = load_config("tiny")
    config.model.freeze_text_layers = config.model.freeze_vision_layers = config.model.freeze_lm_head = True
    config.mesh.update(MESH)
    out = tmp_path / "plan.json"
    overrides = [f"--config.mesh.{k}={v}" for k, v in MESH.items()] + [
        f"--config.model.{k}=True" for k in ("freeze_text_layers", "freeze_vision_layers", "freeze_lm_head")
    ]
    # A limit below the total: the plan must say so and exit 1 (the figures are still written).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "idefics_jax.plan",
            "--config",
            os.path.join(ROOT, "configs", "tiny.py"),
            *overrides,
            "--memory_limit_gb=0.01",
            "--runtime_reserve_gb=0.04",
            f"--json={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "DOES NOT FIT" in proc.stdout and "fsdp 4 × tensor 4 = 16 devices" in proc.stdout
    fig = json.loads(out.read_text())
    hand = by_hand(config)
    assert fig["params_total"] == hand["count"] and fig["params_trainable"] == hand["trainable_count"]
    assert 0 < hand["trainable_count"] < hand["count"]
    b = fig["bytes"]
    assert (b["trainable_params"], b["frozen_params"]) == (hand["trainable"], hand["frozen"])
    # Adam: two fp32 moments per trainable parameter, sharded like it, plus its int32 step count.
    assert 2 * hand["trainable"] <= b["optimizer_state"] <= 2 * hand["trainable"] + 16
    # XLA's own count of the step's arguments: the state, the batch, 2 int32 counters, 2 f32 scalars.
    d = config.data
    rows = d.global_batch_size // (MESH["data"] * MESH["fsdp"])
    batch = rows * (d.seq_len * (4 * 4 + 4 + 4 * d.max_num_images) + 4 + d.max_num_images * 3 * d.image_size**2 * 4)
    assert b["batch"] == batch
    state = hand["trainable"] + hand["frozen"] + b["optimizer_state"] + 2 * 4
    assert state + batch <= b["arguments"] <= state + batch + 8
    assert b["aliased"] >= hand["trainable"] + hand["frozen"] and b["temporaries"] > 0
    total = b["arguments"] + b["temporaries"] + b["outputs"] - b["aliased"] + 0.04e9
    assert fig["memory_total"] == pytest.approx(total) and not fig["fits"]
    assert plan.estimate(
        fig, peak_tflops=312, efficiency=0.75, nvlink_gbytes=240, internode_gbits=400, limit_gb=80, reserve_gb=3
    )["fits"]
    # The step's collectives: weights gathered over fsdp, tensor-parallel reductions over tensor.
    kinds = {(c["axes"], c["kind"]) for c in fig["collectives"]}
    assert {("fsdp", "all-gather"), ("tensor", "all-reduce")} <= kinds
    assert fig["rows_per_device_per_micro_batch"] == rows / config.train.micro_batches
    assert fig["hlo_source"].startswith("the partitioned program")
    # Compiled matmul FLOPs cover at least the model FLOPs (no remat in tiny: about equal).
    assert 0.9 < fig["hw_flops_per_device"] * 16 / fig["model_flops"] < 1.5


# Sequence parallelism's pairs on a mesh of tensor 2 (devices 0, 1; one node): a gather of the
# sequence-split activations feeding a dot, a dot's output all-reduced then sliced (the
# partitioner's reduce-scatter), and two that are not pairs: a plain all-reduce of a dot's output
# (Megatron without sequence parallelism) and a gather that feeds an add.
PAIRS_HLO = """HloModule pairs

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %sum = bf16[] add(%a, %b)
}

ENTRY %main (x: bf16[4,16], i: s32[]) -> bf16[8,16] {
  %x = bf16[4,16]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %zero = s32[] constant(0)
  %w = bf16[16,16]{1,0} constant({...})
  %ag = bf16[8,16]{1,0} all-gather(%x), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  %agc = bf16[8,16]{1,0} copy(%ag)
  %y = bf16[8,16]{1,0} dot(%agc, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = bf16[8,16]{1,0} all-reduce(%y), channel_id=2, replica_groups={{0,1}}, to_apply=%add
  %rs = bf16[4,16]{1,0} dynamic-slice(%ar, %i, %zero), dynamic_slice_sizes={4,16}
  %z = bf16[8,16]{1,0} dot(%y, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %plain = bf16[8,16]{1,0} all-reduce(%z), channel_id=3, replica_groups={{0,1}}, to_apply=%add
  %ag2 = bf16[8,16]{1,0} all-gather(%rs), channel_id=4, replica_groups={{0,1}}, dimensions={0}
  ROOT %out = bf16[8,16]{1,0} add(%plain, %ag2)
}
"""


def test_collectives_paired_with_dots_are_told_apart():
    colls, flops, _ = plan.collectives_and_flops(PAIRS_HLO, (1, 2), ("fsdp", "tensor"), [0, 1], 8)
    dot = 2 * 8 * 16 * 16
    assert flops == 2 * dot
    got = {(c.kind, c.with_dot): c for c in colls}
    assert set(got) == {("all-gather", True), ("reduce-scatter", True), ("all-reduce", False), ("all-gather", False)}
    # [executions, bytes on the wire, FLOPs of the paired dots, group size]
    assert got["all-gather", True].pairs == [[1, 128, dot, 2]]
    assert got["reduce-scatter", True].pairs == [[1, 128, dot, 2]]
    assert got["all-reduce", False].pairs == got["all-gather", False].pairs == []


def test_windowed_einsum_hides_at_most_the_paired_dots():
    colls, flops, _ = plan.collectives_and_flops(PAIRS_HLO, (1, 2), ("fsdp", "tensor"), [0, 1], 8)
    fig = {
        "bytes": dict(arguments=0, temporaries=0, outputs=0, aliased=0),
        "collectives": [dataclasses.asdict(c) for c in colls],
        "hw_flops_per_device": flops,
        "model_flops": flops,
        "devices": 1,
    }
    # 1 s per 128 bytes over NVLink; 1 s per dot (4,096 FLOPs) at full efficiency.
    est = lambda peak: plan.estimate(
        fig, peak_tflops=peak, efficiency=1.0, nvlink_gbytes=128e-9, internode_gbits=400, limit_gb=80, reserve_gb=0
    )
    t = est(4096e-12)["time"]
    # The plain all-reduce (2 × 1/2 × 256 bytes on the wire) and the unpaired gather (1/2 × 256) are
    # exposed: 3 s. Each pair's transfer (1 s) hides under (g-1)/g = 1/2 of its dot (1 s): 0.5 s
    # exposed each.
    assert t["compute_s"] == pytest.approx(2.0) and t["intra_node_s"] == pytest.approx(3.0)
    assert t["windowed_einsum_s"] == pytest.approx(2.0) and t["windowed_einsum_exposed_s"] == pytest.approx(1.0)
    assert t["step_s"] == pytest.approx(6.0) and t["no_overlap_step_s"] == pytest.approx(7.0)
    # Dots 4× slower (4 s each): half of one hides the whole transfer.
    t = est(1024e-12)["time"]
    assert t["windowed_einsum_exposed_s"] == 0 and t["step_s"] == pytest.approx(8.0 + 3.0)
