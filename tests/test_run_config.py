"""run_config: one loader and one schema; every problem of a config reported at once."""

import jax.numpy as jnp
import optax
import pytest
from testlib import load_config

from idefics_jax import run_config
from idefics_jax.train import state as state_lib


def test_every_shipped_config_parses():
    for name in ("tiny", "9b", "80b"):
        run = run_config.parse(load_config(name), files=name == "tiny")
        assert run.model.num_hidden_layers > 0


def test_all_problems_at_once_each_naming_field_value_and_range():
    c = load_config("tiny")
    c.train.optimizer.lr = -1.0
    c.train.optimizer.end_lr = -0.1
    c.train.optimizer.b1 = 1.0
    c.train.optimizer.eps = 0.0
    c.train.optimizer.warmup_steps = -5
    c.train.steps = 0
    c.train.optimizer.clip_norm = -1.0
    c.data.global_batch_size = 0
    c.train.trainable_layout = "zero3"
    c.train.lerning_rate = 1.0
    with pytest.raises(run_config.ConfigError) as e:
        run_config.parse(c)
    found = "\n".join(e.value.problems)
    for expected in (
        "train.optimizer.lr=-1.0: expected a number in (0, inf)",
        "train.optimizer.end_lr=-0.1: expected a number in [0, inf)",
        "train.optimizer.b1=1.0: expected a number in [0, 1)",
        "train.optimizer.eps=0.0: expected a number in (0, inf)",
        "train.optimizer.warmup_steps=-5",
        "train.steps=0",
        "train.optimizer.clip_norm=-1.0",
        "data.global_batch_size=0",
        "train.trainable_layout='zero3': expected one of 'fsdp', 'zero1'",
        "train.lerning_rate: unknown field",
    ):
        assert expected in found, (expected, found)


def test_clip_norm_0_turns_clipping_off():
    c = load_config("tiny", "train.optimizer.clip_norm=0", "train.optimizer.weight_decay=0", "train.optimizer.eps=1.0")
    opt = run_config.parse(c).train.optimizer
    grads = {"w": jnp.full((4,), 1e6)}
    params = {"w": jnp.zeros(4)}
    for clip_norm, same_as_plain_adamw in ((0.0, True), (1.0, False)):
        opt.clip_norm = clip_norm
        tx = state_lib.optimizer(opt, lambda _: 1.0, {"w": True})
        update, _ = tx.update(grads, tx.init(params), params)
        plain, _ = optax.adamw(1.0, opt.b1, opt.b2, opt.eps, weight_decay=0.0).update(grads, tx.init(params)[1], params)
        assert bool(jnp.allclose(update["w"], plain["w"])) == same_as_plain_adamw


def test_a_missing_tokenizer_or_data_file_is_named():
    c = load_config("tiny")
    c.data.tokenizer_path = "/nonexistent/tokenizer"
    with pytest.raises(
        run_config.ConfigError, match=r"data.tokenizer_path='/nonexistent/tokenizer': expected an existing"
    ):
        run_config.parse(c)


def test_load_names_the_file_and_a_mistyped_override():
    with pytest.raises(run_config.ConfigError, match=r"config file 'nope.py': not found"):
        run_config.load("nope.py")
    with pytest.raises(
        run_config.ConfigError, match=r"override train.stepz: no field 'stepz' in train \(did you mean 'steps'"
    ):
        load_config("tiny", "train.stepz=3")
    with pytest.raises(run_config.ConfigError, match=r"could not convert string to float: 'fast'"):
        load_config("tiny", "train.optimizer.lr=fast")


def test_differences_names_nested_fields_and_treats_lists_and_tuples_alike():
    saved = {"seed": 0, "datasets": {"a": {"weight": 1.0}}, "skip": [1, 2]}
    now = {"seed": 7, "datasets": {"a": {"weight": 0.5}}, "skip": (1, 2)}
    assert run_config.differences(saved, now, "data.") == ["data.datasets.a.weight: 1.0 → 0.5", "data.seed: 0 → 7"]
