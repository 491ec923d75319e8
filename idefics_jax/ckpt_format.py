"""Our checkpoint format on disk, shared by the trainer, the converters and `idefics_jax.load`.

A checkpoint directory is an Orbax `CheckpointManager` root: one sub-directory per step (written
atomically: Orbax writes into a temporary name and renames it when complete), each holding items:

- `params`: the model parameters as a nested dict keyed by our state paths (scan-stacked, see
  `idefics_jax.hf`), saved with `StandardSave`; restorable onto any mesh.
- `config`: JSON; `{"model": IdeficsConfig.to_dict(), ...}` — the trainer stores its whole config.
- training only: `opt_state` (StandardSave) and `train_state` (JSON: step, RNG, data position,
  counters).
- training with frozen parameters only: `frozen_ref` (JSON `{"directory", "fingerprint"}`). Then the
  step's `params` item holds the trainable parameters alone, and the frozen ones — which never change
  during a run — are in the *frozen store* `<root>/<directory>` (`frozen`), written once per run: a
  checkpoint directory of its own whose step 0 holds a `params` item and its integrity manifest.
  `fingerprint` is the store's `integrity.fingerprint` when the step was saved; a step whose store is
  missing, or holds other content, or fails verification, is refused naming the path. Steps without
  `frozen_ref` (converted checkpoints, runs with nothing frozen, checkpoints written before the store
  existed) hold every parameter in `params`; every reader below takes both forms.

A converted checkpoint (tools/convert_weights.py) has `params` and `config` only, at step 0. The
converters stream: `ParamsWriter` builds the `params` item from a few leaves at a time (Orbax partial
saves, merged by `partial.finalize` into one ordinary PyTree item) and `iter_params` reads it back one
leaf at a time, so host memory stays near the largest stacked parameter. What they write is restored
by `restore_params` / `StandardRestore` exactly like a trainer-written item.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import v1 as ocp_v1
from orbax.checkpoint.experimental.v1 import partial as ocp_partial

from idefics_jax import integrity
from idefics_jax.config import IdeficsConfig
from idefics_jax.errors import UserError

PARAMS, CONFIG, OPT_STATE, TRAIN_STATE, FROZEN_REF = "params", "config", "opt_state", "train_state", "frozen_ref"
# The frozen store under a checkpoint root (see the module docstring) and its one step.
FROZEN_DIR, FROZEN_STEP = "frozen", 0

Path = tuple[str, ...]  # a parameter's state path, e.g. ("blocks", "layers", "mlp", "up_proj", "kernel")


class CheckpointNotFound(UserError, FileNotFoundError):
    """No (complete) checkpoint where one was asked for."""


class CheckpointCorrupt(UserError):
    """A checkpoint's files differ from its manifest (idefics_jax.integrity)."""


def manager(
    directory: str | os.PathLike,
    options: ocp.CheckpointManagerOptions | None = None,
    items: tuple[str, ...] = (PARAMS, CONFIG),
) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` handling the named items."""
    return ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)),
        item_names=items,
        options=options or ocp.CheckpointManagerOptions(create=True),
    )


def read_config(
    directory: str | os.PathLike, step: int | None = None, verify: bool = False
) -> tuple[int, dict[str, Any]]:
    """(step, the stored config dict) of `step` (default: the latest) in a checkpoint directory.

    `verify=True` checks the whole step against its manifest first (CheckpointCorrupt), for callers
    that read the rest of the step afterwards with verification off (one hashing pass, not two)."""
    if not os.path.isdir(directory):
        raise CheckpointNotFound(f"{directory}: no such checkpoint directory")
    mngr = manager(directory, ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        step = _step(mngr, directory, step)
        if verify:
            verify_step(directory, step)
        cfg = mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    finally:
        mngr.close()
    if "model" not in cfg:
        raise UserError(f"{directory}: the config of step {step} has no 'model' section; not one of our checkpoints")
    return step, cfg


def _step(mngr: ocp.CheckpointManager, directory, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointNotFound(f"{directory}: no complete checkpoint found")
    if step is None:
        return max(steps)
    if step not in steps:
        raise CheckpointNotFound(f"{directory}: no checkpoint for step {step}; have {sorted(steps)}")
    return step


def _problems(what: str, problems: list[str]) -> CheckpointCorrupt:
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return CheckpointCorrupt(f"{what} failed verification: {problems[0]}{more}")


def verify_step(directory: str | os.PathLike, step: int) -> None:
    """Raises CheckpointCorrupt naming the first bad file when `step`'s files differ from its manifest,
    and (`frozen_store`) when the frozen store it references is missing, other or corrupt."""
    problems = integrity.verify(os.path.join(os.path.abspath(os.fspath(directory)), str(step)))
    if problems:
        raise _problems(f"{directory} step {step}", problems)
    frozen_store(directory, step, verify=True)


def frozen_ref(directory: str | os.PathLike, step: int) -> dict[str, str] | None:
    """The `frozen_ref` item of `step` ({"directory": relative to the root, "fingerprint": hex}), or
    None when the step holds every parameter itself."""
    root = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(os.path.join(root, str(step), FROZEN_REF)):
        return None
    mngr = manager(root, ocp.CheckpointManagerOptions(read_only=True, create=False), (FROZEN_REF,))
    try:
        return mngr.restore(step, args=ocp.args.Composite(**{FROZEN_REF: ocp.args.JsonRestore()}))[FROZEN_REF]
    finally:
        mngr.close()


def frozen_store(
    directory: str | os.PathLike, step: int, verify: bool = False, shard: tuple[int, int] = (0, 1)
) -> str | None:
    """The root of the frozen store `step` references (its parameters are at step `FROZEN_STEP`), or
    None when the step holds every parameter itself.

    Refuses in one line naming the path: CheckpointNotFound when the store is missing or was never
    finalised, CheckpointCorrupt when it holds other content than the step was saved with (its
    fingerprint differs) or, with `verify`, when its files differ from its manifest (`shard`: as
    `integrity.verify`, the processes split the re-hashing)."""
    ref = frozen_ref(directory, step)
    if ref is None:
        return None
    root = os.path.join(os.path.abspath(os.fspath(directory)), ref["directory"])
    store = os.path.join(root, str(FROZEN_STEP))
    whose = f"the frozen weights of {directory} step {step}, written once per run"
    if not os.path.isdir(root):
        raise CheckpointNotFound(f"{root}: missing; it holds {whose}: restore it from a copy")
    if not integrity.has_manifest(store):
        raise CheckpointNotFound(f"{store}: missing or never finalised (no manifest); it holds {whose}")
    got = integrity.fingerprint(store)
    if got != ref["fingerprint"]:
        raise CheckpointCorrupt(
            f"{store}: holds other weights than {whose} (fingerprint {got[:16]}…, the step recorded "
            f"{ref['fingerprint'][:16]}…): restore the store the step was saved with"
        )
    if verify and (problems := integrity.verify(store, shard)):
        raise _problems(f"{store} ({whose})", problems)
    return root


def restore_params(
    directory: str | os.PathLike, abstract_params: nnx.State, step: int, shardings: Any = None, verify: bool = True
) -> nnx.State:
    """The `params` item of `step` restored into the structure of `abstract_params` (nnx Params).

    `shardings` (same structure, NamedSharding leaves) places each array as Orbax reads it, so a
    checkpoint saved on one mesh restores onto another. The step is verified first against its
    manifest (`verify=False`: the caller already did).
    """
    if verify:
        verify_step(directory, step)
    pure = nnx.to_pure_dict(abstract_params)
    sh = nnx.to_pure_dict(shardings) if shardings is not None else None
    target = jax.tree.map(
        lambda a, s=None: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure, *(() if sh is None else (sh,))
    )
    sources = _param_sources(directory, step)
    if len(sources) == 1:
        mngr = manager(directory, ocp.CheckpointManagerOptions(read_only=True, create=False))
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))[PARAMS]
        finally:
            mngr.close()
    else:  # trainable parameters from the step, frozen ones from its store: each leaf from where it is
        where = _located(directory, step)
        flat = {_key_path(kp): t for kp, t in jax.tree_util.tree_flatten_with_path(target)[0]}
        absent = [p for p in flat if p not in where]
        if absent:
            raise CheckpointNotFound(
                f"{directory} step {step}: parameter {'.'.join(absent[0])!r} is neither in the step nor in its "
                f"frozen store {sources[1][0]}"
            )
        got: dict[Path, Any] = {}
        for root, s in sources:
            part = {p: t for p, t in flat.items() if where[p][:2] == (root, s)}
            if part:
                got.update(_restore_some(root, s, part))
        restored = _nest(got)
    params = jax.tree.map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(params, restored)
    return params


def load(
    directory: str | os.PathLike, step: int | None = None, *, mesh: Any = None, rules: Any = None, **config_overrides
):
    """The model stored in one of our checkpoints (default: its latest step).

    `config_overrides` set our own config fields (dtype, remat, ...); with `mesh`, parameters are
    restored sharded by the logical-axis `rules`.
    """
    from idefics_jax import sharding
    from idefics_jax.models import abstract_state

    step, cfg = read_config(directory, step, verify=True)
    config = IdeficsConfig.from_dict(cfg["model"]).replace(**config_overrides)
    graphdef, state = abstract_state(config)
    params = nnx.state(nnx.merge(graphdef, state), nnx.Param)
    if mesh is not None:
        shardings = sharding.state_shardings(params, mesh, rules)
    else:  # on the default device, as from_hf places them (Orbax would return host numpy arrays)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda v: v.replace(device), params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    params = restore_params(directory, params, step, shardings, verify=False)
    return nnx.merge(graphdef, params)


# Streaming (the converters) ----------------------------------------------------------------------

# Chunk size of streamed arrays: large enough for fast sequential writes, small enough that a
# sharded restore reads little beyond its own shard.
CHUNK_BYTES = 64 * 2**20


def _nest(flat: Mapping[Path, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def _return_free_memory() -> None:
    """Hands freed heap pages back to the OS (glibc's malloc_trim). TensorStore's writer threads free
    a group's chunk copies in their own malloc arenas, which keep the pages: without this, the
    resident size of a streaming conversion creeps up by a group's size or more under CPU contention."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ParamsWriter:
    """Writes step `step` of a checkpoint (`params` + `config` items) from leaves given one by one.

    `add(path, array)` queues numpy leaves; `flush()` hands the queued group to one Orbax partial save
    (which writes straight from the buffers: no deep copy, no compression; chunks of `CHUNK_BYTES`)
    and drops it. The caller chooses the groups (e.g. `hf.group_by_bytes`): peak memory ≈ 2 × the
    largest group (the group plus Orbax's chunked copy of it while it is written), while few large
    saves are faster than many small ones. `finish(config)` merges the partial saves into one PyTree
    item, writes the config item and the integrity manifest (a step without one is refused on
    restore), and moves the completed step directory into `directory` with one rename, so the step
    appears whole or not at all.
    """

    def __init__(self, directory: str | os.PathLike, step: int):
        self.root = os.path.abspath(os.fspath(directory))
        self.step = step
        os.makedirs(self.root, exist_ok=True)
        # Work inside the root (same filesystem, so the final rename is atomic); the name is not a
        # step number, so Orbax's step listing ignores it.
        self.work = os.path.join(self.root, f".streaming-{step}")
        if os.path.exists(self.work):
            shutil.rmtree(self.work)
        os.makedirs(self.work)
        self._partial = os.path.join(self.work, PARAMS)
        self._group: dict[Path, np.ndarray] = {}
        self._saved: set[Path] = set()
        self._ctx = ocp_v1.Context()
        self._ctx.memory.deepcopy_host_arrays = False  # the buffers are ours and unchanged until saved
        self._ctx.array.saving.use_compression = False  # float weights barely compress; zstd costs time
        self._ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES

    def add(self, path: Path, value: np.ndarray) -> None:
        """Queues leaf `path` (numpy array of any shape/dtype) for the next `flush`."""
        if path in self._group or path in self._saved:
            raise ValueError(f"parameter {'.'.join(path)} added twice")
        self._group[path] = value

    def flush(self) -> None:
        """Writes the queued leaves now (one Orbax partial save) and drops them from memory."""
        if not self._group:
            return
        with self._ctx:
            ocp_partial.save(self._partial, _nest(self._group))
        self._saved.update(self._group)
        self._group = {}
        _return_free_memory()

    def finish(self, config: Mapping[str, Any]) -> None:
        """Completes the step: params item from everything added, `config` (must hold `model`)."""
        if "model" not in config:
            raise ValueError("checkpoint config must have a 'model' section (IdeficsConfig.to_dict())")
        self.flush()
        with self._ctx:
            ocp_partial.finalize(self._partial)
        mngr = manager(self.work)
        mngr.save(self.step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonSave(dict(config))}))
        mngr.wait_until_finished()
        mngr.close()
        step_dir = os.path.join(self.work, str(self.step))
        # The finalized partial save holds one PyTree item under "state"; it becomes our params item.
        os.rename(os.path.join(self._partial, "state"), os.path.join(step_dir, PARAMS))
        meta_path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
        with open(meta_path) as f:
            meta = json.load(f)
        # Record the handler the trainer saves params with, so `item_metadata` and argument-less
        # restores treat this item as the trainer's own.
        handler = ocp.StandardCheckpointHandler
        meta["item_handlers"][PARAMS] = f"{handler.__module__}.{handler.__qualname__}"
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        integrity.write_manifest(step_dir)
        target = os.path.join(self.root, str(self.step))
        if os.path.exists(target):
            raise FileExistsError(f"{target}: step {self.step} already exists")
        os.rename(step_dir, target)
        shutil.rmtree(self.work)


def _key_path(kp) -> Path:
    return tuple(str(getattr(k, "key", k)) for k in kp)


def _param_sources(directory: str | os.PathLike, step: int) -> list[tuple[str, int]]:
    """(checkpoint root, step) of each place holding parameters of `step`: the step itself, then the
    frozen store it references (checked: present, same fingerprint)."""
    store = frozen_store(directory, step)
    return [(os.path.abspath(os.fspath(directory)), step)] + ([(store, FROZEN_STEP)] if store else [])


def _item_metadata(root: str, step: int) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
    """{path: (shape, numpy dtype)} of the `params` item of one step directory, from metadata only."""
    # Naming the handler lets Orbax read the metadata whatever wrote the item.
    mngr = ocp.CheckpointManager(
        root,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={PARAMS: ocp.StandardCheckpointHandler()},
    )
    tree = mngr.item_metadata(step)[PARAMS]
    mngr.close()
    if tree is None:
        raise CheckpointNotFound(f"{root}: step {step} has no readable '{PARAMS}' item")
    tree = getattr(tree, "tree", tree)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_key_path(kp): (tuple(m.shape), np.dtype(m.dtype)) for kp, m in flat}


def _located(directory: str | os.PathLike, step: int) -> dict[Path, tuple[str, int, tuple[int, ...], np.dtype]]:
    """{path: (root, step, shape, dtype)}: where each parameter of `step` is stored (the step's own
    `params` item first, then its frozen store)."""
    out: dict[Path, tuple[str, int, tuple[int, ...], np.dtype]] = {}
    for root, s in _param_sources(directory, step):
        for path, (shape, dtype) in _item_metadata(root, s).items():
            out.setdefault(path, (root, s, shape, dtype))
    return out


def _restore_some(root: str, step: int, part: Mapping[Path, jax.ShapeDtypeStruct]) -> dict[Path, Any]:
    """The leaves `part` names ({path: target with dtype and, optionally, sharding}) of one step's
    `params` item, placed by the targets' shardings (host numpy arrays where a target has none)."""
    item = _nest(part)
    restore_args = _nest(
        {
            p: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)
            if t.sharding is not None
            else ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype)
            for p, t in part.items()
        }
    )
    mngr = manager(root, ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                **{PARAMS: ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)}
            ),
        )[PARAMS]
    finally:
        mngr.close()
    return {_key_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(out)[0]}


def params_metadata(directory: str | os.PathLike, step: int) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
    """{our state path: (shape, numpy dtype)} of every parameter of `step` (its `params` item, and its
    frozen store when it references one), read from metadata only."""
    return {p: (shape, dtype) for p, (_, _, shape, dtype) in _located(directory, step).items()}


def iter_params(
    directory: str | os.PathLike, step: int, paths: Iterable[Path], verify: bool = True
) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, numpy array) for each of `paths` among the parameters of `step` (its `params` item or
    its frozen store), read one leaf at a time.

    Each array has its stored shape and dtype; only one is in memory at a time (plus Orbax's read
    buffers, about half of it). The step (and its frozen store) is verified against its manifest
    before the first leaf is read (`verify=False`: the caller already did).
    """
    if verify:
        verify_step(directory, step)
    where = _located(directory, step)
    managers: dict[str, ocp.CheckpointManager] = {}
    try:
        for path in paths:
            root, s, shape, dtype = where[path]
            if root not in managers:
                managers[root] = manager(root, ocp.CheckpointManagerOptions(read_only=True, create=False))
            item = _nest({path: jax.ShapeDtypeStruct(shape, dtype)})
            restore_args = _nest({path: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)})
            out = managers[root].restore(
                s,
                args=ocp.args.Composite(
                    **{PARAMS: ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)}
                ),
            )[PARAMS]
            for k in path:
                out = out[k]
            # Hold no reference across the yield, so the caller's `del` frees the leaf before the next read.
            leaf, out = out, None
            yield path, leaf
            del leaf
    finally:
        for mngr in managers.values():
            mngr.close()
