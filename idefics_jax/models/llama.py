"""LLaMA decoder layer (HF `IdeficsDecoderLayer`): RMSNorm → causal self-attention with rotate-half
RoPE → residual; RMSNorm → SwiGLU MLP → residual."""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from idefics_jax.config import IdeficsConfig
from idefics_jax.models import layers as L


class SelfAttention(nnx.Module):
    """Multi-head self-attention with RoPE; q/k/v column-parallel, o_proj row-parallel."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        d = config.hidden_size
        kw = dict(
            bias=False, std=config.initializer_range, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
        )
        self.q_proj = L.Linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = L.Linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = L.Linear(d, d, ("embed", "heads"), **kw)
        self.o_proj = L.Linear(d, d, ("heads", "embed"), **kw)
        self.num_heads = config.num_attention_heads
        self.impl = config.attention

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D]; cos/sin [B, T, head_dim] float32 → q, k (rotated), v [B, T, N, head_dim].

        Split from `attend` so generation can write k/v into its cache between the two."""
        n = self.num_heads
        q = L.apply_rotary(L.split_heads(checkpoint_name(self.q_proj(x), "qkv"), n), cos, sin)
        k = L.apply_rotary(L.split_heads(checkpoint_name(self.k_proj(x), "qkv"), n), cos, sin)
        v = L.split_heads(checkpoint_name(self.v_proj(x), "qkv"), n)
        return q, k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: L.Mask) -> jax.Array:
        """q [B, T, N, H] over k, v [B, S, N, H]; `mask` which keys each query sees → [B, T, D]."""
        out = checkpoint_name(L.attention(q, k, v, mask, q.shape[-1] ** -0.5, self.impl), "attn_out")
        return self.o_proj(out)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: L.Mask) -> jax.Array:
        """x [B, T, D]; cos/sin [B, T, head_dim] float32; `mask` (causal ∧ padding ∧ segments) → [B, T, D]."""
        return self.attend(*self.project(x, cos, sin), mask)


class DecoderLayer(nnx.Module):
    """One LLaMA layer: h + attn(norm(h)); h + mlp(norm(h))."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        pdt = config.param_dtype
        self.input_layernorm = L.RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pdt)
        self.self_attn = SelfAttention(config, rngs=rngs)
        self.post_attention_layernorm = L.RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pdt)
        self.mlp = L.GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            std=config.initializer_range,
            dtype=config.dtype,
            param_dtype=pdt,
            rngs=rngs,
        )

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: L.Mask) -> jax.Array:
        """h [B, T, D] → [B, T, D] (see SelfAttention for the other arguments)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return self.feed_forward(h)

    def feed_forward(self, h: jax.Array) -> jax.Array:
        """The layer's second half, h [B, T, D] → h + mlp(norm(h)) (also the decode step's)."""
        return h + self.mlp(self.post_attention_layernorm(h))
