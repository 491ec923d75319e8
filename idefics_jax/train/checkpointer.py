"""Training checkpoints: Orbax CheckpointManager over `WORKDIR/checkpoints` (format: idefics_jax.ckpt_format).

- Saved every `train.checkpoint_every` steps, asynchronously (the arrays are copied off the devices
  before `save` returns; the files are written in the background), atomically (Orbax writes into a
  temporary directory and renames it when complete).
- Finalised once committed (`poll` each step, or before the next save): every process hashes the
  files it wrote into a manifest (idefics_jax.integrity). Only finalised steps count as verified.
- Restored only after verification (`restorable_step`): a step whose files differ from its manifest
  (or that has none) is set aside as `corrupt-<step>-<time>` — never deleted — and the next older
  one is tried; when checkpoints exist but none verifies, the run refuses to start.
- Kept: the newest `train.keep_checkpoints` verified steps, plus every step that is a multiple of
  `train.keep_period` (0 = none). Pruning happens only after a newer step was verified, so the
  last verified checkpoint is never deleted before its successor is.
- A step directory that is not complete (no Orbax commit marker or metadata, e.g. a copy that was cut
  short) is set aside as `torn-<step>-<time>`; Orbax's temporary directories of interrupted saves
  are removed.
- Before each save, free space is compared with the last checkpoint's size (a warning when it may
  not fit); a save that fails (disk full, I/O error) raises CheckpointSaveError with one line.
- Frozen parameters are written once per run, into the frozen store `checkpoints/frozen` (at the
  first save, synchronously, with its own manifest); each step holds only the trainable parameters,
  the optimizer state and the JSON items, plus a `frozen_ref` naming the store by its fingerprint
  (format: idefics_jax.ckpt_format). A resumed run keeps using the store its step references. A
  store no restorable step references (the first save was cut short, or the run resumed from a step
  that holds its frozen weights itself) is set aside as `frozen-replaced-<time>` and written anew.
  A step whose store is missing, other or corrupt is refused in one line naming the path — not set
  aside: every step of the run shares the store, so no older step would do better.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from idefics_jax import ckpt_format as fmt
from idefics_jax import integrity
from idefics_jax.errors import UserError
from idefics_jax.train.state import Layout, split_params

# Every step has these; `frozen_ref` too when the run has frozen parameters.
ITEMS = (fmt.PARAMS, fmt.OPT_STATE, fmt.TRAIN_STATE, fmt.CONFIG)
_COMPLETE_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")

log = logging.getLogger(__name__)


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (disk full, I/O error); the message says where and what is left."""


def _complete(step_dir: str) -> bool:
    """Orbax writes its step metadata and commit marker last; every item must be there too."""
    return all(os.path.exists(os.path.join(step_dir, m)) for m in _COMPLETE_MARKERS) and all(
        os.path.isdir(os.path.join(step_dir, item)) for item in ITEMS
    )


def _set_aside(directory: str, step: int, kind: str) -> str:
    """Renames step `step` to `<kind>-<step>-<time>` (out of Orbax's sight, kept for inspection)."""
    target = os.path.join(directory, f"{kind}-{step}-{int(time.time())}")
    os.rename(os.path.join(directory, str(step)), target)
    return target


def set_aside_torn(directory: str) -> list[int]:
    """Moves incomplete step directories out of Orbax's sight; returns their steps (process 0 only)."""
    if not os.path.isdir(directory) or jax.process_index() != 0:
        return []
    torn = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(path) and not _complete(path):
            _set_aside(directory, int(name), "torn")
            torn.append(int(name))
    return torn


def _sync(tag: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"idefics_jax: {tag}")


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class Checkpointer:
    """Saves, verifies, prunes and restores full train states for one run directory."""

    def __init__(self, workdir: str, train_cfg: ml_collections.ConfigDict):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.keep, self.keep_period = train_cfg.keep_checkpoints, train_cfg.keep_period
        torn = set_aside_torn(self.directory)
        _sync("torn checkpoints set aside")  # everyone must see the directory after process 0 tidied it
        for step in torn:
            log.warning("checkpoint step %d in %s is incomplete (torn save): set aside, not used", step, self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # pruned here, after verification
            enable_async_checkpointing=train_cfg.async_checkpointing,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = fmt.manager(self.directory, options, (*ITEMS, fmt.FROZEN_REF))
        self._pending: list[int] = []  # saved (maybe still in flight), not yet finalised
        # Fingerprint of the frozen store this run's steps reference: set by a restore of a step that
        # references one, or by writing it at the first save; None until then.
        self._frozen: str | None = None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # Restoring -----------------------------------------------------------------------------------

    def restorable_step(self, say: Callable[[str], None] | None = None) -> int | None:
        """The newest step that verifies; the ones that fail are set aside, each reported through
        `say` (default: a logged warning) saying why. A step Orbax committed whose manifest was never
        written (the run died in between) is set aside as `unverified-…` when an older step verifies,
        and adopted (its manifest written now, with a warning) when none does. None when there is no
        checkpoint and none was ever set aside as corrupt; UserError when none verifies (never a
        silent start from scratch)."""
        say = say or log.warning
        bad, unverified = [], []
        for step in sorted(self.manager.all_steps(), reverse=True):
            if not integrity.has_manifest(self.step_dir(step)):
                unverified.append(step)
                continue
            index, count = jax.process_index(), jax.process_count()
            problems = integrity.verify(self.step_dir(step), (index, count))
            if not _any_process(bool(problems)):
                self._verify_frozen(step)
                for newer in unverified:
                    self._set_aside(newer, "unverified", "was committed but its manifest was never written", say)
                if bad or unverified:
                    self.manager.reload()
                return step
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            detail = problems[0] + more if problems else "another process found the difference (its log names the file)"
            self._set_aside(step, "corrupt", f"failed verification: {detail}", say)
            bad.append(step)
        if bad:
            self.manager.reload()
        if unverified:
            step = unverified[0]
            integrity.write_manifest(self.step_dir(step), jax.process_index(), jax.process_count())
            _sync("manifest of an unverified step written")
            self._verify_frozen(step)  # its own files are unverified, but its frozen store has a manifest
            say(
                f"checkpoint step {step} was committed but its manifest was never written (the run stopped in "
                "between) and no older step verifies: using it unverified (its manifest is written now)"
            )
            return step
        # Set aside by this start or an earlier one: either way this run had checkpoints.
        aside = sorted(n for n in os.listdir(self.directory) if n.startswith("corrupt-"))
        if aside:
            raise UserError(
                f"no checkpoint in {self.directory} verifies ({', '.join(aside)} failed verification"
                f"{'; the messages above say which files' if bad else ''}). Refusing to start from scratch in a run "
                "that had checkpoints: restore them from a copy, or use a new --workdir"
            )
        return None

    def _verify_frozen(self, step: int) -> None:
        """Raises (on every process) the one-line error of `fmt.frozen_store` when the frozen store of
        a verified `step` is missing, other or corrupt; the processes split the re-hashing."""
        error = None
        try:
            fmt.frozen_store(self.directory, step, verify=True, shard=(jax.process_index(), jax.process_count()))
        except UserError as e:
            error = e
        if _any_process(error is not None):
            raise error or fmt.CheckpointCorrupt(
                f"the frozen store of {self.directory} step {step} failed verification on another process "
                "(its log names the file)"
            )

    def _set_aside(self, step: int, kind: str, why: str, say: Callable[[str], None]) -> None:
        """Process 0 renames `step` to `<kind>-<step>-<time>` and says why; everyone waits for it."""
        if jax.process_index() == 0:
            where = _set_aside(self.directory, step, kind)
            say(f"checkpoint step {step} {why}; set aside as {where}")
        _sync(f"checkpoint {step} set aside")

    def restore(self, step: int, lay: Layout) -> tuple[dict[str, Any], dict[str, Any]]:
        """(train state placed with `lay`'s shardings — any mesh —, train_state JSON) of a verified `step`."""
        params = fmt.restore_params(self.directory, lay.abstract_params(), step, lay.params_shardings(), verify=False)
        trainable, frozen = split_params(lay, params)
        ref = fmt.frozen_ref(self.directory, step)
        self._frozen = ref["fingerprint"] if ref is not None else None
        opt_target = [
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
            for a, s in zip(jax.tree.leaves(lay.abstract["opt_state"]), jax.tree.leaves(lay.shardings["opt_state"]))
        ]
        got = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{fmt.OPT_STATE: ocp.args.StandardRestore(opt_target), fmt.TRAIN_STATE: ocp.args.JsonRestore()}
            ),
        )
        opt_state = jax.tree.unflatten(jax.tree.structure(lay.abstract["opt_state"]), list(got[fmt.OPT_STATE]))
        meta = got[fmt.TRAIN_STATE]
        scalar = lambda v: jax.device_put(jax.numpy.int32(v), lay.shardings["step"])
        state = {
            "params": trainable,
            "frozen": frozen,
            "opt_state": opt_state,
            "step": scalar(meta["step"]),
            "updates": scalar(meta["updates"]),
        }
        return state, meta

    def train_state(self, step: int) -> dict[str, Any]:
        """The train_state JSON item of `step` (position, data iterator, guards, data-order fingerprint)."""
        args = ocp.args.Composite(**{fmt.TRAIN_STATE: ocp.args.JsonRestore()})
        return self.manager.restore(step, args=args)[fmt.TRAIN_STATE]

    # Saving --------------------------------------------------------------------------------------

    def save(
        self, step: int, state: dict[str, Any], train_state: dict[str, Any], config: ml_collections.ConfigDict
    ) -> None:
        """Starts saving `state` as `step` (returns once the arrays are off the devices); the previous
        save is finalised first. The first save of a run with frozen parameters writes them to the
        frozen store first (and waits for it); every step then holds only the trainable ones."""
        self.finalize()
        sizes = saved_bytes(state)
        has_frozen = sizes["frozen"] > 0
        writes_store = has_frozen and self._frozen is None
        self._check_space(step, sizes["step"], sizes["frozen"] if writes_store else 0)
        items = {
            fmt.PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(state["params"])),
            fmt.OPT_STATE: ocp.args.StandardSave(jax.tree.leaves(state["opt_state"])),
            fmt.TRAIN_STATE: ocp.args.JsonSave(train_state),
            fmt.CONFIG: ocp.args.JsonSave(config.to_dict()),
        }
        try:
            if writes_store:
                self._frozen = self._write_frozen(state["frozen"])
            if has_frozen:
                ref = {"directory": fmt.FROZEN_DIR, "fingerprint": self._frozen}
                items[fmt.FROZEN_REF] = ocp.args.JsonSave(ref)
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._save_error(step, f"failed ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
        self._pending.append(step)

    def _write_frozen(self, frozen: nnx.State) -> str:
        """Writes the frozen store (synchronously, then its manifests) and returns its fingerprint. An
        existing store is one no restorable step references (else `restore` had adopted it): set aside."""
        root = os.path.join(self.directory, fmt.FROZEN_DIR)
        if jax.process_index() == 0 and os.path.exists(root):
            aside = f"{root}-replaced-{int(time.time())}"
            os.rename(root, aside)
            log.warning("%s: not referenced by any restorable step; set aside as %s, written anew", root, aside)
        _sync("old frozen store set aside")
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
        store = fmt.manager(root, options, (fmt.PARAMS,))
        try:
            store.save(
                fmt.FROZEN_STEP,
                args=ocp.args.Composite(**{fmt.PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(frozen))}),
            )
            store.wait_until_finished()
        finally:
            store.close()
        step_dir = os.path.join(root, str(fmt.FROZEN_STEP))
        integrity.write_manifest(step_dir, jax.process_index(), jax.process_count())
        _sync("frozen store manifests written")
        return integrity.fingerprint(step_dir)

    def poll(self) -> None:
        """Finalises the saves that have finished in the background (cheap when none has)."""
        if self._pending and not self.manager.is_saving_in_progress():
            self.finalize()

    def finalize(self) -> None:
        """Waits for the saves in flight, writes their manifests, then prunes old verified steps."""
        if not self._pending:
            return
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            failed, self._pending = (
                self._pending[-1],
                [],
            )  # abandoned: its temporary directory is tidied at the next start
            raise self._save_error(failed, f"failed ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
        for step in self._pending:
            integrity.write_manifest(self.step_dir(step), jax.process_index(), jax.process_count())
        _sync("manifests written")
        self._pending = []
        self._prune()

    def _prune(self) -> None:
        verified = [s for s in self.all_steps() if integrity.has_manifest(self.step_dir(s))]
        keep = set(verified[-self.keep :]) | {s for s in verified if self.keep_period and s % self.keep_period == 0}
        for step in verified:
            if step not in keep:
                self.manager.delete(step)

    def _last_verified(self) -> int | None:
        verified = [s for s in self.all_steps() if integrity.has_manifest(self.step_dir(s))]
        return verified[-1] if verified else None

    def _check_space(self, step: int, step_bytes: int, store_bytes: int) -> None:
        """Stops before writing when the checkpoint cannot fit (its size: the last checkpoint's, or
        `step_bytes` for the first; plus `store_bytes` when the frozen store is written with it), and
        warns when it leaves less than half of that spare."""
        last = self._last_verified()
        need = (integrity.size(self.step_dir(last)) if last is not None else step_bytes) + store_bytes
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise self._save_error(step, f"not enough space: a checkpoint takes {_gb(need)}")
        if free < 1.5 * need:
            log.warning(
                "%s has %s free; a checkpoint takes %s: the disk is nearly full", self.directory, _gb(free), _gb(need)
            )

    def _save_error(self, step: int, what: str) -> CheckpointSaveError:
        # Orbax's background threads may keep logging the same failure, and its abandoned save
        # coroutines warn "never awaited" at exit; one line is enough.
        for name in ("absl", "orbax", "asyncio", "jax._src.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
        free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0
        last = self._last_verified()
        then = (
            f"the last complete checkpoint is step {last} (verified); the run resumes from it"
            if last is not None
            else "there is no complete checkpoint yet"
        )
        return CheckpointSaveError(
            f"saving checkpoint step {step} to {self.directory}: {what}; {_gb(free)} free there. "
            f"Free space (or fix the filesystem) and rerun: {then}"
        )

    def close(self) -> None:
        """Finalises what is in flight and releases the manager."""
        try:
            self.finalize()
        finally:
            self.manager.close()


def saved_bytes(state: dict[str, Any]) -> dict[str, int]:
    """Bytes of array data a checkpoint writes for a train state (arrays, or ShapeDtypeStructs such
    as `Layout.abstract`): {"step": at every checkpoint — trainable params, optimizer state, counters;
    "frozen": once per run, into the frozen store}. (Metadata and JSON items add kilobytes.)"""
    nbytes = lambda tree: sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    return {"step": nbytes({k: v for k, v in state.items() if k != "frozen"}), "frozen": nbytes(state["frozen"])}


def _one_line(problems: list[str]) -> str:
    return problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")


def verify_report(workdir: str) -> tuple[str, bool]:
    """A table of every step directory under WORKDIR/checkpoints and its state (verified, or what
    is wrong; set-aside ones by name; the frozen store as `frozen`), and whether the newest step
    verifies, with the frozen store it references. Reads only."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: no checkpoint directory")
    rows, newest_ok = [], None
    store = os.path.join(directory, fmt.FROZEN_DIR, str(fmt.FROZEN_STEP))
    store_problems = integrity.verify(store) if os.path.isdir(os.path.dirname(store)) else []
    names = sorted(os.listdir(directory), key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    for name in names:
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        if name == fmt.FROZEN_DIR:
            state = (
                "CORRUPT: " + _one_line(store_problems) if store_problems else "verified (frozen weights, written once)"
            )
            rows.append((name, state, _gb(integrity.size(store)) if os.path.isdir(store) else ""))
            continue
        if not name.isdigit():
            aside = name.split("-")[0] in ("torn", "corrupt", "unverified") or name.startswith(f"{fmt.FROZEN_DIR}-")
            rows.append((name, "set aside" if aside else "not a step", ""))
            continue
        if not _complete(path):
            rows.append((name, "TORN (no commit marker)", ""))
            newest_ok = False
            continue
        problems = integrity.verify(path)
        state = "CORRUPT: " + _one_line(problems) if problems else "verified"
        if not problems:  # the files are right; is the frozen store it references?
            try:
                if fmt.frozen_store(directory, int(name)) is not None and store_problems:
                    state = f"UNUSABLE: its frozen store failed verification (row '{fmt.FROZEN_DIR}')"
            except UserError as e:
                state = f"UNUSABLE: {e}"
        rows.append((name, state, _gb(integrity.size(path))))
        newest_ok = state == "verified"
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'step'.ljust(width)}  size      state"]
    lines += [f"{r[0].ljust(width)}  {r[2].ljust(8)}  {r[1]}" for r in rows]
    return "\n".join(lines), bool(newest_ok)
