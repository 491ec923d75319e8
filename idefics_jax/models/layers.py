"""Building blocks shared by the vision tower, the perceiver and the decoder.

Conventions (see DESIGN.md §3):
- Every parameter is an `nnx.Param` carrying `axes`: one logical axis name (or None) per dimension;
  `idefics_jax.sharding` maps them to mesh axes through one rules table.
- Linear kernels are stored [in, out] (HF stores [out, in]; `idefics_jax.hf` transposes).
- Matmuls run in the config's compute dtype; norms and softmax in float32.
- Layers of the same kind are created stacked (`stack`) and run with `scan`, so compile time does not
  grow with depth (unless `scan_unroll` says otherwise); `remat` is applied once per layer inside the
  scan body.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from idefics_jax import sharding

Axes = tuple[str | None, ...]


def dtype_of(name: str) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' → the jnp dtype."""
    return jnp.dtype(name)


def param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
    """An `nnx.Param` of `shape` initialised by `init(key, shape, dtype)` with logical `axes`.

    `rngs` may be None only for the constant initialisers (`ones`, `zeros`)."""
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {tuple(shape)} given {len(axes)} logical axes {axes}")
    if rngs is None and init not in (ones, zeros):
        raise ValueError(f"param of shape {tuple(shape)} needs random init but no rngs were given")
    key = rngs.params() if rngs is not None else None
    return nnx.Param(init(key, tuple(shape), dtype), axes=tuple(axes))


def normal(std: float) -> Callable:
    """Initialiser N(0, std²) (HF's `_init_weights` for Linear/Embedding)."""
    return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


ACT_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel [in, out] with logical axes `axes`; bias [out] on axes[1]."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        axes: Axes,
        *,
        bias: bool,
        std: float,
        dtype: str,
        param_dtype: str,
        rngs: nnx.Rngs | None,
    ):
        self.dtype = dtype_of(dtype)
        self.kernel = param(rngs, normal(std), (d_in, d_out), axes, dtype_of(param_dtype))
        self.bias = param(rngs, zeros, (d_out,), (axes[1],), dtype_of(param_dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] → [..., out] in the compute dtype."""
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """LLaMA/T5 RMS norm over the last axis, computed in float32 (HF `IdeficsRMSNorm`)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: str, axes: Axes = (None,)):
        self.eps = eps
        self.weight = param(None, ones, (dim,), axes, dtype_of(param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] → same shape, in x's dtype."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * y).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Affine LayerNorm over the last axis, computed in float32 (torch `nn.LayerNorm`)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: str, axes: Axes = (None,)):
        self.eps = eps
        self.weight = param(None, ones, (dim,), axes, dtype_of(param_dtype))
        self.bias = param(None, zeros, (dim,), axes, dtype_of(param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] → same shape, in x's dtype."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class GatedMLP(nnx.Module):
    """LLaMA SwiGLU MLP: down(act(gate(x)) * up(x)); gate/up column-, down row-parallel."""

    def __init__(
        self, d: int, hidden: int, act: str, *, std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs | None
    ):
        kw = dict(bias=False, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, hidden, ("embed", "mlp"), **kw)
        self.up_proj = Linear(d, hidden, ("embed", "mlp"), **kw)
        self.down_proj = Linear(hidden, d, ("mlp", "embed"), **kw)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d] → [B, T, d]."""
        h = ACT_FNS[self.act](self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, N*H] → [B, T, N, H]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


# Queries and keys per tile of the blockwise kernel: its [B, N, BLOCK, BLOCK] score tiles stay in
# cache on CPU, and a causal mask leaves nearly half the tiles of a long row fully masked (skipped).
BLOCK = 64
_logged: set[str] = set()


class Mask(NamedTuple):
    """Which keys each query may see, carried by structure (never a dense [B, T, S] array).

    Query t of row b sees key s iff every present condition holds:
      kv_valid[b, s]                  bool [B, S]      padding (None: every key is real)
      kv_pos[b, s] <= q_pos[b, t]     int [B, S], [B, T]  causality (None: not causal)
      q_seg[b, t] == kv_seg[b, s]     int [B, T], [B, S]  packed segments (None: one segment)
      q_images[b, t, kv_image[s]]     bool [B, T, N], int [S]  cross-attention: key s belongs to
                                      image kv_image[s] (None: no image condition)
    A query that sees no key gets a zero output (as torch's SDPA since 2.5).
    """

    kv_valid: jax.Array | None = None
    q_pos: jax.Array | None = None
    kv_pos: jax.Array | None = None
    q_seg: jax.Array | None = None
    kv_seg: jax.Array | None = None
    q_images: jax.Array | None = None
    kv_image: jax.Array | None = None

    def allowed(self) -> jax.Array | None:
        """bool [B, 1, T, S], or None when nothing is masked. XLA fuses it into the select that uses it."""
        terms = []
        if self.kv_valid is not None:
            terms.append(self.kv_valid[:, None, :])
        if self.q_pos is not None:
            terms.append(self.kv_pos[:, None, :] <= self.q_pos[:, :, None])
        if self.q_seg is not None:
            terms.append(self.q_seg[:, :, None] == self.kv_seg[:, None, :])
        if self.q_images is not None:
            terms.append(jnp.take(self.q_images, self.kv_image, axis=2))
        if not terms:
            return None
        out = terms[0]
        for t in terms[1:]:
            out = out & t
        return out[:, None]

    @property
    def segmented(self) -> bool:
        return self.q_seg is not None or self.q_images is not None


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask | None, scale: float, impl: str = "xla"
) -> jax.Array:
    """Softmax attention, q [B, T, N, H] × k, v [B, S, N, H] → [B, T, N*H] in v's dtype.

    `mask` says which keys each query sees (None: all). Scores and softmax run in float32. `impl`
    (IdeficsConfig.attention) chooses the kernel; all give the same numbers up to rounding:
      xla        dense [B, N, T, S] scores in one pass; the custom VJP saves the log-sum-exp and
                 recomputes the probabilities (one extra q·kᵀ; no [B, N, T, S] residual)
      blockwise  flash-style: queries and keys in tiles of BLOCK with an online softmax; a tile in
                 which no query sees any key is skipped (`lax.cond`), so causal rows cost about
                 half; the custom VJP recomputes each tile's probabilities from the saved
                 log-sum-exp (memory O(T), not O(T·S))
      cudnn      `jax.nn.dot_product_attention(implementation="cudnn")` on GPU with bf16/fp16 and a
                 head dim that is a multiple of 8 (`_fused`); otherwise xla, with the reason logged once.
    """
    if impl not in ("xla", "blockwise", "cudnn"):
        raise ValueError(f"attention impl={impl!r}; expected one of ('xla', 'blockwise', 'cudnn')")
    if impl == "cudnn":
        reason = _cudnn_refusal(q, k, mask)
        if reason is None:
            return _fused(q, k, v, mask, scale, "cudnn")
        if reason not in _logged:
            _logged.add(reason)
            logging.getLogger(__name__).warning("attention='cudnn' falls back to 'xla': %s", reason)
        impl = "xla"
    with jax.named_scope("attention"):
        qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N, T|S, H]: heads as a batch axis
        mask = mask or Mask()
        if impl == "blockwise" and max(q.shape[1], k.shape[1]) > BLOCK:
            out = _blockwise(qt, kt, vt, mask, scale)
        else:
            out = _dense(qt, kt, vt, mask, scale)
        return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def _cudnn_refusal(q: jax.Array, k: jax.Array, mask: Mask | None) -> str | None:
    """Why cuDNN's fused attention cannot run this call (None: it can)."""
    if jax.default_backend() != "gpu":
        return f"no GPU (backend {jax.default_backend()!r})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"compute dtype {q.dtype} (cuDNN needs bfloat16 or float16)"
    if q.shape[-1] % 8:
        return f"head dim {q.shape[-1]} (cuDNN needs a multiple of 8)"
    if _as_bias(q, k, mask) and (q.shape[1] % 2 or k.shape[1] % 2):
        return f"{q.shape[1]} queries × {k.shape[1]} keys with a mask (cuDNN's bias needs even lengths)"
    return None


def _plain_causal(q: jax.Array, k: jax.Array, mask: Mask | None) -> bool:
    """Whether `mask` is causality alone over as many keys as queries (cuDNN's `is_causal`)."""
    return (
        mask is not None
        and mask.q_pos is not None
        and mask.kv_valid is None
        and not mask.segmented
        and q.shape[1] == k.shape[1]
    )


def _as_bias(q: jax.Array, k: jax.Array, mask: Mask | None) -> bool:
    """Whether `_fused` hands `mask` to the kernel as a dense boolean (anything but none or plain causality)."""
    return mask is not None and any(x is not None for x in mask) and not _plain_causal(q, k, mask)


def _fused(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask | None, scale: float, implementation: str | None
) -> jax.Array:
    """`jax.nn.dot_product_attention` on q [B, T, N, H], k, v [B, S, N, H] → [B, T, N*H].

    Plain causality (`_plain_causal`) goes as `is_causal`; any other mask as the dense boolean
    `Mask.allowed()` [B, 1, T, S], which the kernel applies as an additive bias (cuDNN builds it
    inside the fused call; no [B, N, T, S] scores reach memory). A bias cannot express a query that
    sees no key (its softmax would spread over the masked keys), so those rows are zeroed
    afterwards, as `attention` defines them. Under a mesh the operands are split by batch and heads
    only: cuDNN's partitioning rejects a split sequence, which sequence parallelism could leave.
    """
    q, k, v = (sharding.constrain(x, ("batch", None, "heads", None)) for x in (q, k, v))
    if not _as_bias(q, k, mask):
        causal = _plain_causal(q, k, mask)
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation=implementation)
    else:
        allowed = sharding.constrain(mask.allowed(), ("batch", None, None, None))
        out = jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale, implementation=implementation)
        seen = allowed[:, 0].any(-1)  # [B, T]
        out = jnp.where(seen[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out.reshape(*out.shape[:2], -1)


def _scores(
    q: jax.Array, k: jax.Array, allowed: jax.Array | None, scale: float, fill: jax.Array | float = -jnp.inf
) -> jax.Array:
    """float32 scaled scores [B, N, T, S], `fill` (-inf) where not allowed."""
    s = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    return s if allowed is None else jnp.where(allowed, s, fill)


def _tile_scores(q: jax.Array, k: jax.Array, allowed: jax.Array | None, scale: float) -> jax.Array:
    """`_scores` of one tile, its mask and -inf passed with q through an optimization barrier. Under a
    differentiated layer scan, JAX's partial evaluation would otherwise split every value of the
    tile that depends only on the mask or on constants (the mask broadcast over heads, the -inf
    fill: bool and float32 [B, N, tq, tk]) out of the `lax.cond` into a scan of its own, computed
    for every tile, skipped or not, and stacked per key tile."""
    q, allowed, fill = jax.lax.optimization_barrier((q, allowed, jnp.float32(-jnp.inf)))
    return _scores(q, k, allowed, scale, fill)


def _finite(m: jax.Array) -> jax.Array:
    """Row maxima with -inf (rows that see no key) replaced by 0, so exp(s - m) stays 0 there, not NaN."""
    return jnp.where(jnp.isneginf(m), 0.0, m)


def _dense_probs(q, k, mask, scale):
    """(float32 probabilities [B, N, T, S], log-sum-exp [B, N, T, 1]: +inf on rows that see no key)."""
    s = _scores(q, k, mask.allowed(), scale)
    m = _finite(s.max(-1, keepdims=True))
    e = jnp.exp(s - m)
    total = e.sum(-1, keepdims=True)
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    return e / safe, jnp.where(seen, m + jnp.log(safe), jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dense(q, k, v, mask, scale):
    """Dense attention on [B, N, T, H] operands; the probabilities normalised before the weighted
    sum, as the reference does."""
    return _dense_fwd(q, k, v, mask, scale)[0]


def _dense_fwd(q, k, v, mask, scale):
    p, lse = _dense_probs(q, k, mask, scale)
    out = jnp.einsum("bnts,bnsh->bnth", p.astype(v.dtype), v)
    # Saving lse [B, N, T, 1], not p [B, N, T, S]: recomputing p costs one q·kᵀ matmul in the
    # backward, less on CPU than writing p out and reading it back (and, under scan, than stacking
    # it for every layer).
    return out, (q, k, v, mask, out, lse)


def _dense_bwd(scale, res, d_out):
    q, k, v, mask, out, lse = res
    p = jnp.exp(_scores(q, k, mask.allowed(), scale) - lse)
    dq, dk, dv = _block_grads(q, k, v, p, _row_dot(d_out, out), d_out, scale)
    return dq, dk, dv, _no_grad(mask)


_dense.defvjp(_dense_fwd, _dense_bwd)


def _row_dot(d_out: jax.Array, out: jax.Array) -> jax.Array:
    """float32 [B, N, T, 1]: Σ_h d_out · out, the softmax backward's per-row term."""
    return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)


def _block_grads(q, k, v, p, d_row, d_out, scale):
    """Gradients through softmax attention given the float32 probabilities p [B, N, T, S'] and
    `_row_dot` d_row: (dq [B, N, T, H], dk, dv [B, N, S', H]) in the operands' dtypes."""
    dv = jnp.einsum("bnts,bnth->bnsh", p.astype(v.dtype), d_out)
    dp = jnp.einsum("bnth,bnsh->bnts", d_out, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - d_row) * jnp.float32(scale)).astype(q.dtype)
    dq = jnp.einsum("bnts,bnsh->bnth", ds, k)
    dk = jnp.einsum("bnts,bnth->bnsh", ds, q)
    return dq, dk, dv


def _no_grad(mask: Mask) -> Mask:
    # Masks are integer / boolean: their cotangents are symbolic zeros.
    return jax.tree.map(lambda x: None, mask)


_QUERY_FIELDS = ("q_pos", "q_seg", "q_images")


def _tile_len(n: int) -> int:
    """Tile length along an axis of n queries or keys: BLOCK, or n itself when it fits in one tile."""
    return BLOCK if n > BLOCK else n


def _pad(x: jax.Array | None, axis: int, n: int, value=0) -> jax.Array | None:
    if x is None or not n:
        return x
    return jnp.pad(x, [(0, n if a == axis else 0) for a in range(x.ndim)], constant_values=value)


def _split(x: jax.Array | None, axis: int, tile: int) -> jax.Array | None:
    """`axis` of x cut into tiles of `tile`, the tile index moved to the front: [L/tile, ..., tile, ...]."""
    if x is None:
        return None
    return jnp.moveaxis(x.reshape(*x.shape[:axis], -1, tile, *x.shape[axis + 1 :]), axis, 0)


def _join(x: jax.Array, axis: int, length: int) -> jax.Array:
    """Inverse of `_split`, cut back to the first `length` entries along `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _tiled(q, k, v, mask, *like_q):
    """The operands cut into query and key tiles (`_tile_len`), padded up to whole tiles (padding
    keys invalid; padding queries are dropped from the output): q [T'/tq, B, N, tq, H],
    k, v [S'/tk, B, N, tk, H], the mask's query and key fields cut the same way, as two Masks
    whose other fields are None, and the arrays `like_q` ([B, N, T, ·]) cut as q is."""
    t, s = q.shape[2], k.shape[2]
    tq, tk = _tile_len(t), _tile_len(s)
    pt, ps = -t % tq, -s % tk
    kv_valid = mask.kv_valid
    if ps and kv_valid is None:
        kv_valid = jnp.ones((k.shape[0], s), bool)
    q_side = Mask(**{f: _split(_pad(getattr(mask, f), 1, pt), 1, tq) for f in _QUERY_FIELDS})
    k_side = Mask(
        kv_valid=_split(_pad(kv_valid, 1, ps, False), 1, tk),
        kv_pos=_split(_pad(mask.kv_pos, 1, ps), 1, tk),
        kv_seg=_split(_pad(mask.kv_seg, 1, ps), 1, tk),
        kv_image=_split(_pad(mask.kv_image, 0, ps), 0, tk),
    )
    qs, *like_qs = (_split(_pad(x, 2, pt), 2, tq) for x in (q, *like_q))
    ks, vs = (_split(_pad(x, 2, ps), 2, tk) for x in (k, v))
    return qs, ks, vs, q_side, k_side, like_qs


def _tile_mask(q_side: Mask, k_side: Mask) -> tuple[jax.Array | None, jax.Array]:
    """(bool [B, 1, tq, tk] or None when nothing is masked, whether any query of the tile sees any key)."""
    allowed = Mask(*(a if a is not None else b for a, b in zip(q_side, k_side, strict=True))).allowed()
    return allowed, jnp.bool_(True) if allowed is None else allowed.any()


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(q, k, v, mask, scale):
    """Flash attention on [B, N, T, H] operands (see `attention`)."""
    return _flash_fwd_pass(q, k, v, mask, scale)[0]


def _flash_fwd_pass(q, k, v, mask, scale):
    """(out [B, N, T, H], float32 log-sum-exp [B, N, T, 1]; +inf on rows that see no key)."""
    qs, ks, vs, q_side, k_side, _ = _tiled(q, k, v, mask)

    def per_query_tile(_, xs):
        qi, qmi = xs

        def per_key_tile(carry, ys):
            kj, vj, kmj = ys
            allowed, live = _tile_mask(qmi, kmj)

            def attend_tile(carry):
                m, total, acc = carry
                s = _tile_scores(qi, kj, allowed, scale)
                m_new = jnp.maximum(m, s.max(-1, keepdims=True))
                p = jnp.exp(s - _finite(m_new))
                rescale = jnp.exp(m - _finite(m_new))
                pv = jnp.einsum("bnts,bnsh->bnth", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, total * rescale + p.sum(-1, keepdims=True), acc * rescale + pv

            return jax.lax.cond(live, attend_tile, lambda c: c, carry), None

        init = (
            jnp.full((*qi.shape[:-1], 1), -jnp.inf, jnp.float32),
            jnp.zeros((*qi.shape[:-1], 1), jnp.float32),
            jnp.zeros(qi.shape, jnp.float32),
        )
        (m, total, acc), _ = jax.lax.scan(per_key_tile, init, (ks, vs, k_side))
        seen = total > 0
        safe = jnp.where(seen, total, 1.0)
        return None, ((acc / safe).astype(v.dtype), jnp.where(seen, m + jnp.log(safe), jnp.inf))

    _, (out, lse) = jax.lax.scan(per_query_tile, None, (qs, q_side))
    t = q.shape[2]
    return _join(out, 2, t), _join(lse, 2, t)


def _flash_fwd(q, k, v, mask, scale):
    out, lse = _flash_fwd_pass(q, k, v, mask, scale)
    return out, (q, k, v, mask, out, lse)


def _flash_bwd(scale, res, d_out):
    """Key tiles outside, query tiles inside: each key tile's dk, dv accumulate in the inner carry,
    dq [T'/tq, B, N, tq, H] (float32) in the outer one, a skipped tile touching neither."""
    q, k, v, mask, out, lse = res
    qs, ks, vs, q_side, k_side, (d_outs, lses, d_rows) = _tiled(q, k, v, mask, d_out, lse, _row_dot(d_out, out))

    def per_key_tile(dq, xs):
        kj, vj, kmj = xs

        def per_query_tile(carry, ys):
            i, qi, d_out_i, lse_i, d_row_i, qmi = ys
            allowed, live = _tile_mask(qmi, kmj)

            def grad_tile(carry):
                dk, dv, dq = carry
                p = jnp.exp(_tile_scores(qi, kj, allowed, scale) - lse_i)
                dqi, dki, dvi = _block_grads(qi, kj, vj, p, d_row_i, d_out_i, scale)
                dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dqi.astype(jnp.float32), i, 0)
                return dk + dki.astype(jnp.float32), dv + dvi.astype(jnp.float32), dq

            return jax.lax.cond(live, grad_tile, lambda c: c, carry), None

        init = (jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32), dq)
        xs = (jnp.arange(qs.shape[0]), qs, d_outs, lses, d_rows, q_side)
        (dk, dv, dq), _ = jax.lax.scan(per_query_tile, init, xs)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(per_key_tile, jnp.zeros(qs.shape, jnp.float32), (ks, vs, k_side))
    return (
        _join(dq, 2, q.shape[2]).astype(q.dtype),
        _join(dk, 2, k.shape[2]),
        _join(dv, 2, v.shape[2]),
        _no_grad(mask),
    )


_blockwise.defvjp(_flash_fwd, _flash_bwd)


def rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] in float32 for integer `positions` [B, T] (HF default RoPE)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, T, N, H] with cos/sin [B, T, H]; returns x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# Depth by scan -----------------------------------------------------------------------------------


def stack(
    make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs | None, axis_name: str = "layers"
) -> nnx.Module:
    """`n` independent copies of `make(rngs)` as one module whose params carry a leading [n] axis.

    Each copy draws its own init key; the logical axis `axis_name` is prepended to every param's axes.
    """
    keys = jax.random.split(rngs.params(), n)

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return make(nnx.Rngs(params=key))

    module = create(keys)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            var.set_metadata("axes", (axis_name, *var.get_metadata()["axes"]))
    return module


REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Save only the q/k/v projections and the attention output: recompute MLPs and softmax.
    "minimal": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
}


def scan(stacked: nnx.Module, body: Callable[[nnx.Module, Any], Any], carry: Any, remat: str, unroll: int = 1) -> Any:
    """Runs `carry = body(layer_i, carry)` for each layer of a `stack`ed module, as one `lax.scan`.

    `remat` names the rematerialisation policy ('none' or a key of REMAT_POLICIES) applied to one
    layer's body, so activations are saved (or recomputed) once per layer. `unroll`
    (IdeficsConfig.scan_unroll) layers run per loop iteration; at least the stack's depth leaves no
    loop. Unrolled, the layers' saved activations are separate buffers instead of slices of stacked
    [layers, ...] arrays written and read by dynamic-update-slice.
    """
    graphdef, state = nnx.split(stacked)

    def step(c, layer_state):
        return body(nnx.merge(graphdef, layer_state), c), None

    carry, _ = jax.lax.scan(checkpoint(step, remat), carry, state, unroll=unroll)
    return carry


def checkpoint(fn: Callable, remat: str) -> Callable:
    """`fn` under the named remat policy ('none' returns `fn` itself)."""
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=False)
