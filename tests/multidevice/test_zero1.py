"""train.trainable_layout=zero1 computes what fsdp computes, and the stored state is the same: on a
data 2 × fsdp 2 × tensor 2 mesh with 2 micro-batches (so the local accumulation, the all-reduce over
'data' and the reduce-scatter over 'fsdp' all run), the tiny config's losses and parameters after
20 steps equal fsdp's, and a checkpoint saved under fsdp resumes under zero1 onto the same run; and
zero1's compiled step moves the trainable weights over the batch axes once per step, not per
micro-batch."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from testlib import load_config, losses

import idefics_jax
from idefics_jax import plan
from idefics_jax.train.loop import train

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _config(layout: str, steps: int = 20):
    c = load_config(
        "tiny",
        "train.eval_every=0",
        f"train.steps={steps}",
        "train.checkpoint_every=10",
        "train.micro_batches=2",
        f"train.trainable_layout={layout}",
    )
    c.eval_data = None
    c.train.log_every = 100
    c.mesh.update(MESH)
    return c


def _run(workdir, layout: str, steps: int = 20):
    train(_config(layout, steps), str(workdir), devices=jax.devices()[:8])


def _params(workdir, step: int) -> dict[str, np.ndarray]:
    model = idefics_jax.load(os.path.join(workdir, "checkpoints"), step)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero1")
    _run(root / "fsdp", "fsdp")
    _run(root / "zero1", "zero1")
    # The fsdp run's step-10 checkpoint, resumed under zero1 for the remaining 10 steps.
    os.makedirs(root / "cross" / "checkpoints")
    shutil.copytree(root / "fsdp" / "checkpoints" / "10", root / "cross" / "checkpoints" / "10")
    _run(root / "cross", "zero1")
    return root


@pytest.mark.parametrize("other", ["zero1", "cross"])
def test_zero1_equals_fsdp(runs, other):
    ref, got = losses(runs / "fsdp"), losses(runs / other)
    steps = range(1, 21) if other == "zero1" else range(11, 21)
    assert ref[20] < ref[1] - 0.5, "the run must learn for the comparison to mean anything"
    for s in steps:
        assert abs(ref[s] - got[s]) <= 1e-6, (s, ref[s], got[s])
    a, b = _params(runs / "fsdp", 20), _params(runs / other, 20)
    assert a.keys() == b.keys()
    # The perceiver's key layer-norm bias adds the same q·b to every score of a query, which the
    # softmax cancels: its exact gradient is 0, so Adam moves it by rounding noise alone (≈1e-6 after
    # 20 steps), different noise under each reduction order. It must stay that small in both runs
    # (a real gradient would move it by ~lr per step, 3e-3); every other parameter must agree.
    noise = [k for k in a if k.endswith("k_layer_norm.bias")]
    assert noise and all(max(np.abs(a[k]).max(), np.abs(b[k]).max()) < 1e-5 for k in noise), noise
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a if k not in noise)
    assert worst <= 1e-6, worst


def test_zero1_collectives_over_the_batch_axes_run_once_per_step():
    fig = plan.plan(_config("zero1"))
    over_batch = [c for c in fig["collectives"] if {"data", "fsdp"} & set(c["axes"].split("+"))]
    assert not [c for c in over_batch if c["in_loop"]], over_batch
    kinds = {(c["axes"], c["kind"]) for c in over_batch}
    # The compute copy gathered over 'fsdp' (the master weights are whole over 'data'), the local
    # gradient sums reduced over both batch axes (on XLA:CPU an all-reduce then a slice).
    assert {("fsdp", "all-gather"), ("data+fsdp", "all-reduce")} <= kinds, kinds
