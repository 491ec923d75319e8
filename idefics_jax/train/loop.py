"""The training loop: start or resume, step, guard, log, evaluate, checkpoint, stop cleanly.

One code path for configs/tiny.py on one CPU device and configs/80b.py on 512 GPUs. `train` reads
in one screen; each of its parts is a named function or class below it.
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

from idefics_jax import ckpt_format as fmt
from idefics_jax import data as data_lib
from idefics_jax import run_config, sharding
from idefics_jax.config import IdeficsConfig
from idefics_jax.data.pipeline import order_fingerprint
from idefics_jax.data.schema import batch_sharding
from idefics_jax.errors import UserError
from idefics_jax.run_config import Run
from idefics_jax.train import state as state_lib
from idefics_jax.train.checkpointer import Checkpointer
from idefics_jax.train.lock import WorkdirLock, WorkdirLocked
from idefics_jax.train.metrics import Writer, model_flops_per_step
from idefics_jax.train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps or rollbacks); the message says why."""


def train(config: ml_collections.ConfigDict | Run, workdir: str, devices: list | None = None) -> dict[str, Any]:
    """Runs (or resumes) training in `workdir` on `devices` (default: all); returns a summary
    {final_step, last_loss, checkpoints, stopped_by_signal}. The config is validated first: every
    wrong field at once, as ConfigError."""
    run = run_config.parse(config)
    lay = state_lib.layout(run, sharding.make_mesh(run.config.mesh, devices))
    lock = _lock_workdir(workdir, run.train.lock_stale_after_s)
    try:
        return _train(run, lay, workdir, lock)
    finally:
        if lock is not None:
            lock.release()


def _train(run: Run, lay: state_lib.Layout, workdir: str, lock: WorkdirLock | None) -> dict[str, Any]:
    tc = run.train
    writer, ckpt = Writer(workdir), Checkpointer(workdir, tc)
    if lock is not None and lock.took_over is not None:
        writer.console(f"took over the stale workdir lock of {WorkdirLock.describe(lock.took_over)}")
    state, meta = _restore_or_init(run, lay, ckpt, writer)
    guards = Guards(tc.guards, meta.get("guards"))
    pipe = _open_pipeline(run, guards, meta.get("data"))
    train_step = make_train_step(lay, tc.z_loss, tc.micro_batches, len(pipe.dataset_names))
    evaluator = Evaluator.create(run, lay)
    fewshot = FewShot.create(run, lay, writer)
    meter = Meter(run, lay, pipe.dataset_names)
    scales = {s: v for s, v in tc.debug.loss_scale_at_steps}
    stop = SignalStop()
    step = saved = meta.get("step", 0)
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            local = next(pipe)
            t_data = time.perf_counter() - t0
            with lay.activate():
                threshold, scale = jnp.float32(guards.threshold()), jnp.float32(scales.get(pipe.data_step(step), 1.0))
                state, m = train_step(state, global_batch(local, lay.mesh), threshold, scale)
                m = jax.device_get(m)
            step += 1
            guards.observe(float(m["loss"]), bool(m["nonfinite"]), bool(m["spike"]))
            if bool(m["spike"]) and tc.guards.spike_action == "rollback":
                rolled = _rollback(run, lay, ckpt, guards, pipe, step, writer)
                if rolled is not None:
                    state, step, pipe = rolled
                    continue
            record = meter.record(m, local, time.perf_counter() - t0, t_data, guards)
            writer.log_step(
                step, tc.steps, record, pipe.counters if step % tc.log_every == 0 or step == tc.steps else None
            )
            if evaluator is not None and step % tc.eval_every == 0:
                writer.log_eval(step, evaluator(state), tc.eval_steps)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                ckpt.save(step, state, _train_state(run, step, state, pipe, guards), run.config)
                saved = step
            if fewshot is not None:  # after the save: a failing benchmark must not cost the step
                fewshot(step, state, writer)
            ckpt.poll()
            if lock is not None:
                lock.check()
            if stop.agreed():
                if saved != step:
                    ckpt.save(step, state, _train_state(run, step, state, pipe, guards), run.config)
                ckpt.finalize()
                writer.console(f"received signal {stop.signum}: saved checkpoint at step {step}, exiting")
                break
    finally:
        stop.restore()
        pipe.close()
        writer.close()
        ckpt.close()
    return {
        "final_step": step,
        "last_loss": meter.last.get("loss"),
        "checkpoints": ckpt.all_steps(),
        "stopped_by_signal": stop.signum is not None,
    }


# Start: take the workdir, restore the newest verified checkpoint, or initialise ---------------------


def _lock_workdir(workdir: str, stale_after_s: float) -> WorkdirLock | None:
    """Process 0 holds the workdir lock; every process stops when it cannot be had."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir, stale_after_s)
        except WorkdirLocked as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if int(np.max(multihost_utils.process_allgather(np.int32(error is not None)))) and error is None:
            if lock is not None:
                lock.release()
            raise WorkdirLocked(f"{workdir}: process 0 could not take the workdir lock (its log says why)")
    if error is not None:
        raise error
    return lock


def _restore_or_init(run: Run, lay: state_lib.Layout, ckpt: Checkpointer, writer: Writer) -> tuple[dict, dict]:
    """(train state, train_state JSON of the checkpoint, {} when starting fresh)."""
    latest = ckpt.restorable_step(writer.console)
    with lay.activate():
        if latest is not None:
            _check_resumable(ckpt, latest, run, lay)
            state, meta = ckpt.restore(latest, lay)
            writer.console(
                f"resumed from checkpoint step {latest} in {ckpt.directory} (updates applied {meta['updates']}, "
                f"learning rate {float(lay.lr(meta['updates'])):.3e}, data step {meta['data']['step']})"
            )
            return state, meta
        if run.train.init_from:
            params, src_step = _init_from(run.train.init_from, lay)
            writer.console(f"initialised from {run.train.init_from} (step {src_step})")
            return state_lib.init(lay, run.config.seed, params), {}
        writer.console(f"initialised at random (seed {run.config.seed})")
        return state_lib.init(lay, run.config.seed), {}


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


def _check_same_model(path: str, saved: dict, ours: IdeficsConfig, what: str) -> None:
    theirs = IdeficsConfig.from_dict(saved["model"]).replace(**{k: getattr(ours, k) for k in _NOT_ARCHITECTURE})
    diff = run_config.differences(theirs.to_dict(), ours.to_dict())
    if diff:
        raise UserError(f"{what}={path}: its model differs from config.model in {', '.join(diff)}")


def _init_from(path: str, lay: state_lib.Layout):
    """Full params from a converted (or any) checkpoint whose model architecture equals ours."""
    step, saved = fmt.read_config(path, verify=True)
    _check_same_model(path, saved, lay.model_config, "train.init_from")
    return fmt.restore_params(path, lay.abstract_params(), step, lay.params_shardings(), verify=False), step


def _check_resumable(ckpt: Checkpointer, step: int, run: Run, lay: state_lib.Layout) -> None:
    """Refuses to resume a run whose model or data order the config changed (the resume would not
    be the same run); the message names the fields."""
    directory = ckpt.directory
    _, saved = fmt.read_config(directory, step)
    _check_same_model(directory, saved, lay.model_config, "resuming from")
    diff = run_config.differences(ckpt.train_state(step)["data_order"], order_fingerprint(run.data), "data.")
    if diff:
        raise UserError(
            f"resuming from {directory} step {step}: the data order would change "
            f"({', '.join(diff)}); use a new --workdir, or restore these values"
        )


def _train_state(run: Run, step: int, state: dict, pipe: data_lib.Pipeline, guards: Guards) -> dict:
    """The checkpoint's JSON item: position, data iterator, guards, and the data-order fingerprint."""
    return {
        "step": step,
        "updates": int(state["updates"]),
        "data": pipe.state(),
        "guards": guards.state(),
        "seed": run.config.seed,
        "data_order": order_fingerprint(run.data),
    }


# Data ---------------------------------------------------------------------------------------------


def _open_pipeline(run: Run, guards: Guards, data_state: dict | None) -> data_lib.Pipeline:
    """This process's training pipeline with the rollback skips merged in, at `data_state`."""
    merged: list[list[int]] = []
    for a, b in sorted([list(r) for r in run.data.skip_steps] + [list(r) for r in guards.rollback_skips]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    cfg = ml_collections.ConfigDict(run.data.to_dict())
    cfg.skip_steps = merged
    pipe = data_lib.pipeline(cfg, jax.process_index(), jax.process_count())
    if data_state:
        pipe.restore(data_state)
    return pipe


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's rows → global arrays sharded over the 'batch' logical axis."""
    return {
        # The global shape makes JAX check that the processes' rows really tile the batch axes.
        k: jax.make_array_from_process_local_data(
            batch_sharding(mesh, v.ndim), v, (v.shape[0] * jax.process_count(), *v.shape[1:])
        )
        for k, v in local.items()
    }


# Per-step record, evaluation, signals --------------------------------------------------------------


class Meter:
    """Turns one step's device metrics and batch into the logged record (throughput, MFU, per-dataset loss)."""

    def __init__(self, run: Run, lay: state_lib.Layout, names: list[str]):
        d = run.data
        self.flops = model_flops_per_step(lay.model_config, d.global_batch_size, d.seq_len, d.max_num_images)
        self.peak = run.train.peak_flops_per_device * jax.device_count()
        self.names = names
        self.last: dict[str, Any] = {}

    def record(self, m: dict, local: dict[str, np.ndarray], dt: float, t_data: float, guards: Guards) -> dict:
        images = int(local["image_attention_mask"].any(axis=1).sum()) * jax.process_count()
        real = int(local["attention_mask"].sum()) * jax.process_count()
        self.last = {
            "loss": float(m["loss"]),
            "z_loss": float(m["z_loss"]),
            "grad_norm": float(m["grad_norm"]),
            "lr": float(m["lr"]),
            "step_time": dt,
            "data_time": t_data,
            "tokens_per_s": real / dt,
            "images_per_s": images / dt,
            "mfu": self.flops / dt / self.peak,
            "applied": bool(m["applied"]),
            "guards": dict(guards.counts),
            "loss_by_dataset": {
                n: float(m["ds_loss_sum"][i] / m["ds_tokens"][i])
                for i, n in enumerate(self.names)
                if m["ds_tokens"][i] > 0
            },
        }
        return self.last


class Evaluator:
    """Held-out loss over `train.eval_steps` fixed batches of `eval_data`, on the live state."""

    def __init__(self, run: Run, lay: state_lib.Layout):
        self.pipe = data_lib.pipeline(run.config.eval_data, jax.process_index(), jax.process_count())
        self.step = make_eval_step(lay, len(self.pipe.dataset_names))
        self.lay, self.steps = lay, run.train.eval_steps

    @classmethod
    def create(cls, run: Run, lay: state_lib.Layout) -> Evaluator | None:
        """None when the config has no eval_data or eval_every is 0."""
        return cls(run, lay) if run.config.get("eval_data") is not None and run.train.eval_every else None

    def __call__(self, state: dict) -> dict[str, float]:
        tokens = loss = 0.0
        ds_loss = ds_tok = 0.0
        for i in range(self.steps):
            with self.lay.activate():
                m = jax.device_get(self.step(state, global_batch(self.pipe.batch(i), self.lay.mesh)))
            loss, tokens = loss + float(m["loss_sum"]), tokens + float(m["tokens"])
            ds_loss, ds_tok = ds_loss + m["ds_loss_sum"], ds_tok + m["ds_tokens"]
        out = {"loss": loss / max(tokens, 1.0)}
        out.update(
            {f"loss/{n}": float(ds_loss[i] / ds_tok[i]) for i, n in enumerate(self.pipe.dataset_names) if ds_tok[i] > 0}
        )
        return out


class FewShot:
    """The few-shot benchmarks of `train.eval_tasks` (idefics_jax.eval), each at its interval, on the
    live parameters (no checkpoint round trip); prompts are batched by the micro-batch size."""

    def __init__(self, run: Run, lay: state_lib.Layout, tasks: list[dict]):
        self.tasks, self.lay = tasks, lay
        self.processor = data_lib.Processor(run.data.tokenizer_path, image_size=lay.model_config.vision.image_size)
        self.batch_size = lay.micro_batch_rows_per_device * lay.mesh.shape["data"] * lay.mesh.shape["fsdp"]

    @classmethod
    def create(cls, run: Run, lay: state_lib.Layout, writer: Writer) -> FewShot | None:
        """None without `train.eval_tasks`. A captioning task whose metric cannot run here (no
        pycocoevalcap or no Java) is dropped with a warning now, rather than failing the run when it
        is first due."""
        from idefics_jax.eval import metrics, tasks

        reason = metrics.cider_unavailable()
        keep = []
        for t in run.train.eval_tasks:
            if reason is not None and tasks.get(t["task"]).kind == "caption":
                writer.console(f"warning: train.eval_tasks: {t['task']} will not be evaluated: {reason}")
            else:
                keep.append(t)
        return cls(run, lay, keep) if keep else None

    def __call__(self, step: int, state: dict, writer: Writer) -> None:
        from flax import nnx

        from idefics_jax.eval import evaluate

        due = [t for t in self.tasks if step % t["every"] == 0]
        if not due:
            return
        model = nnx.merge(self.lay.graphdef, state["params"], state["frozen"])
        for t in due:
            with self.lay.activate():
                result = evaluate(
                    model,
                    self.processor,
                    t["task"],
                    t["data"],
                    shots=list(t["shots"]),
                    num_samples=t["num_samples"],
                    batch_size=self.batch_size,
                    progress=False,
                )
            writer.log_fewshot(step, t["task"], result)


class SignalStop:
    """Records SIGTERM (SLURM preemption, `scancel`) so the loop saves and exits at a step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        """Whether any process got the signal: every process must stop at the same step, or the ones
        that go on would wait forever in the next step's collectives while the others save."""
        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(local))))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


# Guards and rollback ------------------------------------------------------------------------------


class Guards:
    """Host-side guard state: the loss window for spike detection, the run of non-finite steps,
    counters and the data ranges skipped by rollbacks. Saved in every checkpoint (JSON)."""

    def __init__(self, cfg: ml_collections.ConfigDict, saved: dict | None = None):
        self.cfg = cfg
        saved = saved or {}
        self.window = collections.deque(saved.get("window", []), maxlen=cfg.spike_window)
        self.nonfinite_run = saved.get("nonfinite_run", 0)
        self.spike_run = saved.get("spike_run", 0)
        self.counts = {
            k: saved.get("counts", {}).get(k, 0)
            for k in ("nonfinite_steps", "spike_steps", "rollbacks", "skipped_data_steps")
        }
        self.rollback_skips = [list(r) for r in saved.get("rollback_skips", [])]

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
                    "The skipped steps never reached the parameters, so the newest checkpoint holds the "
                    "state from before them (a restart verifies it first; --verify_only checks it now); lower "
                    "the learning rate or skip the data range (data.skip_steps) and restart."
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
        self.nonfinite_run = saved.get("nonfinite_run", 0)
        self.counts["rollbacks"] += 1
        self.counts["skipped_data_steps"] += skip[1] - skip[0]
        self.rollback_skips = [*self.rollback_skips, skip]


def _rollback(run: Run, lay, ckpt: Checkpointer, guards: Guards, pipe, step: int, writer: Writer):
    """Loss spike with spike_action='rollback': back to the newest checkpoint and skip data.

    The data skipped starts at the checkpoint's data step and covers `rollback_skip_steps` steps, and
    at least through the spiking batch, so the replay never sees it again. Returns (state, step, a
    new pipeline at the checkpoint's data position with the skip added) — or None when there is no
    checkpoint yet (the spiking update was skipped in the step; training goes on).
    """
    g = run.train.guards
    ckpt.finalize()
    target = ckpt.restorable_step(writer.console)
    if target is None:
        writer.console(f"loss spike at step {step}: no checkpoint to roll back to yet; the update was skipped")
        return None
    if guards.counts["rollbacks"] >= g.max_rollbacks:
        raise TrainingStopped(
            f"loss spike at step {step} after {guards.counts['rollbacks']} rollbacks "
            f"(train.guards.max_rollbacks={g.max_rollbacks}); stopping"
        )
    spiking_data_step = pipe.data_step(step - 1)
    with lay.activate():
        state, meta = ckpt.restore(target, lay)
    start = pipe.data_step(meta["data"]["step"])
    skip = [start, max(start + g.rollback_skip_steps, spiking_data_step + 1)]
    guards.rolled_back(meta["guards"], skip)
    writer.console(
        f"loss spike at step {step} (above mean + {g.spike_sigmas}σ of the last {g.spike_window} losses): "
        f"rolled back to checkpoint step {target}; skipping data steps [{skip[0]}, {skip[1]})"
    )
    pipe.close()
    return state, meta["step"], _open_pipeline(run, guards, meta["data"])
