"""Sequence parallelism (`configs.common.sequence_parallel()`: 'length' → 'tensor') computes what the
default layout computes: on an fsdp 2 × tensor 4 mesh, zero1 with 2 micro-batches (the 80B's layout),
the tiny config's losses over 3 steps and its parameters after them equal those without it, and the
rule does reach the step's program. (That
the compiled step's decoder collectives become all-gathers into and reduce-scatters out of the
matmuls is read from the 80B plan, docs/cluster.md; tests/test_plan.py checks the reader.)"""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from testlib import load_config, losses

import idefics_jax
from configs import common
from idefics_jax import run_config, sharding
from idefics_jax.data.schema import batch_spec
from idefics_jax.models.vision import HIDDEN
from idefics_jax.train import state as state_lib
from idefics_jax.train.loop import train
from idefics_jax.train.step import make_train_step

MESH = {"data": 1, "fsdp": 2, "tensor": 4}
STEPS = 3


def _config(sequence_parallel: bool):
    c = load_config(
        "tiny",
        "train.eval_every=0",
        f"train.steps={STEPS}",
        f"train.checkpoint_every={STEPS}",
        "train.micro_batches=2",
        "train.trainable_layout=zero1",
    )
    c.eval_data = None
    c.train.eval_tasks = []
    c.train.log_every = 100
    c.mesh.update(MESH)
    if sequence_parallel:
        c.sharding_rules = common.sequence_parallel()
    return c


def _params(workdir) -> dict[str, np.ndarray]:
    model = idefics_jax.load(os.path.join(workdir, "checkpoints"), STEPS)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    for name, sp in (("off", False), ("on", True)):
        train(_config(sp), str(root / name), devices=jax.devices()[:8])
    return root


def _lowered(config) -> str:
    """The train step of `config` on the test mesh, lowered (not compiled), as text."""
    run = run_config.parse(config, files=False)
    lay = state_lib.layout(run, sharding.make_mesh(run.config.mesh, jax.devices()[:8]))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), lay.abstract, lay.shardings)
    step = make_train_step(lay, run.train.z_loss, run.train.micro_batches, len(run.data.datasets))
    scalar = jax.ShapeDtypeStruct((), np.float32)
    with lay.activate():
        return step.lower(state, batch_spec(run.data, lay.mesh), scalar, scalar).as_text()


def test_the_rule_reaches_the_step():
    # The tiny config's 128 tokens divide over tensor=4, so the rule is not dropped for the hidden
    # state, and the step's program changes with it (were the model to ignore 'length', the two
    # programs would be the same and the equality below would prove nothing).
    mesh = sharding.make_mesh(MESH, jax.devices()[:8])
    rules = sharding.rules_from_config(common.sequence_parallel())
    shape = (2, _config(True).data.seq_len, 64)
    assert sharding.logical_to_spec(HIDDEN, rules, shape, mesh) == PartitionSpec(("data", "fsdp"), "tensor", None)
    assert _lowered(_config(True)) != _lowered(_config(False))


def test_sequence_parallel_equals_the_default_layout(runs):
    ref, got = losses(runs / "off"), losses(runs / "on")
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1], "the run must learn for the comparison to mean anything"
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-6, (s, ref[s], got[s])
    a, b = _params(runs / "off"), _params(runs / "on")
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1e-6, worst


def test_cudnn_operands_are_split_by_batch_and_heads_only():
    """What attention='cudnn' hands the kernel (`layers._fused`) under sequence parallelism, run by
    XLA's implementation of the same call: from sequence-split q, k, v it equals the unsplit call,
    and q, k, v reach the kernel split by batch and heads, never by sequence (cuDNN's partitioning
    rejects a split sequence)."""
    from jax.sharding import NamedSharding

    from idefics_jax.models import layers as L

    mesh = sharding.make_mesh(MESH, jax.devices()[:8])
    rules = sharding.rules_from_config(common.sequence_parallel())
    b, t, n, h = 4, 64, 8, 16
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, t, n, h)).astype(np.float32) for _ in range(3))
    slots = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    seg = np.repeat(np.arange(2, dtype=np.int32), t // 2)[None].repeat(b, 0)
    mask = L.Mask(q_pos=slots, kv_pos=slots, q_seg=seg, kv_seg=seg)
    fused = jax.jit(lambda q, k, v, m: L._fused(q, k, v, m, h**-0.5, "xla"))
    expected = np.asarray(fused(q, k, v, mask))

    split = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor", None, None))
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        args = [jax.device_put(x, split) for x in (q, k, v)]
        text = fused.lower(*args, mask).as_text()
        got = np.asarray(fused(*args, mask))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
    assert len(constraints) == 4, text  # q, k, v and the boolean mask
    assert sum('[{"data", "fsdp"}, {}, {"tensor"}, {}]' in line for line in constraints) == 3, constraints
