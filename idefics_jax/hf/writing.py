"""Writing HF checkpoints: safetensors shards streamed one tensor at a time into pre-planned files,
and `group_by_bytes`, the one rule for cutting a sequence of tensors into byte-bounded groups (the
shards here; the converters' Orbax partial saves and jitted initialisations).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def group_by_bytes(items: Iterable[tuple[T, int]], budget: int) -> list[list[T]]:
    """(item, nbytes) pairs → consecutive groups in the given order, a new group starting when the next
    item would take the group past `budget` bytes (an item larger than `budget` gets a group of its
    own). Every group is non-empty."""
    groups: list[list[T]] = []
    size = 0
    for item, nbytes in items:
        if not groups or size + nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    return groups


# safetensors dtype codes (the format's spec) for the numpy dtypes we write.
_SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def parse_size(size: str | int) -> int:
    """'5GB' → 5·10⁹ bytes, '2GiB' → 2·2³⁰, '500MB', '20KB', or an int (transformers' convention)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    if s.isdigit():
        return int(s)
    raise ValueError(f"size {size!r}: expected a number with a unit, e.g. 5GB, 500MB, 2GiB")


class SafetensorsWriter:
    """Writes HF safetensors shards one tensor at a time, in any order, with bounded memory.

    All names, shapes and dtypes are known up front (from the name table), so each shard's header
    (tensor offsets) is written first and every tensor is later written at its offset with `pwrite`:
    memory is one tensor. Shards are the plan cut by `group_by_bytes(…, max_shard_size)` (in order; a
    tensor larger than that gets a shard of its own), as transformers' `save_pretrained` cuts them; one shard is `model.safetensors`, more are
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.

    plan: [(HF name, shape, numpy dtype)] in the order to lay out.
    """

    def __init__(self, directory: str | os.PathLike, plan: list[tuple[str, tuple[int, ...], Any]], max_shard_size: int):
        self.dir = os.fspath(directory)
        sized = []
        for name, shape, dtype in plan:
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            sized.append(((name, tuple(shape), dtype, nbytes), nbytes))
        shards = group_by_bytes(sized, max_shard_size)
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._slot: dict[str, tuple[int, int, tuple[int, ...], np.dtype]] = {}  # name → (fd, offset, shape, dtype)
        self._fds: list[int] = []
        self._remaining = set()
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        for fname, shard in zip(names, shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype, nbytes in shard:
                header[name] = {
                    "dtype": _SAFETENSORS_DTYPES[dtype.name],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
            fd = os.open(os.path.join(self.dir, fname), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            start = 8 + len(raw)
            os.ftruncate(fd, start + offset)
            for name, shape, dtype, _ in shard:
                self._slot[name] = (fd, start + header[name]["data_offsets"][0], shape, dtype)
                self.weight_map[name] = fname
                self._remaining.add(name)
            self.total_size += offset
        self.files = names

    def write(self, name: str, tensor: np.ndarray) -> None:
        """Writes tensor `name` (shape and dtype as planned) at its place in its shard."""
        fd, offset, shape, dtype = self._slot[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r}: got {tensor.dtype}{list(tensor.shape)}, planned {dtype}{list(shape)}")
        view = memoryview(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8))
        while view:  # pwrite may write fewer bytes than asked
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        self._remaining.discard(name)

    def close(self) -> None:
        """Closes the shard files (idempotent; also on failure, before the output is discarded)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def finish(self) -> None:
        """Flushes and closes the shards and writes the index (more than one shard).

        Raises ValueError if a planned tensor was never written (its bytes would be zeros).
        """
        if self._remaining:
            raise ValueError(f"{len(self._remaining)} planned tensors never written, e.g. {min(self._remaining)!r}")
        for fd in self._fds:
            os.fsync(fd)
        self.close()
        if len(self.files) > 1:
            with open(os.path.join(self.dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}, f, indent=2)
