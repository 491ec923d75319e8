"""Training checkpoints: Orbax CheckpointManager over `WORKDIR/checkpoints` (format: idefics_jax.ckpt_format).

- Saved every `train.checkpoint_every` steps, asynchronously (the arrays are copied off the devices
  before `save` returns; the files are written in the background), atomically (Orbax writes into a
  temporary directory and renames it when complete).
- Kept: the newest `train.keep_checkpoints`, plus every step that is a multiple of
  `train.keep_period` forever (0 = none).
- Items: params (all of them, so `idefics_jax.load` and the jax-to-hf converter read any training
  checkpoint), opt_state (as a flat list of arrays), train_state (JSON: step, updates, guard state,
  data position and counters, rollback skips), config (JSON, the whole training config).
- A step directory that is not complete (no Orbax commit marker or metadata, e.g. a copy that was cut
  short) is moved aside as `torn-<step>-<time>` and the previous complete step is used.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from idefics_jax import ckpt_format as fmt
from idefics_jax.train.state import Layout, full_params, split_params

ITEMS = (fmt.PARAMS, fmt.OPT_STATE, fmt.TRAIN_STATE, fmt.CONFIG)
_COMPLETE_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")

log = logging.getLogger(__name__)


def _complete(step_dir: str) -> bool:
    """Orbax writes its step metadata and commit marker last; every item must be there too."""
    return all(os.path.exists(os.path.join(step_dir, m)) for m in _COMPLETE_MARKERS) and all(
        os.path.isdir(os.path.join(step_dir, item)) for item in ITEMS
    )


def set_aside_torn(directory: str) -> list[int]:
    """Moves incomplete step directories out of Orbax's sight; returns their steps (process 0 only)."""
    if not os.path.isdir(directory) or jax.process_index() != 0:
        return []
    torn = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(path) and not _complete(path):
            os.rename(path, os.path.join(directory, f"torn-{name}-{int(time.time())}"))
            torn.append(int(name))
    return torn


class Checkpointer:
    """Saves and restores full train states for one run directory."""

    def __init__(self, workdir: str, train_cfg: ml_collections.ConfigDict):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        torn = set_aside_torn(self.directory)
        if jax.process_count() > 1:  # everyone must see the directory after process 0 tidied it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("idefics_jax: torn checkpoints set aside")
        for step in torn:
            log.warning("checkpoint step %d in %s is incomplete (torn save): set aside, not used", step, self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=train_cfg.keep_checkpoints,
            keep_period=train_cfg.keep_period or None,
            enable_async_checkpointing=train_cfg.async_checkpointing,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = fmt.manager(self.directory, options, ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self, step: int, state: dict[str, Any], train_state: dict[str, Any], config: ml_collections.ConfigDict
    ) -> None:
        """Starts saving `state` as `step` (returns once the arrays are off the devices)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    fmt.PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(full_params(state))),
                    fmt.OPT_STATE: ocp.args.StandardSave(jax.tree.leaves(state["opt_state"])),
                    fmt.TRAIN_STATE: ocp.args.JsonSave(train_state),
                    fmt.CONFIG: ocp.args.JsonSave(config.to_dict()),
                }
            ),
            force=True,
        )

    def train_state(self, step: int) -> dict[str, Any]:
        """The train_state JSON item of `step` (position, data iterator, guards, data-order fingerprint)."""
        return self.manager.restore(step, args=ocp.args.Composite(**{fmt.TRAIN_STATE: ocp.args.JsonRestore()}))[
            fmt.TRAIN_STATE
        ]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, lay: Layout) -> tuple[dict[str, Any], dict[str, Any]]:
        """(train state placed with `lay`'s shardings — any mesh —, train_state JSON) of `step`."""
        params = fmt.restore_params(self.directory, lay.abstract_params(), step, lay.params_shardings())
        trainable, frozen = split_params(lay, params)
        opt_target = [
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
            for a, s in zip(jax.tree.leaves(lay.abstract["opt_state"]), jax.tree.leaves(lay.shardings["opt_state"]))
        ]
        got = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    fmt.OPT_STATE: ocp.args.StandardRestore(opt_target),
                    fmt.TRAIN_STATE: ocp.args.JsonRestore(),
                }
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

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
