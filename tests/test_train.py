"""The trainer on configs/tiny.py: learning, checkpoint policy, guards, freezing, the resume checks
(faults — kill -9, signals, corrupt checkpoints, disk full — are in test_faults.py)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testlib import load_config, losses, records

from idefics_jax import sharding
from idefics_jax.train import state as state_lib
from idefics_jax.train.loop import train
from idefics_jax.train.step import make_train_step


def tiny(**train_overrides):
    """configs/tiny.py without eval, with `train` overrides given as dotted keys (e.g. "guards.spike_window")."""
    c = load_config("tiny")
    c.eval_data = None
    c.train.eval_every = 0
    for key, value in train_overrides.items():
        *parents, leaf = key.split(".")
        node = c.train
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_tiny_loss_halves(tmp_path):
    summary = train(tiny(steps=60, checkpoint_every=1000, log_every=1000), str(tmp_path))
    seq = losses(tmp_path)
    assert seq[60] < 0.5 * seq[1], (seq[1], seq[60])
    assert summary["final_step"] == 60


def test_checkpoint_interval_and_keep_policy(tmp_path):
    summary = train(tiny(steps=12, checkpoint_every=2, keep_checkpoints=2, keep_period=4, log_every=100), str(tmp_path))
    # Saved at 2, 4, ..., 12; kept: the newest two (10, 12) plus multiples of 4 forever.
    assert summary["checkpoints"] == [4, 8, 10, 12]
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [4, 8, 10, 12]
    # Nothing frozen (the tiny default): no frozen store, every parameter in each step.
    assert "frozen" not in os.listdir(tmp_path / "checkpoints")
    assert not os.path.exists(tmp_path / "checkpoints" / "12" / "frozen_ref")


def _layout_and_state(config):
    mesh = sharding.make_mesh(config.mesh)
    lay = state_lib.layout(config, mesh)
    return lay, state_lib.init(lay, 0)


def _batch(config, step=0):
    from idefics_jax import data

    return {k: jnp.asarray(v) for k, v in data.pipeline(config.data).batch(step).items()}


def test_injected_nonfinite_gradient_is_skipped_bit_identically():
    config = tiny()
    lay, state = _layout_and_state(config)
    step = make_train_step(lay, 1e-3, 1, 4)
    before = jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state", "updates")})
    state, m = step(state, _batch(config), jnp.float32(np.inf), jnp.float32(np.nan))
    assert bool(m["nonfinite"]) and not bool(m["applied"])
    after = jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state", "updates")})
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert int(state["step"]) == 1
    # Finite steps do change the params (the check above can fail); the first applied update
    # has learning rate 0 (warmup starts at 0), so take two.
    for _ in range(2):
        state, m = step(state, _batch(config), jnp.float32(np.inf), jnp.float32(1.0))
        assert bool(m["applied"])
    assert any(
        np.any(a != np.asarray(b)) for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"]))
    )


def test_nonfinite_steps_are_counted_and_too_many_stop_the_run(tmp_path):
    from idefics_jax.train.loop import TrainingStopped

    summary = train(
        tiny(steps=6, checkpoint_every=100, log_every=100, **{"debug.loss_scale_at_steps": [[2, float("nan")]]}),
        str(tmp_path / "a"),
    )
    assert summary["final_step"] == 6
    recs = records(tmp_path / "a" / "metrics.jsonl")
    assert [r["applied"] for r in recs] == [True, True, False, True, True, True]
    assert recs[-1]["guards/nonfinite_steps"] == 1
    bad = [[s, float("inf")] for s in range(1, 5)]
    with pytest.raises(TrainingStopped, match="3 steps in a row had a non-finite loss"):
        train(
            tiny(
                steps=6,
                checkpoint_every=100,
                log_every=100,
                **{"debug.loss_scale_at_steps": bad, "guards.max_nonfinite_in_a_row": 3},
            ),
            str(tmp_path / "b"),
        )


def test_loss_spike_rolls_back_and_skips_data(tmp_path):
    cfg = tiny(
        steps=12,
        checkpoint_every=4,
        log_every=100,
        **{
            "debug.loss_scale_at_steps": [[9, 1000.0]],
            "guards.spike_action": "rollback",
            "guards.spike_window": 3,
            "guards.spike_sigmas": 100.0,
            "guards.rollback_skip_steps": 2,
        },
    )
    summary = train(cfg, str(tmp_path))
    recs = records(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in recs]
    # Steps 1..9 ran (the 10th, data step 9, spiked and was not logged), then back to 8 → 9..12.
    assert steps == list(range(1, 10)) + [9, 10, 11, 12]
    assert recs[-1]["guards/rollbacks"] == 1 and recs[-1]["guards/spike_steps"] == 1
    # Data steps [8, 10) were skipped: the replayed step 9 saw data step 10, not the spiking 9.
    from idefics_jax import ckpt_format as fmt

    _, _meta = fmt.read_config(tmp_path / "checkpoints")
    import orbax.checkpoint as ocp

    mngr = fmt.manager(tmp_path / "checkpoints", ocp.CheckpointManagerOptions(read_only=True), items=(fmt.TRAIN_STATE,))
    ts = mngr.restore(12, args=ocp.args.Composite(**{fmt.TRAIN_STATE: ocp.args.JsonRestore()}))[fmt.TRAIN_STATE]
    assert ts["guards"]["rollback_skips"] == [[8, 10]]
    assert summary["final_step"] == 12


def test_spike_skip_mode_drops_the_update(tmp_path):
    train(
        tiny(
            steps=8,
            checkpoint_every=100,
            log_every=100,
            **{"debug.loss_scale_at_steps": [[6, 1000.0]], "guards.spike_window": 3, "guards.spike_sigmas": 100.0},
        ),
        str(tmp_path),
    )
    recs = records(tmp_path / "metrics.jsonl")
    assert [r["applied"] for r in recs] == [True] * 6 + [False, True]


def test_frozen_params_do_not_move_and_have_no_optimizer_state(tmp_path):
    config = tiny(steps=3)
    config.model.freeze_text_layers = True
    config.model.freeze_vision_layers = True
    config.model.freeze_lm_head = True
    lay, state = _layout_and_state(config)
    frozen0 = jax.tree.map(np.asarray, state["frozen"])
    params0 = jax.tree.map(np.asarray, state["params"])
    step = make_train_step(lay, 1e-3, 2, 4)
    for i in range(3):
        state, _m = step(state, _batch(config, i), jnp.float32(np.inf), jnp.float32(1.0))
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(state["frozen"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    flat0 = dict(nnx.to_flat_state(params0))
    for path, v in nnx.to_flat_state(state["params"]):
        assert np.any(np.asarray(v.get_value()) != flat0[path].get_value()), path
    # Trainable: perceiver, cross-attention layers, additional embedding rows and head columns.
    paths = {p[0] if p[0] != "blocks" else p[1] for p, _ in nnx.to_flat_state(state["params"])}
    assert paths == {"perceiver_resampler", "gated_cross_attn_layer", "embed_tokens", "lm_head"}
    assert {p[-1] for p, _ in nnx.to_flat_state(state["params"]) if p[0] in ("embed_tokens", "lm_head")} == {
        "additional_embedding",
        "additional_fc",
    }
    # Adam's moments mirror exactly the trainable leaves.
    n_trainable = len(jax.tree.leaves(state["params"]))
    opt_leaves = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert len(opt_leaves) == 2 * n_trainable


def test_frozen_weights_can_have_their_own_layout_and_dtype():
    from configs import common

    config = tiny()
    config.model.freeze_text_layers = True
    config.model.freeze_vision_layers = True
    config.train.frozen_sharding_rules = common.without_fsdp()
    config.train.frozen_dtype = "bfloat16"
    lay = state_lib.layout(config, sharding.make_mesh(config.mesh))
    spec_of = lambda tree, *path: dict(nnx.to_flat_state(tree))[path].get_value().spec
    # Frozen LLaMA weights: tensor-parallel only, never FSDP-gathered; trainable ones keep FSDP.
    assert spec_of(
        lay.shardings["frozen"], "blocks", "layers", "self_attn", "q_proj", "kernel"
    ) == jax.sharding.PartitionSpec(None, None, None, "tensor")
    assert spec_of(
        lay.shardings["params"], "blocks", "gated_cross_attn_layer", "cross_attn", "q_proj", "kernel"
    ) == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    state = state_lib.init(lay, 0)
    assert {x.dtype for x in jax.tree.leaves(state["frozen"])} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}


def test_resume_refuses_a_changed_data_order_or_model(tmp_path):
    train(tiny(steps=2, checkpoint_every=2, log_every=100), str(tmp_path))
    changed = tiny(steps=3, checkpoint_every=2, log_every=100)
    changed.data.seed = 7
    changed.data.mixture_block_rows = 3
    with pytest.raises(
        ValueError, match=r"data order would change \(data.mixture_block_rows: \d+ → 3, data.seed: 0 → 7\)"
    ):
        train(changed, str(tmp_path))
    other = tiny(steps=3)
    other.model.rms_norm_eps = 1e-5
    with pytest.raises(ValueError, match=r"model differs from config.model in rms_norm_eps: 1e-06 → 1e-05"):
        train(other, str(tmp_path))


def test_train_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"train.guards.spike_action='rollbak'"):
        train(tiny(**{"guards.spike_action": "rollbak"}), str(tmp_path))
    with pytest.raises(ValueError, match=r"train.log_every=0"):
        train(tiny(log_every=0), str(tmp_path))


def test_too_many_spikes_in_a_row_stop_the_run(tmp_path):
    from idefics_jax.train.loop import TrainingStopped

    with pytest.raises(TrainingStopped, match="2 steps in a row were loss spikes"):
        train(
            tiny(
                steps=10,
                checkpoint_every=100,
                log_every=100,
                **{
                    "debug.loss_scale_at_steps": [[4, 1000.0], [5, 1000.0]],
                    "guards.spike_window": 3,
                    "guards.spike_sigmas": 100.0,
                    "guards.max_spikes_in_a_row": 2,
                },
            ),
            str(tmp_path),
        )
