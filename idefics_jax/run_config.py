"""The run config: one loader, one schema, parsed once.

A config file (configs/*.py) defines `get_config()` returning an `ml_collections.ConfigDict` with
sections `model` (the fields of `IdeficsConfig`), `mesh`, `sharding_rules`, `data`, `eval_data`,
`train`, `seed`, `workdir` (configs/common.py builds the skeleton).

- `load(path, overrides)` reads a config file and applies `a.b=v` overrides: the loader of the
  trainer, the plan, the converters and the tests (the CLIs' `--config` flag is `define_flag`, the
  same machinery).
- `SCHEMA` states every field of `train`, `data` and `mesh` with its type and range, in one style;
  `problems(config)` lists everything wrong at once (unknown, missing, wrong type, out of range),
  each naming the field, the value and what is allowed.
- `parse(config)` validates all of it, builds the `IdeficsConfig` once and returns a `Run`; the
  library works from a `Run` and never re-checks or re-casts config fields.

This module imports neither JAX nor Flax: the data pipeline's worker processes use `check_data`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from idefics_jax.config import DTYPES, IdeficsConfig
from idefics_jax.errors import UserError


class ConfigError(UserError):
    """A config that cannot run; `problems` lists each wrong field (the message joins them)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One field's contract: `ok(value)` must hold; `expected` says what is allowed, in words.
    `custom(value, where) -> problems` replaces `ok` for structured fields (datasets, ranges)."""

    expected: str
    ok: Callable[[Any], bool] = lambda v: True
    custom: Callable[[Any, str], list[str]] | None = None

    def problems(self, value: Any, where: str) -> list[str]:
        if self.custom is not None:
            return self.custom(value, where)
        try:
            good = self.ok(value)
        except TypeError:
            good = False
        return [] if good else [f"{where}={value!r}: expected {self.expected}"]


def _is_section(v: Any) -> bool:
    return isinstance(v, (Mapping, ml_collections.ConfigDict))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int) -> Rule:
    """An int >= lo."""
    return Rule(f"an int >= {lo}", lambda v: _is_int(v) and v >= lo)


def number(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = True) -> Rule:
    """A finite number in the interval [lo, hi) (brackets as given by lo_open / hi_open)."""
    text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def ok(v):
        if not _is_num(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return Rule(text, ok)


def choice(*values: Any) -> Rule:
    """One of `values`."""
    return Rule(f"one of {', '.join(map(repr, values))}", lambda v: v in values)


def optional(rule: Rule) -> Rule:
    """None, or what `rule` allows."""
    return Rule(f"None or {rule.expected}", lambda v: v is None or rule.ok(v))


BOOL = Rule("a bool", lambda v: isinstance(v, bool))
STRING = Rule("a string", lambda v: isinstance(v, str))


def _datasets(value: Any, where: str) -> list[str]:
    if not _is_section(value) or not value:
        return [f"{where}: empty; expected name → {{kind, paths, weight}}"]
    from idefics_jax.data.formats import KINDS

    out = []
    for name, ds in value.items():
        at = f"{where}.{name}"
        known = {"kind", "paths", "weight", "root", "examples_per_row"}
        out += [f"{at}.{k}: unknown field; expected one of {sorted(known)}" for k in ds if k not in known]
        rules = {
            "kind": choice(*KINDS),
            "paths": Rule("a non-empty glob string", lambda v: isinstance(v, str) and bool(v)),
            "weight": number(0, lo_open=True),
        }
        for k, rule in rules.items():
            out += rule.problems(ds.get(k), f"{at}.{k}")
        out += STRING.problems(ds.get("root", ""), f"{at}.root")
        out += integer(0).problems(ds.get("examples_per_row", 0), f"{at}.examples_per_row")
    return out


def _skip_ranges(value: Any, where: str) -> list[str]:
    prev = -1
    for r in value:
        if len(r) != 2 or not all(_is_int(x) for x in r) or not (0 <= r[0] < r[1]) or r[0] < prev:
            return [f"{where}={list(value)!r}: expected sorted, non-overlapping [start, stop) ranges with start < stop"]
        prev = r[1]
    return []


def _scale_pairs(value: Any, where: str) -> list[str]:
    ok = all(len(p) == 2 and _is_int(p[0]) and isinstance(p[1], (int, float)) for p in value)
    return [] if ok else [f"{where}={list(value)!r}: expected a list of [data step, scale] pairs"]


def _mesh_sizes(value: Any, where: str) -> list[str]:
    from idefics_jax.sharding import MESH_AXES

    out = [f"{where}.{k}: unknown mesh axis; expected {MESH_AXES}" for k in value if k not in MESH_AXES]
    sizes = {a: value.get(a, 1) for a in MESH_AXES}
    for a, s in sizes.items():
        if not _is_int(s) or s == 0 or s < -1:
            out.append(f"{where}.{a}={s!r}: expected a positive int or -1 (the remaining devices)")
    if sum(s == -1 for s in sizes.values()) > 1:
        out.append(f"{where}: only one axis may be -1, got {sizes}")
    return out


def _eval_tasks(value: Any, where: str) -> list[str]:
    from idefics_jax.eval.tasks import TASKS

    if not isinstance(value, (list, tuple)):
        return [f"{where}={value!r}: expected a list of {{task, data, shots, num_samples, every}}"]
    out = []
    rules = {
        "task": choice(*TASKS),
        "data": Rule("a data directory", lambda v: isinstance(v, str) and bool(v)),
        "shots": Rule("a non-empty list of ints >= 0", lambda v: bool(v) and all(_is_int(x) and x >= 0 for x in v)),
        "num_samples": integer(1),
        "every": integer(1),
    }
    for i, t in enumerate(value):
        at = f"{where}[{i}]"
        if not _is_section(t):
            out.append(f"{at}={t!r}: expected {{task, data, shots, num_samples, every}}")
            continue
        out += [f"{at}.{k}: unknown field; expected one of {sorted(rules)}" for k in t if k not in rules]
        for k, rule in rules.items():
            out += rule.problems(t.get(k), f"{at}.{k}")
    return out


def _tokenizer_dir(value: Any, where: str) -> list[str]:
    if isinstance(value, str) and os.path.isdir(value):
        return []
    return [f"{where}={value!r}: expected an existing tokenizer directory"]


DATA_SCHEMA: dict[str, Rule] = {
    "datasets": Rule("name → {kind, paths, weight}", custom=_datasets),
    "tokenizer_path": Rule("a tokenizer directory", lambda v: isinstance(v, str) and bool(v)),
    "seq_len": integer(8),
    "max_num_images": integer(1),
    "image_size": integer(1),
    "global_batch_size": integer(1),
    "seed": integer(0),
    "worker_count": integer(0),
    "read_threads": integer(1),
    "prefetch_batches": integer(1),
    "skip_steps": Rule("[start, stop) ranges", custom=_skip_ranges),
    "max_skip_fraction": number(0, 1, lo_open=True, hi_open=False),
    "skip_check_min_examples": integer(1),
    "image_tokens_are_targets": BOOL,
    "use_segment_ids": BOOL,
    "max_image_pixels": integer(1),
    "min_image_side": integer(1),
    "mixture_block_rows": integer(1),
}

TRAIN_SCHEMA: dict[str, Rule] = {
    "steps": integer(1),
    "micro_batches": integer(1),
    "z_loss": number(0),
    "init_from": optional(STRING),
    "frozen_dtype": optional(choice(*DTYPES)),
    "frozen_sharding_rules": Rule("None or ((logical, mesh axes), ...)", lambda v: v is None or isinstance(v, tuple)),
    "trainable_layout": choice("fsdp", "zero1"),
    "optimizer.lr": number(0, lo_open=True),
    "optimizer.end_lr": number(0),
    "optimizer.warmup_steps": integer(0),
    "optimizer.decay_steps": integer(1),
    "optimizer.b1": number(0, 1),
    "optimizer.b2": number(0, 1),
    "optimizer.eps": number(0, lo_open=True),
    "optimizer.weight_decay": number(0),
    "optimizer.clip_norm": number(0),  # 0 = off (a command line cannot set a float field to None)
    "checkpoint_every": integer(1),
    "keep_checkpoints": integer(1),
    "keep_period": integer(0),
    "async_checkpointing": BOOL,
    "lock_stale_after_s": number(0, lo_open=True),
    "eval_every": integer(0),
    "eval_steps": integer(1),
    "eval_tasks": Rule("[{task, data, shots, num_samples, every}, ...]", custom=_eval_tasks),
    "log_every": integer(1),
    "peak_flops_per_device": number(0, lo_open=True),
    "guards.max_nonfinite_in_a_row": integer(1),
    "guards.max_spikes_in_a_row": integer(1),
    "guards.spike_action": choice("none", "skip", "rollback"),
    "guards.spike_window": integer(1),
    "guards.spike_sigmas": number(0, lo_open=True),
    "guards.rollback_skip_steps": integer(1),
    "guards.max_rollbacks": integer(1),
    "debug.loss_scale_at_steps": Rule("[[data step, scale], ...]", custom=_scale_pairs),
}


def _flatten(cfg: Mapping[str, Any], schema: Mapping[str, Rule], prefix: str = "") -> dict[str, Any]:
    """Dotted leaf names → values; a nested section is descended only where the schema has
    dotted names under it (so `datasets` stays one structured value)."""
    out = {}
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if _is_section(v) and any(s.startswith(name + ".") for s in schema):
            out.update(_flatten(v, schema, name + "."))
        else:
            out[name] = v
    return out


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def section_problems(cfg: Mapping[str, Any] | None, schema: Mapping[str, Rule], where: str) -> list[str]:
    """Everything wrong with one config section against its schema: unknown, missing and bad fields."""
    if cfg is None:
        return [f"{where}: missing section"]
    flat = _flatten(cfg, schema)
    out = [f"{where}.{k}: unknown field{_did_you_mean(k, schema)}" for k in flat if k not in schema]
    for name, rule in schema.items():
        if name not in flat:
            out.append(f"{where}.{name}: missing ({rule.expected})")
        else:
            out += rule.problems(flat[name], f"{where}.{name}")
    return out


def _data_problems(cfg: Mapping[str, Any] | None, where: str, files: bool) -> list[str]:
    out = section_problems(cfg, DATA_SCHEMA, where)
    if files and cfg is not None and not out:
        out += _tokenizer_dir(cfg["tokenizer_path"], f"{where}.tokenizer_path")
    return out


def check_data(cfg: Mapping[str, Any], where: str = "data") -> None:
    """Raises ConfigError listing every problem of a `data` section, the tokenizer directory's
    existence included (the pipeline calls this)."""
    found = _data_problems(cfg, where, files=True)
    if found:
        raise ConfigError(found)


def problems(config: ml_collections.ConfigDict, files: bool = True) -> list[str]:
    """Every problem of a full run config: train, data, eval_data, mesh, sharding rules, model, seed.
    `files`: also check that the files the data sections name exist (off for the plan, which
    compiles a config for a cluster on a machine that does not hold its data)."""
    from idefics_jax import sharding

    out = section_problems(config.get("train"), TRAIN_SCHEMA, "train")
    out += _data_problems(config.get("data"), "data", files)
    if config.get("eval_data") is not None:
        out += _data_problems(config.eval_data, "eval_data", files)
    out += _mesh_sizes(config.get("mesh") or {}, "mesh")
    out += integer(0).problems(config.get("seed"), "seed")
    tables = {
        "sharding_rules": config.get("sharding_rules"),
        "train.frozen_sharding_rules": (config.get("train") or {}).get("frozen_sharding_rules"),
    }
    for name, rules in tables.items():
        if rules is not None:
            try:
                sharding.rules_from_config(rules)
            except ValueError as e:
                out.append(f"{name}: {e}")
    try:
        IdeficsConfig.from_dict(config.get("model") or {})
    except (ValueError, TypeError) as e:
        out.append(f"model: {e}")
    tc = config.get("train") or {}
    opt = tc.get("optimizer") or {}
    if _is_int(opt.get("warmup_steps")) and _is_int(opt.get("decay_steps")) and opt.warmup_steps > opt.decay_steps:
        out.append(
            f"train.optimizer.warmup_steps={opt.warmup_steps} > train.optimizer.decay_steps={opt.decay_steps}: "
            "expected warmup to end before the decay does"
        )
    return out


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'field: saved → current' for every (nested) field that differs between two config dicts
    (lists and tuples with equal items are equal: JSON round trips turn one into the other)."""
    out = []
    for k in sorted(set(saved) | set(current)):
        x, y = saved.get(k), current.get(k)
        if _is_section(x) and _is_section(y):
            out += differences(x, y, f"{prefix}{k}.")
        elif x != y and not (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and list(x) == list(y)):
            out.append(f"{prefix}{k}: {x!r} → {y!r}")
    return out


@dataclasses.dataclass(frozen=True)
class Run:
    """A validated run config. `config` is the ConfigDict as loaded (sections train, data, eval_data,
    mesh, sharding_rules, seed, workdir); `model` its `model` section parsed once."""

    config: ml_collections.ConfigDict
    model: IdeficsConfig

    @property
    def train(self) -> ml_collections.ConfigDict:
        return self.config.train

    @property
    def data(self) -> ml_collections.ConfigDict:
        return self.config.data


def parse(config: ml_collections.ConfigDict | Run, files: bool = True) -> Run:
    """Validates `config` (every problem at once, as ConfigError; `files` as in `problems`) and
    returns it as a `Run`."""
    if isinstance(config, Run):
        return config
    found = problems(config, files)
    if found:
        raise ConfigError(found)
    return Run(config, IdeficsConfig.from_dict(config.model))


def define_flag(name: str = "config", default: str | None = None, flag_values: Any = None, sys_argv: Any = None):
    """The `--config FILE [--config.a.b=v ...]` absl flag (ml_collections' config file flag), reading
    `sys_argv` (default: sys.argv) for the overrides."""
    from absl import flags
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file(
        name,
        default,
        "Config file (configs/*.py); override fields with --config.a.b=v.",
        flag_values=flags.FLAGS if flag_values is None else flag_values,
        lock_config=False,
        sys_argv=sys_argv,
    )


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`, with `overrides` ("a.b=v", as on the command
    line) applied. Raises ConfigError naming the file or the field when either is wrong."""
    from absl import flags

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError([f"config file {path!r}: not found"])
    argv = ["load", f"--config={path}", *[f"--config.{o}" for o in overrides]]
    fv = flags.FlagValues()
    define_flag(flag_values=fv, sys_argv=argv)
    try:
        fv(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        unknown = [p for o in overrides if (p := _unknown_field(load(path), o.split("=", 1)[0]))] if overrides else []
        if unknown:
            raise ConfigError([f"config {path}: {p}" for p in unknown]) from None
        detail = " ".join(str(e).split())
        raise ConfigError([f"config {path}: {detail}"]) from None
    return fv.config


def _unknown_field(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """'override a.b.c: no field c in a.b (did you mean …?)' when `dotted` names no field of `config`."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        if not _is_section(node) or part not in node:
            where = ".".join(parts[:i]) or "the config"
            known = list(node.keys()) if _is_section(node) else []
            return f"override {dotted}: no field {part!r} in {where}{_did_you_mean(part, known)}"
        node = node[part]
    return None
