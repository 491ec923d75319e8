"""Our checkpoint format on disk, shared by the trainer, the converters and `idefics_jax.load`.

A checkpoint directory is an Orbax `CheckpointManager` root: one sub-directory per step (written
atomically: Orbax writes into a temporary name and renames it when complete), each holding items:

- `params`: the model parameters as a nested dict keyed by our state paths (scan-stacked, see
  `idefics_jax.hf`), saved with `StandardSave`; restorable onto any mesh.
- `config`: JSON; `{"model": IdeficsConfig.to_dict(), ...}` — the trainer stores its whole config.
- training only: `opt_state` (StandardSave) and `train_state` (JSON: step, RNG, data position,
  counters).

A converted checkpoint (tools/convert_weights.py) has `params` and `config` only, at step 0.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx

from idefics_jax.config import IdeficsConfig

PARAMS, CONFIG, OPT_STATE, TRAIN_STATE = "params", "config", "opt_state", "train_state"


def manager(directory: str | os.PathLike, options: ocp.CheckpointManagerOptions | None = None,
            items: tuple[str, ...] = (PARAMS, CONFIG)) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` handling the named items."""
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), item_names=items,
                                 options=options or ocp.CheckpointManagerOptions(create=True))


def read_config(directory: str | os.PathLike, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, the stored config dict) of `step` (default: the latest) in a checkpoint directory."""
    mngr = manager(directory, ocp.CheckpointManagerOptions(read_only=True, create=False))
    step = _step(mngr, directory, step)
    cfg = mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    return step, cfg


def _step(mngr: ocp.CheckpointManager, directory, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"{directory}: no complete checkpoint found")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"{directory}: no checkpoint for step {step}; have {sorted(steps)}")
    return step


def restore_params(directory: str | os.PathLike, abstract_params: nnx.State, step: int,
                   shardings: Any = None) -> nnx.State:
    """The `params` item of `step` restored into the structure of `abstract_params` (nnx Params).

    `shardings` (same structure, NamedSharding leaves) places each array as Orbax reads it, so a
    checkpoint saved on one mesh restores onto another.
    """
    pure = nnx.to_pure_dict(abstract_params)
    sh = nnx.to_pure_dict(shardings) if shardings is not None else None
    target = jax.tree.map(lambda a, s=None: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure,
                          *(() if sh is None else (sh,)))
    mngr = manager(directory, ocp.CheckpointManagerOptions(read_only=True, create=False))
    restored = mngr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))[PARAMS]
    params = jax.tree.map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(params, restored)
    return params


def save_params(directory: str | os.PathLike, step: int, params: nnx.State, config: Mapping[str, Any]) -> None:
    """Writes a `params` + `config` checkpoint for `step` (blocking). `config` must hold `model`."""
    if "model" not in config:
        raise ValueError("checkpoint config must have a 'model' section (IdeficsConfig.to_dict())")
    mngr = manager(directory)
    mngr.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(params)),
        CONFIG: ocp.args.JsonSave(dict(config)),
    }))
    mngr.wait_until_finished()
    mngr.close()


def load(directory: str | os.PathLike, step: int | None = None, *, mesh: Any = None, rules: Any = None,
         **config_overrides):
    """The model stored in one of our checkpoints (default: its latest step).

    `config_overrides` set our own config fields (dtype, remat, ...); with `mesh`, parameters are
    restored sharded by the logical-axis `rules`.
    """
    from idefics_jax import sharding
    from idefics_jax.hf import abstract_state

    step, cfg = read_config(directory, step)
    config = IdeficsConfig.from_dict(cfg["model"]).replace(**config_overrides)
    graphdef, state = abstract_state(config)
    params = nnx.state(nnx.merge(graphdef, state), nnx.Param)
    shardings = sharding.state_shardings(params, mesh, rules) if mesh is not None else None
    params = restore_params(directory, params, step, shardings)
    return nnx.merge(graphdef, params)
