"""Mesh, logical-axis rules, and the shardings of the model state and activations.

Every parameter carries logical axis names (`nnx.Param(..., axes=(...))`, see models/layers.py). One
rules table maps logical names to the mesh axes ('data', 'fsdp', 'tensor'); changing the layout
(pure FSDP, more tensor parallelism, ...) is a change of this table or of the mesh config, never of
model code.

Default rules (with the 80B's mesh, 64 nodes x 8 GPUs: fsdp=64, tensor=8): Megatron inside a node — q/k/v and
gate/up column-parallel, o/down row-parallel over 'tensor', embedding rows and LM-head columns
vocab-parallel — and FSDP (weights' model-width axis over 'fsdp') across nodes. Activations are
split over the batch on ('data', 'fsdp') and replicated over 'tensor'.

Sequence parallelism (Megatron-LM's; `configs.common.sequence_parallel()`, which the 80B config
uses) is the rule ('length', 'tensor'): the decoder's residual stream between layers is split over 'tensor' along the
sequence, so each tensor-parallel all-reduce becomes a reduce-scatter after o_proj/down_proj and an
all-gather before q/k/v and gate/up (pairs XLA's windowed einsum overlaps with the matmuls), and
norms and residual adds run on 1/tensor of the tokens. The image activations (ViT patches,
perceiver latents, the cross-attention's image states) have their own axis, 'vision_length',
unsplit by default.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idefics_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vision_length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
)

_rules: Rules = DEFAULT_RULES


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> Rules:
    """Normalises a rules table from a config (list of [logical, mesh axis | list | None])."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    known = {name for name, _ in DEFAULT_RULES}
    for i, entry in enumerate(rules):
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"sharding rule #{i}={entry!r}; expected (logical_name, mesh_axes)")
        name, target = entry
        if name not in known:
            raise ValueError(f"sharding rule #{i} names logical axis {name!r}; expected one of {sorted(known)}")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        for t in targets:
            if t not in MESH_AXES:
                raise ValueError(f"sharding rule {name!r} -> {t!r}; expected mesh axes from {MESH_AXES}")
        out.append((name, None if not targets else targets[0] if len(targets) == 1 else targets))
    return tuple(out)


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Makes `rules` the table that `constrain` (activations) uses while tracing inside the block."""
    global _rules
    prev, _rules = _rules, rules
    try:
        yield
    finally:
        _rules = prev


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over ('data', 'fsdp', 'tensor') from a config {data, fsdp, tensor}; one -1 fills the rest.

    Raises ValueError naming the field when the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise UserError(f"mesh: only one axis may be -1, got {unknown}")
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise UserError(f"mesh.{a}={s}; expected a positive size or -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if n % known:
            raise UserError(f"mesh: {n} devices do not factor as {sizes} (the fixed axes multiply to {known})")
        sizes[unknown[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise UserError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices, {n} found; to check this layout without "
            "them, use python -m idefics_jax.plan --config <this config>"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        return jax.make_mesh(
            shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
        )
    except (ValueError, NotImplementedError, AssertionError):
        # Fake or unusual device sets have no physical topology to optimise for.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None], rules: Rules | None = None, shape: Sequence[int] | None = None, mesh: Any = None
) -> PartitionSpec:
    """PartitionSpec for logical `axes` under `rules`.

    A mesh axis is used at most once per spec (first dimension wins). With `shape` and `mesh`, a mesh
    axis whose size does not divide the dimension is dropped, so the dimension is replicated instead
    (e.g. 257 ViT positions over fsdp=64).
    """
    table = dict(_rules if rules is None else rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for t in targets:
            if t in used:
                continue
            if shape is not None and mesh is not None:
                size = mesh.shape[t]
                if shape[i] % (size * math.prod(mesh.shape[k] for k in keep)):
                    continue
            keep.append(t)
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*spec)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state: Any, mesh: Any, rules: Rules | None = None) -> Any:
    """PartitionSpec tree (same structure as `state`, an nnx State of Variables or of arrays+axes)."""

    def spec(v):
        axes = v.get_metadata().get("axes") if _is_var(v) else None
        value = v.get_value() if _is_var(v) else v
        if axes is None:
            s = PartitionSpec()
        else:
            s = logical_to_spec(axes, rules, value.shape, mesh)
        return v.replace(s) if _is_var(v) else s

    return jax.tree.map(spec, state, is_leaf=_is_var)


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedSharding for every leaf of a model state (abstract or concrete), by its logical axes."""
    specs = state_specs(state, mesh, rules)

    def named(v):
        s = v.get_value() if _is_var(v) else v
        ns = NamedSharding(mesh, s)
        return v.replace(ns) if _is_var(v) else ns

    return jax.tree.map(named, specs, is_leaf=lambda x: _is_var(x) or isinstance(x, PartitionSpec))


def drop_axes(spec: PartitionSpec, axes: Sequence[str]) -> PartitionSpec:
    """`spec` with the mesh axes `axes` removed (those dimensions replicated over them instead):
    P('fsdp', 'tensor') minus ('data', 'fsdp') → P(None, 'tensor')."""
    out = []
    for entry in spec:
        keep = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in axes)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axes under the current mesh; a no-op without one.

    Inside a `shard_map` that is manual over some mesh axes (zero1's micro-batch loop, train/step.py)
    the array is already this device's block over those axes: they are dropped from the constraint."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, None, x.shape, mesh)
    if mesh.manual_axes:
        spec = drop_axes(spec, mesh.manual_axes)
    return jax.lax.with_sharding_constraint(x, spec)
