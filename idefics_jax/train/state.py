"""Train state: parameters split into trainable and frozen, the optimizer over the trainable ones,
and the shardings of all of it.

The state is a plain dict pytree, so the train step is a plain `jax.jit` over it:
  params    nnx.State of the trainable Params (the ones `models.freeze.trainable_mask` selects)
  frozen    nnx.State of the frozen Params (no gradient, no optimizer state; laid out by
            `train.frozen_sharding_rules` when set), stored in
            `train.frozen_dtype` (bf16 in the GPU configs: lossless there, since the matmuls read
            them in bf16 anyway, and it halves their memory and FSDP all-gather traffic)
  opt_state optax state over `params` only
  step      int32 [] training steps taken (= the data position)
  updates   int32 [] updates applied (steps minus skipped ones; drives the LR schedule)

The stored state is the same under both `train.trainable_layout`s (so a checkpoint restores into
either); zero1 only adds, for the step, the layout of the per-step compute copy of `params`
(`Layout.compute_shardings` / `compute_dtypes`) and the mesh axes it is replicated over
(`Layout.batch_axes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from idefics_jax import models, sharding
from idefics_jax.config import IdeficsConfig
from idefics_jax.errors import UserError
from idefics_jax.models import Idefics
from idefics_jax.models import layers as L
from idefics_jax.models.freeze import trainable_mask
from idefics_jax.run_config import Run, parse


def schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup 0 → `lr` over `warmup_steps`, then linear decay to `end_lr` at `decay_steps`."""
    warm = optax.linear_schedule(0.0, opt.lr, max(opt.warmup_steps, 1))
    decay = optax.linear_schedule(opt.lr, opt.end_lr, max(opt.decay_steps - opt.warmup_steps, 1))
    return optax.join_schedules([warm, decay], [opt.warmup_steps])


def _decays(owner: nnx.Module, leaf: str) -> bool:
    # No weight decay on norms, gates and biases (IDEFICS / m4 recipe).
    return not (isinstance(owner, (L.RMSNorm, L.LayerNorm)) or leaf == "bias" or leaf.startswith("alpha"))


def _read_in_fp32(owner: nnx.Module, leaf: str) -> bool:
    # The model reads norm scales/biases and the tanh gates in float32 and every other parameter
    # cast to its compute dtype (models/layers.py): zero1's compute copy casts exactly those, so it
    # computes the same function as the fp32 master weights.
    return isinstance(owner, (L.RMSNorm, L.LayerNorm)) or leaf.startswith("alpha")


def optimizer(opt: ml_collections.ConfigDict, lr: optax.Schedule, decay_mask: Any) -> optax.GradientTransformation:
    """Global-norm clipping (off when clip_norm is 0) then AdamW on schedule `lr` with `decay_mask`
    (a pytree of bools like the params)."""
    adamw = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask)
    if opt.clip_norm == 0:
        return optax.chain(optax.identity(), adamw)  # same state structure as with clipping
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)


@dataclasses.dataclass
class Layout:
    """Everything static about the train state: module graph, abstract state, shardings, optimizer."""

    model_config: IdeficsConfig
    graphdef: nnx.GraphDef
    abstract: dict[str, Any]
    shardings: dict[str, Any]
    tx: optax.GradientTransformation
    lr: optax.Schedule
    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    micro_batch_rows_per_device: int
    trainable_layout: str  # 'fsdp' | 'zero1' (train.trainable_layout)
    batch_axes: tuple[str, ...]  # mesh axes the 'batch' rule splits activations over
    compute_shardings: Any  # zero1: trainable params' shardings with `batch_axes` dropped (tensor only)
    compute_dtypes: Any  # zero1: per trainable leaf, the dtype the model reads it in

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """The mesh and the logical-axis rules in force for tracing, compiling and running on them."""
        with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
            yield

    def params_shardings(self) -> nnx.State:
        """Shardings of all params (trainable ∪ frozen), in `nnx.state(model, nnx.Param)` layout."""
        return nnx.merge_state(self.shardings["params"], self.shardings["frozen"])

    def abstract_params(self) -> nnx.State:
        return nnx.merge_state(self.abstract["params"], self.abstract["frozen"])


def micro_batch_rows(global_batch: int, micro_batches: int, mesh: jax.sharding.Mesh) -> int:
    """Rows each data×fsdp shard gets per micro-batch; ValueError naming the fields when the global
    batch does not split into `micro_batches` micro-batches each divisible by those devices."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % micro_batches or (global_batch // micro_batches) % shards:
        raise UserError(
            f"data.global_batch_size={global_batch} must split into train.micro_batches={micro_batches} "
            f"micro-batches each divisible by the data×fsdp devices ({shards})"
        )
    return global_batch // micro_batches // shards


def layout(run: Run | ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Layout:
    """Abstract train state (nothing allocated) and its shardings on `mesh` for a run config
    (a ConfigDict is validated first)."""
    run = parse(run)
    config, model_config = run.config, run.model
    rows = micro_batch_rows(config.data.global_batch_size, config.train.micro_batches, mesh)
    rules = sharding.rules_from_config(config.get("sharding_rules"))
    # Frozen weights may be laid out differently: e.g. kept whole across FSDP shards (split over
    # 'tensor' only) so that no step re-gathers them.
    frozen_rules = (
        sharding.rules_from_config(config.train.frozen_sharding_rules)
        if config.train.get("frozen_sharding_rules")
        else rules
    )
    abstract_model = models.abstract_model(model_config)
    mask = {p: bool(v.get_value()) for p, v in nnx.to_flat_state(trainable_mask(abstract_model))}
    owners = {tuple(p): n for p, n in nnx.iter_graph(abstract_model) if isinstance(n, nnx.Module)}
    graphdef, params, frozen = nnx.split(abstract_model, lambda path, _: mask[tuple(path)], nnx.Param)
    frozen_dtype = jnp.dtype(config.train.get("frozen_dtype") or model_config.param_dtype)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype), frozen)
    if not jax.tree.leaves(params):
        raise UserError("model config freezes every parameter: nothing to train")
    by_leaf = lambda rule: nnx.from_flat_state(
        [(p, v.replace(rule(owners[tuple(p[:-1])], str(p[-1])))) for p, v in nnx.to_flat_state(params)]
    )
    decay = by_leaf(_decays)
    compute = jnp.dtype(model_config.dtype)
    compute_dtypes = by_leaf(lambda o, leaf: jnp.dtype(jnp.float32) if _read_in_fp32(o, leaf) else compute)
    lr = schedule(config.train.optimizer)
    tx = optimizer(config.train.optimizer, lr, decay)
    opt_abstract = jax.eval_shape(tx.init, params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = {"params": params, "frozen": frozen, "opt_state": opt_abstract, "step": scalar, "updates": scalar}
    p_sh = sharding.state_shardings(params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {
        "params": p_sh,
        "frozen": sharding.state_shardings(frozen, mesh, frozen_rules),
        "opt_state": _like_params(opt_abstract, params, p_sh, replicated),
        "step": replicated,
        "updates": replicated,
    }
    batch_axes = logical_axes(rules, "batch")
    if config.train.trainable_layout == "zero1" and not batch_axes:
        raise UserError(
            "train.trainable_layout='zero1' needs the sharding_rules' 'batch' entry to name mesh axes "
            "(the compute copy is replicated over them); it names none"
        )
    compute_shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, sharding.drop_axes(s.spec, batch_axes)), p_sh, is_leaf=_is_sharding
    )
    return Layout(
        model_config,
        graphdef,
        abstract,
        shardings,
        tx,
        lr,
        mesh,
        rules,
        rows,
        config.train.trainable_layout,
        batch_axes,
        compute_shardings,
        compute_dtypes,
    )


def _is_sharding(x: Any) -> bool:
    return isinstance(x, NamedSharding)


def logical_axes(rules: sharding.Rules, name: str) -> tuple[str, ...]:
    """The mesh axes logical axis `name` maps to under `rules` (() when unsplit)."""
    target = dict(rules).get(name)
    return (target,) if isinstance(target, str) else tuple(target or ())


def _like_params(tree: Any, params: Any, params_shardings: Any, other: NamedSharding) -> Any:
    """Shardings for an optimizer state: every subtree shaped like `params` (Adam's mu, nu, ...)
    takes the params' shardings, everything else (counts) is replicated."""
    target = jax.tree.structure(params)
    leaves_sh = jax.tree.leaves(params_shardings)

    def is_params_like(x):
        try:
            return jax.tree.structure(x) == target
        except Exception:
            return False

    return jax.tree.map(
        lambda x: jax.tree.unflatten(target, leaves_sh) if is_params_like(x) else other, tree, is_leaf=is_params_like
    )


def init(lay: Layout, seed: int, params: nnx.State | None = None) -> dict[str, Any]:
    """A fresh train state on the mesh: random init (or the given full params, e.g. restored from a
    converted checkpoint), zero optimizer moments, step 0."""
    if params is None:

        def make():
            model = Idefics(lay.model_config, rngs=nnx.Rngs(seed))
            return nnx.state(model, nnx.Param)

        params = jax.jit(make, out_shardings=lay.params_shardings())()
    trainable, frozen = split_params(lay, params)

    def start(trainable, frozen):
        frozen = jax.tree.map(lambda x, a: x.astype(a.dtype), frozen, lay.abstract["frozen"])
        return {
            "params": trainable,
            "frozen": frozen,
            "opt_state": lay.tx.init(trainable),
            "step": jnp.zeros((), jnp.int32),
            "updates": jnp.zeros((), jnp.int32),
        }

    return jax.jit(start, out_shardings=lay.shardings, donate_argnums=(0, 1))(trainable, frozen)


def split_params(lay: Layout, params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """Full params (nnx.state(model, nnx.Param) layout) → (trainable, frozen) as in `lay`."""
    flat = dict(nnx.to_flat_state(params))
    pick = lambda abstract: nnx.from_flat_state([(p, flat[p]) for p, _ in nnx.to_flat_state(abstract)])
    return pick(lay.abstract["params"]), pick(lay.abstract["frozen"])


def full_params(state: dict[str, Any]) -> nnx.State:
    """All parameters of a train state, in `nnx.state(model, nnx.Param)` layout."""
    return nnx.merge_state(state["params"], state["frozen"])
