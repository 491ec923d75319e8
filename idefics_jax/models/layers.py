"""Building blocks shared by the vision tower, the perceiver and the decoder.

Conventions (see DESIGN.md §3):
- Every parameter is an `nnx.Param` carrying `axes`: one logical axis name (or None) per dimension;
  `idefics_jax.sharding` maps them to mesh axes through one rules table.
- Linear kernels are stored [in, out] (HF stores [out, in]; `idefics_jax.hf` transposes).
- Matmuls run in the config's compute dtype; norms and softmax in float32.
- Layers of the same kind are created stacked (`stack`) and run with `scan`, so compile time does not
  grow with depth; `remat` is applied once per layer inside the scan body.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

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


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float, live: jax.Array | None = None
) -> jax.Array:
    """Softmax attention, [B, T, N, H] × [B, S, N, H] → [B, T, N*H].

    `mask` is boolean, broadcastable to [B, N, T, S] (True = may attend). `live` bool [B, T] marks the
    query rows whose mask is not all False (computed once per forward by the caller, `mask.any(-1)`);
    the others produce zeros, as torch's SDPA does since 2.5 (they are padding: any value is
    arbitrary, but zeros keep our logits equal to the reference everywhere, not only on real tokens).
    Goes through `jax.nn.dot_product_attention` with its default implementation (XLA's).
    """
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    if live is not None:
        out = out * live[:, :, None, None].astype(out.dtype)
    return out.reshape(*out.shape[:2], -1)


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


def scan(stacked: nnx.Module, body: Callable[[nnx.Module, Any], Any], carry: Any, remat: str) -> Any:
    """Runs `carry = body(layer_i, carry)` for each layer of a `stack`ed module, as one `lax.scan`.

    `remat` names the rematerialisation policy ('none' or a key of REMAT_POLICIES) applied to one
    layer's body, so activations are saved (or recomputed) once per layer.
    """
    graphdef, state = nnx.split(stacked)

    def step(c, layer_state):
        return body(nnx.merge(graphdef, layer_state), c), None

    carry, _ = jax.lax.scan(checkpoint(step, remat), carry, state)
    return carry


def checkpoint(fn: Callable, remat: str) -> Callable:
    """`fn` under the named remat policy ('none' returns `fn` itself)."""
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=False)
