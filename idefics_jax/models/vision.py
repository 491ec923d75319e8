"""CLIP ViT vision tower (HF `IdeficsVisionTransformer`, a copy of `CLIPVisionTransformer`).

conv patch embedding (as a matmul over flattened patches) + class token + learned positions →
`pre_layrnorm` → pre-norm encoder layers (scanned) → last hidden state. `post_layernorm` exists (so
checkpoints round-trip) but, as in HF, applies only to the pooled CLS output, which IDEFICS does not
use: the perceiver consumes the last hidden state *before* it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from idefics_jax import sharding
from idefics_jax.config import IdeficsConfig, VisionConfig
from idefics_jax.models import layers as L

HIDDEN = ("batch", "length", "act_embed")  # the text decoder's hidden state [B, T, D]
# The vision tower's and perceiver's activations [M, S, E] and the image states: their own sequence
# axis, so sequence parallelism of the decoder ('length' → 'tensor') leaves them unsplit.
IMAGE_HIDDEN = ("batch", "vision_length", "act_embed")


class VisionAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biased projections."""

    def __init__(self, v: VisionConfig, *, std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs | None):
        kw = dict(bias=True, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        e = v.embed_dim
        self.q_proj = L.Linear(e, e, ("vision_embed", "vision_heads"), **kw)
        self.k_proj = L.Linear(e, e, ("vision_embed", "vision_heads"), **kw)
        self.v_proj = L.Linear(e, e, ("vision_embed", "vision_heads"), **kw)
        self.out_proj = L.Linear(e, e, ("vision_heads", "vision_embed"), **kw)
        self.num_heads = v.num_attention_heads

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [M, S, E] → [M, S, E]."""
        n = self.num_heads
        q, k, v = (L.split_heads(p(x), n) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = L.attention(q, k, v, None, q.shape[-1] ** -0.5)
        return self.out_proj(out)


class VisionMLP(nnx.Module):
    """fc1 → activation → fc2, with biases."""

    def __init__(self, v: VisionConfig, *, std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs | None):
        kw = dict(bias=True, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = L.Linear(v.embed_dim, v.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = L.Linear(v.intermediate_size, v.embed_dim, ("vision_mlp", "vision_embed"), **kw)
        self.act = v.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [M, S, E] → [M, S, E]."""
        return self.fc2(L.ACT_FNS[self.act](self.fc1(x)))


class VisionEncoderLayer(nnx.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, v: VisionConfig, *, std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs | None):
        kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = L.LayerNorm(v.embed_dim, v.layer_norm_eps, param_dtype=param_dtype)
        self.self_attn = VisionAttention(v, **kw)
        self.layer_norm2 = L.LayerNorm(v.embed_dim, v.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = VisionMLP(v, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [M, S, E] → [M, S, E]."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nnx.Module):
    """Patch embedding (bias-free conv with stride = kernel = patch) + class token + positions."""

    def __init__(self, v: VisionConfig, *, std: float, param_dtype: str, rngs: nnx.Rngs | None, dtype: str):
        pdt = L.dtype_of(param_dtype)
        self.v = v
        self.dtype = L.dtype_of(dtype)
        patch_in = v.num_channels * v.patch_size * v.patch_size
        # Stored [C*P*P, E]: HF's conv weight [E, C, P, P] flattened and transposed.
        self.patch_embedding = L.param(rngs, L.normal(std), (patch_in, v.embed_dim), (None, "vision_embed"), pdt)
        self.class_embedding = L.param(rngs, L.normal(1.0), (v.embed_dim,), ("vision_embed",), pdt)
        self.position_embedding = L.param(
            rngs, L.normal(std), (v.num_patches + 1, v.embed_dim), (None, "vision_embed"), pdt
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [M, C, H, W] → [M, 1 + (H/P)*(W/P), E] in the compute dtype."""
        v = self.v
        m, c, h, w = pixels.shape
        if (c, h, w) != (v.num_channels, v.image_size, v.image_size):
            raise ValueError(
                f"pixel_values images are {c}x{h}x{w}; expected "
                f"{v.num_channels}x{v.image_size}x{v.image_size} (channels x height x width)"
            )
        p = v.patch_size
        x = pixels.astype(self.dtype).reshape(m, c, h // p, p, w // p, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(m, (h // p) * (w // p), c * p * p)
        patches = jnp.dot(x, self.patch_embedding[...].astype(self.dtype))
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (m, 1, v.embed_dim))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...].astype(self.dtype)


class VisionTransformer(nnx.Module):
    """The ViT: pixels [M, C, H, W] → last hidden state [M, 1 + num_patches, E] (before post-LN)."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        v = config.vision
        kw = dict(std=config.initializer_range, dtype=config.dtype, param_dtype=config.param_dtype)
        self.embeddings = VisionEmbeddings(v, rngs=rngs, **kw)
        self.pre_layrnorm = L.LayerNorm(v.embed_dim, v.layer_norm_eps, param_dtype=config.param_dtype)
        self.layers = L.stack(lambda r: VisionEncoderLayer(v, rngs=r, **kw), v.num_hidden_layers, rngs)
        self.post_layernorm = L.LayerNorm(v.embed_dim, v.layer_norm_eps, param_dtype=config.param_dtype)
        self.remat, self.unroll = config.remat, config.scan_unroll

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [M, C, H, W] (any float dtype) → [M, 1 + num_patches, E] in the compute dtype."""
        x = sharding.constrain(self.pre_layrnorm(self.embeddings(pixels)), IMAGE_HIDDEN)
        return L.scan(
            self.layers, lambda layer, h: sharding.constrain(layer(h), IMAGE_HIDDEN), x, self.remat, self.unroll
        )
