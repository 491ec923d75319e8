"""The training loop: start or resume, step, guard, log, evaluate, checkpoint, stop cleanly.

One code path for configs/tiny.py on one CPU device and configs/80b.py on 512 GPUs.
"""

from __future__ import annotations

import collections
import logging
import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from idefics_jax import ckpt_format as fmt
from idefics_jax import data as data_lib
from idefics_jax import sharding
from idefics_jax.config import IdeficsConfig
from idefics_jax.train import state as state_lib
from idefics_jax.train.checkpointer import Checkpointer
from idefics_jax.train.metrics import Writer, model_flops_per_step
from idefics_jax.train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps or rollbacks); the message says why."""


class Guards:
    """Host-side guard state: the loss window for spike detection, the run of non-finite steps,
    counters and the data ranges skipped by rollbacks. Saved in every checkpoint (JSON)."""

    def __init__(self, cfg: ml_collections.ConfigDict, saved: dict | None = None):
        self.cfg = cfg
        saved = saved or {}
        self.window = collections.deque(saved.get("window", []), maxlen=int(cfg.spike_window))
        self.nonfinite_run = int(saved.get("nonfinite_run", 0))
        self.spike_run = int(saved.get("spike_run", 0))
        self.counts = {
            k: int(saved.get("counts", {}).get(k, 0))
            for k in ("nonfinite_steps", "spike_steps", "rollbacks", "skipped_data_steps")
        }
        self.rollback_skips = [list(map(int, r)) for r in saved.get("rollback_skips", [])]

    def threshold(self) -> float:
        """Loss above which a step counts as a spike: mean + k·σ of the window (inf until it is full)."""
        if self.cfg.spike_action == "none" or len(self.window) < self.window.maxlen:
            return math.inf
        w = np.asarray(self.window, np.float64)
        return float(w.mean() + self.cfg.spike_sigmas * w.std())

    def observe(self, loss: float, nonfinite: bool, spike: bool) -> None:
        """Takes one step's outcome; raises TrainingStopped after too many bad steps in a row."""
        if nonfinite:
            self.nonfinite_run += 1
            self.counts["nonfinite_steps"] += 1
            if self.nonfinite_run >= self.cfg.max_nonfinite_in_a_row:
                raise TrainingStopped(
                    f"{self.nonfinite_run} steps in a row had a non-finite loss or gradient "
                    f"(train.guards.max_nonfinite_in_a_row={self.cfg.max_nonfinite_in_a_row}); stopping. "
                    "The last checkpoint is intact; lower the learning rate or skip the data range "
                    "(data.skip_steps) and restart."
                )
            return
        self.nonfinite_run = 0
        if spike:
            self.counts["spike_steps"] += 1
            self.spike_run += 1
            if self.spike_run >= self.cfg.max_spikes_in_a_row:
                raise TrainingStopped(
                    f"{self.spike_run} steps in a row were loss spikes (train.guards.max_spikes_in_a_row="
                    f"{self.cfg.max_spikes_in_a_row}); the loss level has moved away from the window "
                    f"(mean + {self.cfg.spike_sigmas}σ of the last {self.cfg.spike_window} losses). "
                    "Stopping rather than skipping every update; restart with a larger spike_sigmas, or "
                    "roll back past the data (data.skip_steps)."
                )
        else:
            self.spike_run = 0
            self.window.append(loss)

    def state(self) -> dict:
        return {
            "window": list(self.window),
            "nonfinite_run": self.nonfinite_run,
            "spike_run": self.spike_run,
            "counts": dict(self.counts),
            "rollback_skips": self.rollback_skips,
        }

    def rolled_back(self, saved: dict, skip: list[int]) -> None:
        """Back to a checkpoint's window and run; counters keep counting; `skip` joins the skips."""
        self.window = collections.deque(saved.get("window", []), maxlen=self.window.maxlen)
        self.nonfinite_run = int(saved.get("nonfinite_run", 0))
        self.counts["rollbacks"] += 1
        self.counts["skipped_data_steps"] += skip[1] - skip[0]
        self.rollback_skips = self.rollback_skips + [skip]


def _all_agree_to_stop(local: bool) -> bool:
    """Whether any process got SIGTERM: every process must stop at the same step, or the ones that
    go on would wait forever in the next step's collectives while the others save."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(local))))


def _data_config(base: ml_collections.ConfigDict, extra_skips: list[list[int]]) -> ml_collections.ConfigDict:
    """`base` with the rollback skips joined to its skip_steps, overlapping ranges merged."""
    merged: list[list[int]] = []
    for a, b in sorted([list(map(int, r)) for r in base.skip_steps] + [list(r) for r in extra_skips]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    cfg = ml_collections.ConfigDict(base.to_dict())
    cfg.skip_steps = merged
    return cfg


def validate(tc: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `train` field that is out of range."""
    for name in ("steps", "micro_batches", "checkpoint_every", "keep_checkpoints", "log_every", "eval_steps"):
        if int(tc[name]) < 1:
            raise ValueError(f"train.{name}={tc[name]!r}; expected an int >= 1")
    for name in ("keep_period", "eval_every"):
        if int(tc[name]) < 0:
            raise ValueError(f"train.{name}={tc[name]!r}; expected an int >= 0 (0 = off)")
    g = tc.guards
    if g.spike_action not in ("none", "skip", "rollback"):
        raise ValueError(f"train.guards.spike_action={g.spike_action!r}; expected 'none', 'skip' or 'rollback'")
    for name in ("max_nonfinite_in_a_row", "max_spikes_in_a_row", "spike_window", "max_rollbacks"):
        if int(g[name]) < 1:
            raise ValueError(f"train.guards.{name}={g[name]!r}; expected an int >= 1")


def _global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's rows → global arrays sharded over the 'batch' logical axis."""
    out = {}
    for k, v in local.items():
        spec = sharding.logical_to_spec(("batch",) + (None,) * (v.ndim - 1))
        # The global shape makes JAX check that the processes' rows really tile the batch axes.
        out[k] = jax.make_array_from_process_local_data(
            NamedSharding(mesh, spec), v, (v.shape[0] * jax.process_count(), *v.shape[1:])
        )
    return out


def _loss_scales(cfg: ml_collections.ConfigDict) -> dict[int, float]:
    return {int(s): float(v) for s, v in cfg.debug.loss_scale_at_steps}


# Model fields that change how the function is computed or trained, not which function it is.
_NOT_ARCHITECTURE = (
    "dtype",
    "param_dtype",
    "remat",
    "freeze_text_layers",
    "freeze_vision_layers",
    "freeze_lm_head",
    "freeze_text_module_exceptions",
    "freeze_vision_module_exceptions",
)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """'field: a → b' for every (nested) field that differs between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y and not (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and list(x) == list(y)):
            out.append(f"{prefix}{k}: {x!r} → {y!r}")
    return out


def _check_same_model(path: str, saved: dict, ours: IdeficsConfig, what: str) -> None:
    theirs = IdeficsConfig.from_dict(saved["model"]).replace(**{k: getattr(ours, k) for k in _NOT_ARCHITECTURE})
    diff = _differences(theirs.to_dict(), ours.to_dict())
    if diff:
        raise ValueError(f"{what}={path}: its model differs from config.model in {', '.join(diff)}")


def _init_from(path: str, lay: state_lib.Layout):
    """Full params from a converted (or any) checkpoint whose model architecture equals ours."""
    step, saved = fmt.read_config(path)
    _check_same_model(path, saved, lay.model_config, "train.init_from")
    return fmt.restore_params(path, lay.abstract_params(), step, lay.params_shardings()), step


def _check_resumable(directory: str, step: int, config: ml_collections.ConfigDict, lay: state_lib.Layout) -> None:
    """Refuses to resume a run whose model or data order the config changed (the resume would not
    be the same run); the message names the fields."""
    _, saved = fmt.read_config(directory, step)
    _check_same_model(directory, saved, lay.model_config, "resuming from")
    keys = ("seed", "global_batch_size", "seq_len", "max_num_images", "datasets")
    diff = _differences(
        {k: saved.get("data", {}).get(k) for k in keys}, {k: config.data.to_dict().get(k) for k in keys}, "data."
    )
    if diff:
        raise ValueError(
            f"resuming from {directory} step {step}: the data order would change "
            f"({', '.join(diff)}); use a new --workdir, or restore these values"
        )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) training in `workdir`; returns a summary {final_step, last_loss, ...}."""
    tc = config.train
    validate(tc)
    mesh = sharding.make_mesh(config.mesh)
    lay = state_lib.layout(config, mesh)
    writer = Writer(workdir)
    ckpt = Checkpointer(workdir, tc)
    gbs = int(config.data.global_batch_size)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if gbs % tc.micro_batches or (gbs // tc.micro_batches) % shards:
        raise ValueError(
            f"data.global_batch_size={gbs} must split into train.micro_batches={tc.micro_batches} "
            f"micro-batches each divisible by the data×fsdp devices ({shards})"
        )

    latest = ckpt.latest_step()
    meta: dict = {}
    with jax.set_mesh(mesh), sharding.use_rules(lay.rules):
        if latest is not None:
            _check_resumable(ckpt.directory, latest, config, lay)
            state, meta = ckpt.restore(latest, lay)
            lr = float(lay.lr(meta["updates"]))
            writer.console(
                f"resumed from checkpoint step {latest} in {ckpt.directory} "
                f"(updates applied {meta['updates']}, learning rate {lr:.3e}, "
                f"data step {meta['data']['step']})"
            )
        elif tc.init_from:
            params, src_step = _init_from(tc.init_from, lay)
            state = state_lib.init(lay, config.seed, params)
            writer.console(f"initialised from {tc.init_from} (step {src_step})")
        else:
            state = state_lib.init(lay, config.seed)
            writer.console(f"initialised at random (seed {config.seed})")

    guards = Guards(tc.guards, meta.get("guards"))
    pipe = data_lib.pipeline(_data_config(config.data, guards.rollback_skips), jax.process_index(), jax.process_count())
    if meta:
        pipe.restore(meta["data"])
    names = pipe.dataset_names
    train_step = make_train_step(lay, float(tc.z_loss), int(tc.micro_batches), len(names))
    eval_step = eval_pipe = None
    if config.get("eval_data") is not None and tc.eval_every:
        eval_pipe = data_lib.pipeline(config.eval_data, jax.process_index(), jax.process_count())
        eval_step = make_eval_step(lay, len(eval_pipe.dataset_names))

    flops = model_flops_per_step(lay.model_config, gbs, int(config.data.seq_len), int(config.data.max_num_images))
    peak = float(tc.peak_flops_per_device) * jax.device_count()
    scales = _loss_scales(tc)
    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    def train_state_json(step: int, updates: int) -> dict:
        return {
            "step": step,
            "updates": updates,
            "data": pipe.state(),
            "guards": guards.state(),
            "seed": int(config.seed),
        }

    step = saved = int(meta.get("step", 0))
    last: dict[str, Any] = {}
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            local = next(pipe)
            t_data = time.perf_counter() - t0
            with jax.set_mesh(mesh), sharding.use_rules(lay.rules):
                batch = _global_batch(local, mesh)
                state, m = train_step(
                    state, batch, jnp.float32(guards.threshold()), jnp.float32(scales.get(pipe.data_step(step), 1.0))
                )
                m = jax.device_get(m)
            step += 1
            dt = time.perf_counter() - t0
            loss = float(m["loss"])
            guards.observe(loss, bool(m["nonfinite"]), bool(m["spike"]))
            if bool(m["spike"]) and tc.guards.spike_action == "rollback":
                rolled = _rollback(ckpt, lay, guards, pipe, tc, step, writer)
                if rolled is not None:
                    state, step, data_state = rolled
                    pipe.close()
                    pipe = data_lib.pipeline(
                        _data_config(config.data, guards.rollback_skips), jax.process_index(), jax.process_count()
                    )
                    pipe.restore(data_state)
                    continue
            images = int(local["image_attention_mask"].any(axis=1).sum()) * jax.process_count()
            real = int(local["attention_mask"].sum()) * jax.process_count()
            last = {
                "loss": loss,
                "z_loss": float(m["z_loss"]),
                "grad_norm": float(m["grad_norm"]),
                "lr": float(m["lr"]),
                "step_time": dt,
                "data_time": t_data,
                "tokens_per_s": real / dt,
                "images_per_s": images / dt,
                "mfu": flops / dt / peak,
                "applied": bool(m["applied"]),
                "guards": dict(guards.counts),
                "loss_by_dataset": {
                    n: float(m["ds_loss_sum"][i] / m["ds_tokens"][i])
                    for i, n in enumerate(names)
                    if m["ds_tokens"][i] > 0
                },
            }
            if step % tc.log_every == 0 or step == tc.steps:
                last["data"] = pipe.counters()
                writer.console(
                    f"step {step}/{tc.steps} | loss {loss:.4f} | lr {last['lr']:.2e} | "
                    f"grad norm {last['grad_norm']:.3f} | {last['tokens_per_s']:.0f} tok/s | "
                    f"{last['images_per_s']:.0f} img/s | mfu {100 * last['mfu']:.1f}% | "
                    f"skipped {guards.counts['nonfinite_steps'] + guards.counts['spike_steps']}"
                )
            writer.write(step, last)
            if eval_step is not None and step % tc.eval_every == 0:
                ev = _evaluate(eval_step, eval_pipe, state, mesh, lay, int(tc.eval_steps))
                writer.write(step, {"eval": ev})
                writer.console(f"eval at step {step} | held-out loss {ev['loss']:.4f} over {tc.eval_steps} batches")
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                ckpt.save(step, state, train_state_json(step, int(state["updates"])), config)
                saved = step
            if _all_agree_to_stop(stop["signal"] is not None):
                if saved != step:
                    ckpt.save(step, state, train_state_json(step, int(state["updates"])), config)
                ckpt.wait()
                writer.console(f"received signal {stop['signal']}: saved checkpoint at step {step}, exiting")
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        ckpt.close()
        pipe.close()
        writer.close()
    return {
        "final_step": step,
        "last_loss": last.get("loss"),
        "checkpoints": ckpt.all_steps(),
        "stopped_by_signal": stop["signal"] is not None,
    }


def _evaluate(eval_step, pipe, state, mesh, lay, steps: int) -> dict[str, Any]:
    tot = ds_loss = ds_tok = loss = 0.0
    for i in range(steps):
        with jax.set_mesh(mesh), sharding.use_rules(lay.rules):
            m = jax.device_get(eval_step(state, _global_batch(pipe.batch(i), mesh)))
        loss, tot = loss + float(m["loss_sum"]), tot + float(m["tokens"])
        ds_loss, ds_tok = ds_loss + m["ds_loss_sum"], ds_tok + m["ds_tokens"]
    out = {"loss": loss / max(tot, 1.0)}
    out.update({f"loss/{n}": float(ds_loss[i] / ds_tok[i]) for i, n in enumerate(pipe.dataset_names) if ds_tok[i] > 0})
    return out


def _rollback(ckpt: Checkpointer, lay, guards: Guards, pipe, tc, step: int, writer):
    """Loss spike with spike_action='rollback': back to the newest checkpoint and skip data.

    The data skipped starts at the checkpoint's data step and covers `rollback_skip_steps` steps, and
    at least through the spiking batch, so the replay never sees it again. Returns (state, step,
    data state) of the checkpoint, or None when there is no checkpoint yet (the spiking update was
    skipped in the step; training goes on).
    """
    ckpt.wait()
    target = ckpt.latest_step()
    if target is None:
        writer.console(f"loss spike at step {step}: no checkpoint to roll back to yet; the update was skipped")
        return None
    if guards.counts["rollbacks"] >= tc.guards.max_rollbacks:
        raise TrainingStopped(
            f"loss spike at step {step} after {guards.counts['rollbacks']} rollbacks "
            f"(train.guards.max_rollbacks={tc.guards.max_rollbacks}); stopping"
        )
    spiking_data_step = pipe.data_step(step - 1)
    with jax.set_mesh(lay.mesh), sharding.use_rules(lay.rules):
        state, meta = ckpt.restore(target, lay)
    start = pipe.data_step(int(meta["data"]["step"]))
    skip = [start, max(start + int(tc.guards.rollback_skip_steps), spiking_data_step + 1)]
    guards.rolled_back(meta["guards"], skip)
    writer.console(
        f"loss spike at step {step} (above mean + {tc.guards.spike_sigmas}σ of the last "
        f"{tc.guards.spike_window} losses): rolled back to checkpoint step {target}; skipping "
        f"data steps [{skip[0]}, {skip[1]})"
    )
    return state, int(meta["step"]), meta["data"]
