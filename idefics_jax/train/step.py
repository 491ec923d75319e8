"""The jitted train and eval steps (functional: state in, state out).

Loss: next-token cross-entropy over all `vocab_size + additional_vocab_size` logits, weighted by the
pipeline's `loss_mask` (token t is a target when loss_mask[t] = 1; it is predicted from t-1), plus
z-loss `z_loss · logsumexp²` on the same tokens; both normalised by the number of target tokens in
the *global* batch, so gradient accumulation over micro-batches gives exactly the full-batch
gradient.

Guards inside the step: a non-finite loss or gradient, or a loss above `spike_threshold` (computed
by the loop from a rolling window), skips the update — params, optimizer state and the update
counter are left bit-identical — and is reported in the metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from idefics_jax import distributed, sharding
from idefics_jax.data.schema import MODEL_INPUTS
from idefics_jax.train.state import Layout


def loss_sums(model, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row sums over target tokens: (cross-entropy [B], logsumexp² [B], target count [B]), float32."""
    logits = model(**{k: batch[k] for k in MODEL_INPUTS})[:, :-1]
    targets = batch["input_ids"][:, 1:]
    w = batch["loss_mask"][:, 1:].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (nll * w).sum(-1), (lse * lse * w).sum(-1), w.sum(-1)


def _micro(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, ...] → [n, B/n, ...] taking rows with stride n, so every micro-batch spans all devices."""

    def split(x):
        y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(y, (None, "batch") + (None,) * (x.ndim - 1))

    return {k: split(v) for k, v in batch.items()}


def _accumulate(graphdef, p, frozen, micro, total, loss_scale, z_loss, num_datasets, acc_specs=None):
    """Scan over micro-batches [n, rows, ...]: gradients of the loss w.r.t. `p` summed into float32
    accumulators (constrained to `acc_specs` when given), and the loss sums.

    Returns (grads like `p` in float32, ce_sum [], z_sum [], ds_loss [num_datasets], ds_tok [num_datasets]).
    """

    def micro_loss(q, mb):
        ce, z, w = loss_sums(nnx.merge(graphdef, q, frozen), mb)
        return (ce.sum() + z_loss * z.sum()) / total * loss_scale, (ce, z, w, mb["dataset_id"])

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    pin = (
        (lambda t: t) if acc_specs is None else (lambda t: jax.tree.map(jax.lax.with_sharding_constraint, t, acc_specs))
    )

    def accumulate(carry, mb):
        g_acc, ce_acc, z_acc, ds_loss, ds_tok = carry  # g_acc None: the first (only) micro-batch
        (_, (ce, z, w, ds)), g = grad_fn(p, mb)
        onehot = jax.nn.one_hot(ds, num_datasets, dtype=jnp.float32)
        return (
            pin(
                jax.tree.map(lambda b: b.astype(jnp.float32), g)
                if g_acc is None
                else jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g)
            ),
            ce_acc + ce.sum(),
            z_acc + z.sum(),
            ds_loss + onehot.T @ ce,
            ds_tok + onehot.T @ w,
        ), None

    sums = (jnp.float32(0), jnp.float32(0), jnp.zeros(num_datasets), jnp.zeros(num_datasets))
    if jax.tree.leaves(micro)[0].shape[0] == 1:
        # One micro-batch: no loop, and no parameter-sized zeros to add to (0 + g is g exactly).
        return accumulate((None, *sums), jax.tree.map(lambda x: x[0], micro))[0]
    zero = pin(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p))
    return jax.lax.scan(accumulate, (zero, *sums), micro)[0]


def make_train_step(lay: Layout, z_loss: float, micro_batches: int, num_datasets: int) -> Callable:
    """`step(state, batch, spike_threshold, loss_scale) -> (state, metrics)`, jitted with explicit
    shardings and the state donated.

    batch: the global batch (arrays sharded over 'batch'); spike_threshold float32 [] (inf = off);
    loss_scale float32 [] multiplies loss and gradients (1.0; the fault-injection hook of the tests).
    metrics: loss, z_loss, grad_norm, lr, applied (bool), nonfinite (bool), spike (bool), tokens,
    and per-dataset `ds_loss_sum` / `ds_tokens` [num_datasets].

    `lay.trainable_layout` chooses how the gradients are computed (the update is the same):
    - fsdp: differentiate w.r.t. the stored params; per micro-batch the partitioner all-gathers each
      layer's weights over the batch axes (forward, remat and backward) and reduce-scatters its
      gradients.
    - zero1: the stored params are cast to the dtype the model reads them in (`lay.compute_dtypes`)
      and all-gathered over the batch axes ONCE per step (`lay.compute_shardings`: tensor-split
      only); the micro-batch scan runs in a shard_map manual over the batch axes, so each device
      differentiates w.r.t. its replicated compute copy and sums its own rows' gradients in a
      float32 accumulator (kept tensor-split) with no collective over those axes; after the scan
      the per-device sums, stacked over the batch axes, are summed into the master weights'
      layout: one reduce-scatter per parameter onto the optimizer's shards. (A
      replicated weight's gradient outside a shard_map would be all-reduced by the partitioner in
      every micro-batch: the accumulation has to be local by construction.) Needs the 'batch'
      rule to name at least one mesh axis (the default: 'data', 'fsdp').
    """
    graphdef, tx, lr = lay.graphdef, lay.tx, lay.lr
    axes = lay.batch_axes
    specs = jax.tree.map(lambda s: s.spec, lay.compute_shardings)

    def zero1_grads(params, frozen, micro, total, loss_scale):
        # Cast on the master weights' shards (pinned there), then gather: the all-gather moves the
        # compute dtype (bf16 on the GPU), not fp32.
        compute = jax.tree.map(
            lambda x, dt, master, gathered: jax.lax.with_sharding_constraint(
                jax.lax.with_sharding_constraint(x.astype(dt), master), gathered
            ),
            params,
            lay.compute_dtypes,
            lay.shardings["params"],
            lay.compute_shardings,
        )

        def local(compute, frozen, micro, total, loss_scale):
            g, *sums = _accumulate(graphdef, compute, frozen, micro, total, loss_scale, z_loss, num_datasets, specs)
            # Each device's own sum, stacked on a new leading axis over the batch axes: no collective.
            return jax.tree.map(lambda x: x[None], g), *(jax.lax.psum(v, axes) for v in sums)

        local = jax.shard_map(
            local,
            mesh=lay.mesh,
            in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(None, axes), PartitionSpec(), PartitionSpec()),
            out_specs=(PartitionSpec(axes), *(PartitionSpec(),) * 4),
            axis_names=set(axes),
            check_vma=False,
        )
        stacked, *sums = local(compute, frozen, micro, total, loss_scale)
        # Summing the stacked axis into the master weights' layout is one reduce-scatter over the
        # axes they are split on (an all-reduce over those they are replicated on, e.g. 'data'),
        # left to the partitioner: inside the shard_map, where 'tensor' is automatic, XLA gathered
        # the accumulator over 'tensor' before reduce-scattering it (8× the bytes and the memory).
        grads = jax.tree.map(
            lambda x, s: jax.lax.with_sharding_constraint(x.sum(0), s), stacked, lay.shardings["params"]
        )
        return grads, *sums

    def step(state, batch, spike_threshold, loss_scale):
        params, frozen = state["params"], state["frozen"]
        total = jnp.maximum(batch["loss_mask"][:, 1:].astype(jnp.float32).sum(), 1.0)
        micro = _micro(batch, micro_batches)
        if lay.trainable_layout == "zero1":
            grads, ce_sum, z_sum, ds_loss, ds_tok = zero1_grads(params, frozen, micro, total, loss_scale)
        else:
            grads, ce_sum, z_sum, ds_loss, ds_tok = _accumulate(
                graphdef, params, frozen, micro, total, loss_scale, z_loss, num_datasets
            )
        loss = ce_sum / total * loss_scale
        grad_norm = optax.tree.norm(grads)
        nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        spike = ~nonfinite & (loss > spike_threshold)
        applied = ~(nonfinite | spike)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, old)
        new_state = {
            "params": keep(new_params, params),
            "frozen": frozen,
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "updates": state["updates"] + applied.astype(jnp.int32),
        }
        metrics = {
            "loss": loss,
            "z_loss": z_sum / total,
            "grad_norm": grad_norm,
            "lr": lr(state["updates"]),
            "applied": applied,
            "nonfinite": nonfinite,
            "spike": spike,
            "tokens": total,
            "ds_loss_sum": ds_loss,
            "ds_tokens": ds_tok,
        }
        return new_state, metrics

    # The batch's sharding is the one the loop placed it with (over 'batch').
    jitted = jax.jit(
        step, in_shardings=(lay.shardings, None, None, None), out_shardings=(lay.shardings, None), donate_argnums=(0,)
    )
    return distributed.CompiledTogether(jitted, "train_step")


def make_eval_step(lay: Layout, num_datasets: int) -> Callable:
    """`eval_step(state, batch) -> metrics` with the summed cross-entropy and target counts,
    overall (`loss_sum`, `tokens`) and per dataset (`ds_loss_sum`, `ds_tokens` [num_datasets])."""
    graphdef = lay.graphdef

    def evaluate(state, batch):
        ce, _, w = loss_sums(nnx.merge(graphdef, state["params"], state["frozen"]), batch)
        onehot = jax.nn.one_hot(batch["dataset_id"], num_datasets, dtype=jnp.float32)
        return {"loss_sum": ce.sum(), "tokens": w.sum(), "ds_loss_sum": onehot.T @ ce, "ds_tokens": onehot.T @ w}

    return distributed.CompiledTogether(jax.jit(evaluate, in_shardings=(lay.shardings, None)), "eval_step")
