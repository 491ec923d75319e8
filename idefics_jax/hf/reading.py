"""Reading HF checkpoints: safetensors (single or sharded) and tensor-only PyTorch files, one tensor at
a time, with every check in one place — which tensors must be there (`check_keys`) and each tensor's
shape (`read_stacked`). Errors are `CheckpointError`s naming the file, the tensor and what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from idefics_jax.config import IdeficsConfig
from idefics_jax.errors import UserError
from idefics_jax.hf.names import Entry, entries, hf_shapes

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(UserError):
    """A checkpoint file or tensor is missing, corrupt, or not what the config says."""


class HFReader:
    """Reads tensors one at a time from an HF model directory, as float/int numpy arrays.

    Supports model.safetensors, sharded safetensors with model.safetensors.index.json, and
    pytorch_model*.bin (through `torch.load(weights_only=True)`, which refuses anything but tensors).
    Safetensors files are memory-mapped, so only the tensor being read is resident.
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        self._where: dict[str, str] = {}  # tensor name → the file holding it
        self._handles: dict[str, Any] = {}
        self._bins: dict[str, Mapping[str, Any]] = {}
        names = set(os.listdir(self.dir)) if os.path.isdir(self.dir) else set()
        if not names:
            raise CheckpointError(f"{self.dir}: not a directory with an HF checkpoint")
        index = [n for n in _INDEXES if n in names]
        single = [n for n in _SINGLES if n in names]
        if index:
            self._listing = os.path.join(self.dir, index[0])
            try:
                with open(self._listing) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(
                    f"{self._listing}: unreadable index ({e}); expected JSON with a 'weight_map'"
                ) from e
            self._where = {k: os.path.join(self.dir, v) for k, v in weight_map.items()}
        elif single:
            self._listing = os.path.join(self.dir, single[0])
            self._where = dict.fromkeys(self._open(self._listing).keys(), self._listing)
        else:
            raise CheckpointError(
                f"{self.dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found"
            )
        for path in sorted(set(self._where.values())):
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: listed in the index but missing")

    def _open(self, path: str):
        if path.endswith(".safetensors"):
            if path not in self._handles:
                from safetensors import safe_open

                try:
                    self._handles[path] = safe_open(path, framework="numpy")
                except Exception as e:  # safetensors raises its own error types for bad headers
                    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
            return self._handles[path]
        if path not in self._bins:
            import torch

            try:
                self._bins[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{path}: not a tensor-only PyTorch checkpoint ({e})") from e
            bad = [k for k, v in self._bins[path].items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise CheckpointError(f"{path}: entry {bad[0]!r} is not a tensor; expected only tensors")
        return self._bins[path]

    def keys(self) -> list[str]:
        return list(self._where)

    def listing_file(self) -> str:
        """The file that lists the tensors: the index JSON, else the single weights file."""
        return self._listing

    def file_of(self, name: str) -> str:
        """The weights file holding tensor `name` (the listing file if the checkpoint lacks it)."""
        return self._where.get(name, self._listing)

    def close(self) -> None:
        """Unmaps the open files; later reads reopen them.

        Pages read through a memory map stay resident (and count in the process's RSS) while the file
        is mapped, so streaming readers (`read_stacked`) call this after each tensor to keep RSS at
        the parameter being built rather than growing to the whole checkpoint.
        """
        self._handles.clear()
        self._bins.clear()

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as numpy (bf16 is returned as ml_dtypes.bfloat16)."""
        if name not in self._where:
            raise CheckpointError(f"{self.listing_file()}: tensor {name!r} is missing")
        path = self._where[name]
        h = self._open(path)
        try:
            if path.endswith(".safetensors"):
                return h.get_tensor(name)
            t = h[name]
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {name!r} could not be read ({e})") from e
        import torch

        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class StateDictReader:
    """`HFReader`'s interface over an in-memory state dict (torch tensors or numpy arrays)."""

    def __init__(self, state_dict: Mapping[str, Any], where: str = "state_dict"):
        self._sd = state_dict
        self.dir = where

    def keys(self) -> list[str]:
        return list(self._sd)

    def listing_file(self) -> str:
        return self.dir

    def file_of(self, name: str) -> str:
        return self.dir

    def close(self) -> None:
        """Nothing to release (the state dict is in memory)."""

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as numpy."""
        if name not in self._sd:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        t = self._sd[name]
        return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


Reader = HFReader | StateDictReader

# Non-parameter buffers that some saved HF checkpoints carry (older transformers persisted them);
# transformers itself ignores them on load.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def is_buffer(name: str) -> bool:
    """Whether HF tensor `name` is a persisted buffer rather than a parameter."""
    return name.endswith(BUFFER_SUFFIXES)


def ignorable(config: IdeficsConfig) -> Callable[[str], bool]:
    """Which tensors of an HF IDEFICS checkpoint are not parameters of ours: buffers, and with
    `tie_word_embeddings` the LM head (the embedding holds it; transformers may save both)."""
    tied = {"lm_head.weight", "lm_head.additional_fc.weight"} if config.tie_word_embeddings else set()
    return lambda name: is_buffer(name) or name in tied


def check_keys(reader: Reader, expected: Collection[str], ignore: Callable[[str], bool] = is_buffer) -> None:
    """Raises CheckpointError naming the first tensor of `expected` that `reader` lacks (and the file
    listing the tensors), or the first tensor it has beyond them (and its file) unless `ignore(name)`."""
    got = set(reader.keys())
    missing = [n for n in expected if n not in got]
    if missing:
        raise CheckpointError(
            f"{reader.listing_file()}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)"
        )
    unexpected = sorted(n for n in got.difference(expected) if not ignore(n))
    if unexpected:
        raise CheckpointError(
            f"{reader.file_of(unexpected[0])}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected "
            "in all); not part of the model the config describes"
        )


def read_stacked(
    entry: Entry,
    reader: Reader,
    dtype: Any,
    rename: Callable[[str], str] | None = None,
    tick: Callable[[], Any] | None = None,
) -> np.ndarray:
    """Our full (stacked) array for `entry` (shape `entry.shape`, `dtype`), reading its HF tensors one
    by one; each tensor's shape is checked against `entry.hf_shape` (CheckpointError naming the file).

    `rename(hf_name)` is the tensor's name in `reader` (sources whose names differ from IDEFICS's, as a
    CLIP's); `tick()` is called after each tensor (a progress bar). The reader's file maps are dropped
    after each tensor, so memory is this array plus one tensor.
    """
    out = np.empty(entry.shape, dtype=dtype)
    for idx, name in entry.hf_items():
        src = rename(name) if rename else name
        t = reader.get(src)
        reader.close()
        if tuple(t.shape) != entry.hf_shape:
            raise CheckpointError(
                f"{reader.file_of(src)}: tensor {src!r} has shape {tuple(t.shape)}; "
                f"expected {entry.hf_shape} from the config"
            )
        out[idx] = entry.to_ours(t).astype(dtype, copy=False)  # no extra copy: assignment copies
        if tick:
            tick()
    return out


def load_state(
    config: IdeficsConfig, reader: Reader, mesh: Any = None, rules: Any = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) with every parameter read from `reader`, cast to `config.param_dtype`.

    With `mesh`, each parameter is placed with its NamedSharding (by `rules`, default the active
    table) as soon as it is read, so host memory holds one stacked parameter at a time.
    """
    from idefics_jax import sharding
    from idefics_jax.models import abstract_state

    graphdef, state = abstract_state(config)
    table = entries(config, state)
    check_keys(reader, hf_shapes(table), ignorable(config))
    shardings = sharding.state_shardings(state, mesh, rules) if mesh is not None else None
    flat_sh = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    by_path = {e.path: e for e in table}
    for path, var in nnx.to_flat_state(state):
        value = read_stacked(by_path[tuple(str(p) for p in path)], reader, dtype)
        target = flat_sh.get(path)
        var.set_value(jax.device_put(value, target.get_value() if target is not None else None))
    return graphdef, state
