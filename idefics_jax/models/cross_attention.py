"""Gated cross-attention layer (HF `IdeficsGatedCrossAttentionLayer`), the Flamingo addition.

RMSNorm → text queries attend to image latents (no RoPE; optional per-head RMSNorm on q/k) →
`tanh(alpha_cross_attn)` gate → residual; RMSNorm → SwiGLU MLP → `tanh(alpha_dense)` gate → residual.
Tokens that see no image get a zero attention output (HF's `cross_attention_gate`); the gated MLP
still applies to every token, as in HF.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from idefics_jax.config import IdeficsConfig
from idefics_jax.models import layers as L


def _alpha_init(config: IdeficsConfig):
    if config.alpha_initializer == "zeros":
        return L.zeros
    if config.alpha_initializer == "ones":
        return L.ones
    return L.normal(config.alphas_initializer_range)


class CrossAttention(nnx.Module):
    """Text [B, T, D] attends to image states [B, N*S, E_vision]."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        d, e = config.hidden_size, config.vision.embed_dim
        kw = dict(
            bias=False, std=config.initializer_range, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
        )
        self.q_proj = L.Linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = L.Linear(e, d, ("vision_embed", "heads"), **kw)
        self.v_proj = L.Linear(e, d, ("vision_embed", "heads"), **kw)
        self.o_proj = L.Linear(d, d, ("heads", "embed"), **kw)
        if config.qk_layer_norms:
            self.q_layer_norm = L.RMSNorm(config.head_dim, config.rms_norm_eps, param_dtype=config.param_dtype)
            self.k_layer_norm = L.RMSNorm(config.head_dim, config.rms_norm_eps, param_dtype=config.param_dtype)
        else:
            self.q_layer_norm = self.k_layer_norm = None
        self.num_heads = config.num_attention_heads
        self.impl = config.attention

    def keys_values(self, image_states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """image_states [B, N*S, E] → keys (normed when qk_layer_norms), values [B, N*S, heads, head_dim].

        They depend only on the images, so generation computes them once per prompt."""
        n = self.num_heads
        k = L.split_heads(checkpoint_name(self.k_proj(image_states), "qkv"), n)
        v = L.split_heads(checkpoint_name(self.v_proj(image_states), "qkv"), n)
        if self.k_layer_norm is not None:
            k = self.k_layer_norm(k)
        return k, v

    def attend(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: L.Mask) -> jax.Array:
        """x [B, T, D] over `keys_values` k, v [B, N*S, heads, head_dim]; `mask` which images each
        token sees (`image_mask`) → [B, T, D]; tokens that see no image give exactly zero."""
        q = L.split_heads(checkpoint_name(self.q_proj(x), "qkv"), self.num_heads)
        if self.q_layer_norm is not None:
            q = self.q_layer_norm(q)
        out = checkpoint_name(L.attention(q, k, v, mask, q.shape[-1] ** -0.5, self.impl), "attn_out")
        return self.o_proj(out)

    def __call__(self, x: jax.Array, image_states: jax.Array, mask: L.Mask) -> jax.Array:
        """x [B, T, D], image_states [B, N*S, E], `mask` (`image_mask`) → [B, T, D]."""
        return self.attend(x, *self.keys_values(image_states), mask)


class GatedCrossAttentionLayer(nnx.Module):
    """h [B, T, D] → h + tanh(α_attn)·xattn(norm(h)); then + tanh(α_dense)·mlp(norm(h))."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        d, pdt = config.hidden_size, config.param_dtype
        self.input_layernorm = L.RMSNorm(d, config.rms_norm_eps, param_dtype=pdt)
        self.cross_attn = CrossAttention(config, rngs=rngs)
        self.post_attention_layernorm = L.RMSNorm(d, config.rms_norm_eps, param_dtype=pdt)
        self.mlp = L.GatedMLP(
            d,
            config.intermediate_size,
            config.hidden_act,
            std=config.initializer_range,
            dtype=config.dtype,
            param_dtype=pdt,
            rngs=rngs,
        )
        shape, axes = ((1, 1, d), (None, None, None)) if config.alpha_type == "vector" else ((1,), (None,))
        init = _alpha_init(config)
        self.alpha_cross_attn = L.param(rngs, init, shape, axes, L.dtype_of(pdt))
        self.alpha_dense = L.param(rngs, init, shape, axes, L.dtype_of(pdt))

    def __call__(self, h: jax.Array, image_states: jax.Array | None, mask: L.Mask | None) -> jax.Array:
        """h [B, T, D]; image_states [B, N*S, E] and `mask` (`image_mask`), or both None (text only,
        where the attention contributes nothing) → [B, T, D]."""
        kv = None if image_states is None else self.cross_attn.keys_values(image_states)
        return self.with_keys_values(h, kv, mask)

    def with_keys_values(self, h: jax.Array, kv: tuple[jax.Array, jax.Array] | None, mask: L.Mask | None) -> jax.Array:
        """The layer given the cross-attention's `keys_values` (k, v [B, N*S, heads, head_dim]) instead
        of the image states, or None (text only); other shapes as `__call__`. Generation calls it
        with the keys/values it computed at prefill."""
        if kv is not None:
            attn = self.cross_attn.attend(self.input_layernorm(h), *kv, mask)
            h = h + self._gate(self.alpha_cross_attn, h.dtype) * attn
        return h + self._gate(self.alpha_dense, h.dtype) * self.mlp(self.post_attention_layernorm(h))

    @staticmethod
    def _gate(alpha: nnx.Param, dtype) -> jax.Array:
        return jnp.tanh(alpha[...].astype(jnp.float32)).astype(dtype)
