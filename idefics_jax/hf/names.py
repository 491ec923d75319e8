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
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from flax import nnx

from idefics_jax.config import IdeficsConfig

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

    def nbytes(self, dtype: Any) -> int:
        """Bytes of our full (stacked) array in `dtype`."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(dtype).itemsize

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


def entries(config: IdeficsConfig, state: nnx.State | None = None) -> list[Entry]:
    """Every parameter of `Idefics(config)` with its HF names, in state order.

    `state`: the model's (abstract) state when the caller already has it; built otherwise."""
    if state is None:
        from idefics_jax.models import abstract_state

        state = abstract_state(config)[1]
    conv_in = (config.vision.num_channels, config.vision.patch_size, config.vision.patch_size)
    out = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(p) for p in path)
        template, stack, kind = _rule(path, config)
        out.append(Entry(path, template, stack, kind, tuple(var.shape), conv_in if kind == "conv" else ()))
    return out


def hf_shapes(table: Iterable[Entry]) -> dict[str, tuple[int, ...]]:
    """HF tensor name → its HF shape, for every HF tensor of the given entries (in their order)."""
    return {name: e.hf_shape for e in table for _, name in e.hf_items()}


def hf_names(config: IdeficsConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the model → its HF shape."""
    return hf_shapes(entries(config))


def iter_hf(entry: Entry, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, HF tensor) for every layer slice of our stacked `value` (shape `entry.shape`)."""
    for idx, name in entry.hf_items():
        yield name, entry.to_hf(np.asarray(value[idx]))
