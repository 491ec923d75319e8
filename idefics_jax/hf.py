"""The one table between HF `IdeficsForVisionText2Text` parameter names and our state paths.

Our state is scan-stacked: per-layer HF tensors become slices of one array with leading layer axes
(ViT layers [n], perceiver blocks [depth], cross-attention layers [blocks], decoder layers
[blocks, interval] — HF layer i is our [i // interval, i % interval]). Linear kernels are stored
[in, out] (HF [out, in]); the ViT patch conv [E, C, P, P] is stored as a [C*P*P, E] matrix.

The table is derived from our state tree (`entries(config)`), so a parameter added to a module
without a rule here is an error rather than a silent omission. The converters (tools/) and
`idefics_jax.from_hf` both read and write through `Entry.to_ours` / `Entry.to_hf`, one tensor at a
time, so memory stays bounded by the largest stacked parameter.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from idefics_jax.config import IdeficsConfig
from idefics_jax.errors import UserError

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One of our (possibly stacked) parameters and the HF tensors it holds.

    path: our state path; template: HF name with '{i}' for the layer index (none if unstacked);
    stack: leading stacked dims of our array (() | (n,) | (blocks, interval));
    kind: 'linear' (transpose), 'conv' (patch conv ⇄ matrix) or 'copy';
    shape: our full array shape (stack + per-layer shape);
    conv_in: for 'conv', HF's kernel dims after the output channels, (C, P, P).
    """

    path: Path
    template: str
    stack: tuple[int, ...]
    kind: str
    shape: tuple[int, ...]
    conv_in: tuple[int, ...] = ()

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[len(self.stack) :]

    def hf_items(self) -> list[tuple[tuple[int, ...], str]]:
        """(index into our leading stack dims, HF tensor name) for every HF tensor of this entry."""
        if not self.stack:
            return [((), self.template)]
        out = []
        for idx in itertools.product(*(range(n) for n in self.stack)):
            flat = int(np.ravel_multi_index(idx, self.stack))
            out.append((idx, self.template.format(i=flat)))
        return out

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Shape of one HF tensor of this entry."""
        s = self.layer_shape
        if self.kind == "linear":
            return (s[1], s[0])
        if self.kind == "conv":
            return (s[1], *self.conv_in)
        return s

    def to_ours(self, t: np.ndarray) -> np.ndarray:
        """One HF tensor → our per-layer slice."""
        if self.kind == "linear":
            return t.T
        if self.kind == "conv":
            return t.reshape(t.shape[0], -1).T
        return t

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our per-layer slice → the HF tensor (contiguous)."""
        if self.kind == "linear":
            return np.ascontiguousarray(x.T)
        if self.kind == "conv":
            return np.ascontiguousarray(x.T.reshape(x.shape[1], *self.conv_in))
        return np.ascontiguousarray(x)


def _leaf_rule(rest: Path) -> tuple[str, str]:
    """Our trailing path inside a layer → (HF suffix, kind)."""
    *mods, leaf = rest
    if leaf == "kernel":
        return ".".join([*mods, "weight"]), "linear"
    return ".".join([*mods, leaf]), "copy"


def _rule(path: Path, config: IdeficsConfig) -> tuple[str, tuple[int, ...], str]:
    """Our path → (HF template, stack dims, kind). Raises KeyError for an unknown path."""
    nb, k = config.num_blocks, config.cross_layer_interval
    head, rest = path[0], path[1:]
    if head == "embed_tokens":
        return (
            {
                "weight": "model.embed_tokens.weight",
                "additional_embedding": "model.embed_tokens.additional_embedding.weight",
            }[rest[0]],
            (),
            "copy",
        )
    if head == "lm_head":
        return {"weight": "lm_head.weight", "additional_fc": "lm_head.additional_fc.weight"}[rest[0]], (), "linear"
    if head == "norm":
        return "model.norm.weight", (), "copy"
    if head == "vision_model":
        if rest[0] == "embeddings":
            name = rest[1]
            if name == "patch_embedding":
                return "model.vision_model.embeddings.patch_embedding.weight", (), "conv"
            suffix = "class_embedding" if name == "class_embedding" else f"{name}.weight"
            return f"model.vision_model.embeddings.{suffix}", (), "copy"
        if rest[0] == "layers":
            suffix, kind = _leaf_rule(rest[1:])
            return f"model.vision_model.encoder.layers.{{i}}.{suffix}", (config.vision.num_hidden_layers,), kind
        if rest[0] in ("pre_layrnorm", "post_layernorm"):
            return f"model.vision_model.{rest[0]}.{rest[1]}", (), "copy"
    if head == "perceiver_resampler":
        if rest[0] in ("latents",):
            return "model.perceiver_resampler.latents", (), "copy"
        if rest[0] == "layer_norm":
            return f"model.perceiver_resampler.layer_norm.{rest[1]}", (), "copy"
        if rest[0] == "blocks":
            sub = {"attn": "0", "mlp": "1"}[rest[1]]
            suffix, kind = _leaf_rule(rest[2:])
            return (f"model.perceiver_resampler.blocks.{{i}}.{sub}.{suffix}", (config.perceiver.resampler_depth,), kind)
    if head == "blocks":
        if rest[0] == "gated_cross_attn_layer":
            suffix, kind = _leaf_rule(rest[1:])
            return f"model.gated_cross_attn_layers.{{i}}.{suffix}", (nb,), kind
        if rest[0] == "layers":
            suffix, kind = _leaf_rule(rest[1:])
            return f"model.layers.{{i}}.{suffix}", (nb, k), kind
    raise KeyError(f"no HF name rule for our parameter {'.'.join(path)}")


def abstract_state(config: IdeficsConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of `Idefics(config)`: shapes and dtypes only, nothing allocated."""
    from idefics_jax.models import Idefics

    abstract = nnx.eval_shape(lambda: Idefics(config, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def entries(config: IdeficsConfig, state: nnx.State | None = None) -> list[Entry]:
    """Every parameter of `Idefics(config)` with its HF names, in state order."""
    if state is None:
        state = abstract_state(config)[1]
    conv_in = (config.vision.num_channels, config.vision.patch_size, config.vision.patch_size)
    out = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(p) for p in path)
        template, stack, kind = _rule(path, config)
        out.append(Entry(path, template, stack, kind, tuple(var.shape), conv_in if kind == "conv" else ()))
    return out


def hf_names(config: IdeficsConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the model → its HF shape."""
    return {name: e.hf_shape for e in entries(config) for _, name in e.hf_items()}


# Reading HF checkpoints --------------------------------------------------------------------------


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
        self._where: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        self._bins: dict[str, Mapping[str, Any]] = {}
        names = set(os.listdir(self.dir)) if os.path.isdir(self.dir) else set()
        if not names:
            raise CheckpointError(f"{self.dir}: not a directory with an HF checkpoint")
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if index_name in names:
                path = os.path.join(self.dir, index_name)
                try:
                    with open(path) as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{path}: unreadable index ({e}); expected JSON with a 'weight_map'") from e
                self._where = {k: os.path.join(self.dir, v) for k, v in weight_map.items()}
                break
        else:
            for single in ("model.safetensors", "pytorch_model.bin"):
                if single in names:
                    path = os.path.join(self.dir, single)
                    self._where = {k: path for k in self._keys_of(path)}
                    break
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

    def _keys_of(self, path: str) -> list[str]:
        h = self._open(path)
        return list(h.keys())

    def keys(self) -> list[str]:
        return list(self._where)

    def close(self) -> None:
        """Unmaps the open files; later reads reopen them.

        Pages read through a memory map stay resident (and count in the process's RSS) while the file
        is mapped, so a streaming reader calls this after each stacked parameter to keep RSS at one
        parameter rather than growing to the whole checkpoint.
        """
        self._handles.clear()
        self._bins.clear()

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as numpy (bf16 is returned as ml_dtypes.bfloat16)."""
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        path = self._where[name]
        h = self._open(path)
        try:
            if path.endswith(".safetensors"):
                return h.get_tensor(name)
            t = h[name]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {name!r} could not be read ({e})") from e
        import torch

        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def read_stacked(entry: Entry, read: Callable[[str], np.ndarray], dtype: Any) -> np.ndarray:
    """Our full (stacked) array for `entry`, reading its HF tensors one by one via `read(name)`."""
    out = np.empty(entry.shape, dtype=dtype)
    for idx, name in entry.hf_items():
        t = read(name)
        if tuple(t.shape) != entry.hf_shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(t.shape)}; expected {entry.hf_shape} from config.json"
            )
        out[idx] = entry.to_ours(t).astype(dtype, copy=False)  # no extra copy: assignment copies
    return out


def iter_hf(entry: Entry, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, HF tensor) for every layer slice of our stacked `value`."""
    for idx, name in entry.hf_items():
        yield name, entry.to_hf(np.asarray(value[idx]))


# Non-parameter buffers that some saved HF checkpoints carry (older transformers persisted them);
# transformers itself ignores them on load.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def check_keys(config: IdeficsConfig, names: list[str], where: str, expected: dict | None = None) -> None:
    """Raises CheckpointError naming the first missing or unexpected HF tensor (buffers are ignored).

    `expected` is `hf_names(config)` when the caller already has it."""
    expected = hf_names(config) if expected is None else expected
    got = {n for n in names if not n.endswith(BUFFER_SUFFIXES)}
    if config.tie_word_embeddings:
        got -= {"lm_head.weight", "lm_head.additional_fc.weight"}
    missing = [n for n in expected if n not in got]
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    unexpected = sorted(got - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected "
            "in all); not part of the model config.json describes"
        )


def load_state(
    config: IdeficsConfig, reader: HFReader, mesh: Any = None, rules: Any = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) with every parameter read from `reader`, cast to `config.param_dtype`.

    With `mesh`, each parameter is placed with its NamedSharding (by `rules`, default the active
    table) as soon as it is read; the reader's file maps are dropped after each parameter.
    """
    from idefics_jax import sharding

    graphdef, state = abstract_state(config)
    table = entries(config, state)
    check_keys(config, reader.keys(), reader.dir, {name: e.hf_shape for e in table for _, name in e.hf_items()})
    shardings = sharding.state_shardings(state, mesh, rules) if mesh is not None else None
    flat_sh = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    by_path = {e.path: e for e in table}
    for path, var in nnx.to_flat_state(state):
        value = read_stacked(by_path[tuple(str(p) for p in path)], reader.get, dtype)
        target = flat_sh.get(path)
        var.set_value(jax.device_put(value, target.get_value() if target is not None else None))
        reader.close()
    return graphdef, state


class StateDictReader:
    """`HFReader`'s interface over an in-memory state dict (torch tensors or numpy arrays)."""

    def __init__(self, state_dict: Mapping[str, Any], where: str = "state_dict"):
        self._sd = state_dict
        self.dir = where

    def keys(self) -> list[str]:
        return list(self._sd)

    def close(self) -> None:
        """Nothing to release (the state dict is in memory)."""

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as numpy."""
        if name not in self._sd:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        t = self._sd[name]
        return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


# Where a tensor lives, for error messages ---------------------------------------------------------


def _reader_files(reader: HFReader) -> tuple[str, dict[str, str]]:
    """(the file that lists the tensors: index JSON or the single weights file, name → file)."""
    where = reader._where
    files = sorted(set(where.values()))
    index = [
        os.path.join(reader.dir, n)
        for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
        if os.path.exists(os.path.join(reader.dir, n))
    ]
    return (index[0] if index else files[0] if files else reader.dir), where


def listing_file(reader: HFReader) -> str:
    """The file of an HF directory that lists its tensors (the index JSON, else the single weights file)."""
    return _reader_files(reader)[0]


def file_of(reader: HFReader, name: str) -> str:
    """The weights file holding tensor `name` (the listing file if it is not in the checkpoint)."""
    listing, where = _reader_files(reader)
    return where.get(name, listing)


# Writing HF checkpoints: streamed safetensors shards ----------------------------------------------

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
    memory is one tensor. Shards are filled in the order given, a new shard starting when the next
    tensor would exceed `max_shard_size` bytes (a larger tensor gets a shard of its own), as
    transformers' `save_pretrained` does; one shard is `model.safetensors`, more are
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.

    plan: [(HF name, shape, numpy dtype)] in the order to lay out.
    """

    def __init__(self, directory: str | os.PathLike, plan: list[tuple[str, tuple[int, ...], Any]], max_shard_size: int):
        self.dir = os.fspath(directory)
        shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
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
            for name, shape, dtype in shard:
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
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
            for name, shape, dtype in shard:
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
