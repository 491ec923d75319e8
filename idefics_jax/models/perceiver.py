"""Perceiver resampler (HF `IdeficsPerceiverResampler`): image features → a fixed number of latents.

Each block: latents attend to concat(image features, latents) (Flamingo), with LayerNorms on both
inputs and optional LayerNorm (with bias) on per-head q/k; then a bias-free ReLU MLP; both residual.
A final LayerNorm. Works at the vision width E (the cross-attention's key/value width).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from idefics_jax import sharding
from idefics_jax.config import IdeficsConfig
from idefics_jax.models import layers as L
from idefics_jax.models.vision import IMAGE_HIDDEN

LN_EPS = 1e-5  # torch nn.LayerNorm default; HF builds these norms without an explicit eps.


class PerceiverAttention(nnx.Module):
    """Latents [M, L, E] attend to [context; latents] → [M, L, E]."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        p, e = config.perceiver, config.vision.embed_dim
        pdt = config.param_dtype
        kw = dict(bias=False, std=config.initializer_range, dtype=config.dtype, param_dtype=pdt, rngs=rngs)
        inner = p.resampler_n_heads * p.resampler_head_dim
        self.context_layer_norm = L.LayerNorm(e, LN_EPS, param_dtype=pdt)
        self.latents_layer_norm = L.LayerNorm(e, LN_EPS, param_dtype=pdt)
        if p.qk_layer_norms_perceiver:
            self.q_layer_norm = L.LayerNorm(p.resampler_head_dim, LN_EPS, param_dtype=pdt)
            self.k_layer_norm = L.LayerNorm(p.resampler_head_dim, LN_EPS, param_dtype=pdt)
        else:
            self.q_layer_norm = self.k_layer_norm = None
        self.q_proj = L.Linear(e, inner, ("vision_embed", "vision_heads"), **kw)
        self.k_proj = L.Linear(e, inner, ("vision_embed", "vision_heads"), **kw)
        self.v_proj = L.Linear(e, inner, ("vision_embed", "vision_heads"), **kw)
        self.output_proj = L.Linear(inner, e, ("vision_heads", "vision_embed"), **kw)
        self.num_heads = p.resampler_n_heads

    def __call__(self, context: jax.Array, latents: jax.Array) -> jax.Array:
        """context [M, S, E], latents [M, L, E] → attention output [M, L, E]."""
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)
        kv_in = jnp.concatenate([context, latents], axis=1)
        q = L.split_heads(self.q_proj(latents), self.num_heads)
        k = L.split_heads(self.k_proj(kv_in), self.num_heads)
        v = L.split_heads(self.v_proj(kv_in), self.num_heads)
        if self.q_layer_norm is not None:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        return self.output_proj(L.attention(q, k, v, None, q.shape[-1] ** -0.5))


class PerceiverMLP(nnx.Module):
    """LayerNorm → fc → ReLU → c_proj, bias-free (HF perceiver `IdeficsMLP`)."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        e = config.vision.embed_dim
        kw = dict(
            bias=False, std=config.initializer_range, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
        )
        self.ln = L.LayerNorm(e, LN_EPS, param_dtype=config.param_dtype)
        self.fc = L.Linear(e, 4 * e, ("vision_embed", "vision_mlp"), **kw)
        self.c_proj = L.Linear(4 * e, e, ("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [M, L, E] → [M, L, E]."""
        return self.c_proj(jax.nn.relu(self.fc(self.ln(x))))


class PerceiverBlock(nnx.Module):
    """One resampler block (HF `blocks[i] = [attn, mlp]`)."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        self.attn = PerceiverAttention(config, rngs=rngs)
        self.mlp = PerceiverMLP(config, rngs=rngs)

    def __call__(self, context: jax.Array, latents: jax.Array) -> jax.Array:
        latents = self.attn(context, latents) + latents
        return self.mlp(latents) + latents


class PerceiverResampler(nnx.Module):
    """context [M, S, E] → [M, n_latents, E]."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        p, e = config.perceiver, config.vision.embed_dim
        self.latents = L.param(
            rngs, L.normal(1.0), (p.resampler_n_latents, e), (None, "vision_embed"), L.dtype_of(config.param_dtype)
        )
        self.blocks = L.stack(lambda r: PerceiverBlock(config, rngs=r), p.resampler_depth, rngs)
        self.layer_norm = L.LayerNorm(e, LN_EPS, param_dtype=config.param_dtype)
        self.dtype = L.dtype_of(config.dtype)
        self.remat, self.unroll = config.remat, config.scan_unroll

    def __call__(self, context: jax.Array) -> jax.Array:
        """context [M, S, E] → latents [M, n_latents, E] in the compute dtype."""
        latents = jnp.broadcast_to(self.latents[...].astype(self.dtype), (context.shape[0], *self.latents.shape))
        latents = L.scan(
            self.blocks,
            lambda blk, lat: sharding.constrain(blk(context, lat), IMAGE_HIDDEN),
            latents,
            self.remat,
            self.unroll,
        )
        return self.layer_norm(latents)
