"""The whole IDEFICS model (HF `IdeficsForVisionText2Text`).

Decoupled embedding and LM head (base vocab and additional vocab are separate parameters, so either
can be frozen) · ViT → perceiver → per-image latents · the decoder as one scan over blocks, a block
being one gated cross-attention layer followed by `cross_layer_interval` LLaMA layers (themselves an
inner scan) · final RMSNorm.

HF layer i (= block i // interval, slot i % interval) sits at `blocks.layers.*[i // interval, i % interval]`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax import sharding
from idefics_jax.config import IdeficsConfig
from idefics_jax.models import layers as L
from idefics_jax.models.cross_attention import GatedCrossAttentionLayer
from idefics_jax.models.llama import DecoderLayer
from idefics_jax.models.perceiver import PerceiverResampler
from idefics_jax.models.vision import HIDDEN, IMAGE_HIDDEN, VisionTransformer


class DecoupledEmbedding(nnx.Module):
    """Token embedding: ids < vocab_size read `weight` [V, D], ids ≥ vocab_size read `additional_embedding` [A, D]."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        pdt, std = L.dtype_of(config.param_dtype), config.initializer_range
        self.vocab_size = config.vocab_size
        self.weight = L.param(rngs, L.normal(std), (config.vocab_size, config.hidden_size), ("vocab", "embed"), pdt)
        self.additional_embedding = (
            L.param(rngs, L.normal(std), (config.additional_vocab_size, config.hidden_size), (None, "embed"), pdt)
            if config.additional_vocab_size
            else None
        )
        self.dtype = L.dtype_of(config.dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids int [B, T] → [B, T, D] in the compute dtype."""
        base = jnp.take(self.weight[...], jnp.clip(ids, 0, self.vocab_size - 1), axis=0)
        if self.additional_embedding is not None:
            extra = jnp.take(
                self.additional_embedding[...],
                jnp.clip(ids - self.vocab_size, 0, self.additional_embedding.shape[0] - 1),
                axis=0,
            )
            base = jnp.where((ids >= self.vocab_size)[..., None], extra, base)
        return base.astype(self.dtype)


class DecoupledHead(nnx.Module):
    """LM head: logits = [h @ weight, h @ additional_fc], float32 [B, T, V + A]."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        pdt, std = L.dtype_of(config.param_dtype), config.initializer_range
        self.weight = L.param(rngs, L.normal(std), (config.hidden_size, config.vocab_size), ("embed", "vocab"), pdt)
        self.additional_fc = (
            L.param(rngs, L.normal(std), (config.hidden_size, config.additional_vocab_size), ("embed", None), pdt)
            if config.additional_vocab_size
            else None
        )
        self.dtype = L.dtype_of(config.dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [B, T, D] → float32 logits [B, T, V + A]."""
        return _logits(h, self.weight[...], None if self.additional_fc is None else self.additional_fc[...], self.dtype)


def _logits(h: jax.Array, w: jax.Array, extra: jax.Array | None, dtype) -> jax.Array:
    dot = lambda k: jnp.dot(h.astype(dtype), k.astype(dtype), preferred_element_type=jnp.float32)
    # Vocabulary-parallel, pinned: the same pin on the gradient keeps the backward matmul local to
    # each vocabulary shard (under sequence parallelism the partitioner otherwise gathers the whole
    # head weight, in float32, every micro-batch).
    out = sharding.constrain(dot(w), ("batch", None, "vocab"))
    return out if extra is None else jnp.concatenate([out, dot(extra)], axis=-1)


class Context(NamedTuple):
    """What every block reads besides the hidden state, computed once per forward.

    cos, sin float32 [B, T, head_dim] (RoPE); mask: the self-attention's (causal ∧ padding ∧
    segments, by structure); image_states [B, N*S, E] and image_mask (which images each token sees),
    or None without images.
    """

    cos: jax.Array
    sin: jax.Array
    mask: L.Mask
    image_states: jax.Array | None
    image_mask: L.Mask | None


class Block(nnx.Module):
    """One scanned unit: a gated cross-attention layer, then `cross_layer_interval` decoder layers."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs | None):
        self.gated_cross_attn_layer = GatedCrossAttentionLayer(config, rngs=rngs)
        self.layers = L.stack(lambda r: DecoderLayer(config, rngs=r), config.cross_layer_interval, rngs)
        self.remat, self.unroll = config.remat, config.scan_unroll

    def __call__(self, h: jax.Array, ctx: Context) -> jax.Array:
        """h [B, T, D] → [B, T, D]."""
        # Every layer's output is pinned to the residual stream's layout (under sequence parallelism
        # split over 'tensor' along the sequence), inside its remat region, so the scan carries and
        # the saved residuals have that layout and each layer ends in a reduce-scatter.
        xattn = lambda x: sharding.constrain(self.gated_cross_attn_layer(x, ctx.image_states, ctx.image_mask), HIDDEN)
        h = L.checkpoint(xattn, self.remat)(h)
        decoder = lambda layer, x: sharding.constrain(layer(x, ctx.cos, ctx.sin, ctx.mask), HIDDEN)
        return L.scan(self.layers, decoder, h, self.remat, self.unroll)


class Idefics(nnx.Module):
    """IDEFICS for vision→text generation. Create with `Idefics(config, rngs=nnx.Rngs(seed))`."""

    def __init__(self, config: IdeficsConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = DecoupledEmbedding(config, rngs=rngs)
        self.vision_model = VisionTransformer(config, rngs=rngs)
        self.perceiver_resampler = PerceiverResampler(config, rngs=rngs) if config.use_resampler else None
        self.blocks = L.stack(lambda r: Block(config, rngs=r), config.num_blocks, rngs)
        self.norm = L.RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=config.param_dtype)
        self.lm_head = None if config.tie_word_embeddings else DecoupledHead(config, rngs=rngs)

    def image_states(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, N, C, H, W] → what the cross-attention reads, [B, N*S, E_vision] (compute dtype).

        S = perceiver latents when `use_resampler`, else ViT patches + CLS.
        """
        b, n = pixel_values.shape[:2]
        # Images are split over the batch axes like the rows they belong to; unconstrained, the
        # partitioner may replicate the whole vision tower's work on every device.
        pixels = sharding.constrain(pixel_values.reshape(b * n, *pixel_values.shape[2:]), ("batch", None, None, None))
        x = sharding.constrain(self.vision_model(pixels), IMAGE_HIDDEN)
        if self.perceiver_resampler is not None:
            x = sharding.constrain(self.perceiver_resampler(x), IMAGE_HIDDEN)
        return x.reshape(b, n * x.shape[1], x.shape[2])

    def __call__(
        self,
        input_ids: Any,
        pixel_values: Any = None,
        image_attention_mask: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        segment_ids: Any = None,
    ) -> jax.Array:
        """Logits for a batch, accepting HF's layouts (numpy or jax arrays).

        input_ids int [B, T]; pixel_values float [B, N, C, H, W] or None (text only);
        image_attention_mask int/bool [B, T, N] (token t may see image n; required with pixel_values);
        attention_mask int/bool [B, T] (1 = real token, default all ones; left padding as HF);
        position_ids int [B, T] (default HF's: cumsum(attention_mask) - 1, 1 on padding);
        segment_ids int [B, T] (packed sequences: self-attention stays within equal ids; default none).
        Returns float32 logits [B, T, vocab_size + additional_vocab_size].
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids has shape {input_ids.shape}; expected [batch, seq_len]")
        b, t = input_ids.shape
        if attention_mask is not None:
            attention_mask = _check_shape(attention_mask, (b, t), "attention_mask").astype(bool)
        if position_ids is None:
            position_ids = (
                jnp.broadcast_to(jnp.arange(t), (b, t))
                if attention_mask is None
                else jnp.where(attention_mask, jnp.cumsum(attention_mask, axis=-1) - 1, 1)
            )
        else:
            position_ids = _check_shape(position_ids, (b, t), "position_ids")
        seg = None if segment_ids is None else _check_shape(segment_ids, (b, t), "segment_ids")
        # Causal over the slots (not position_ids, which restart in packed segments).
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = L.Mask(kv_valid=attention_mask, q_pos=slots, kv_pos=slots, q_seg=seg, kv_seg=seg)

        image_states = image_mask = None
        if pixel_values is not None:
            pixel_values = jnp.asarray(pixel_values)
            if pixel_values.ndim != 5 or pixel_values.shape[0] != b:
                raise ValueError(f"pixel_values has shape {pixel_values.shape}; expected [{b}, num_images, C, H, W]")
            if image_attention_mask is None:
                raise ValueError("image_attention_mask [batch, seq_len, num_images] is required with pixel_values")
            n = pixel_values.shape[1]
            iam = _check_shape(image_attention_mask, (b, t, n), "image_attention_mask").astype(bool)
            image_states = sharding.constrain(self.image_states(pixel_values), IMAGE_HIDDEN)
            image_mask = image_mask_of(iam, image_states.shape[1] // n)

        h = sharding.constrain(self.embed_tokens(input_ids), HIDDEN)
        cos, sin = L.rotary(position_ids, cfg.head_dim, cfg.rope_theta)
        ctx = Context(cos, sin, mask, image_states, image_mask)
        h = L.scan(self.blocks, lambda blk, x: blk(x, ctx), h, "none", cfg.scan_unroll)
        return self.logits(h)

    def logits(self, h: jax.Array) -> jax.Array:
        """The last block's output h [B, T, D] → float32 logits [B, T, V + A] (final norm, then the
        head or, tied, the embedding transposed)."""
        # The sequence whole before the vocabulary-parallel head: one gather of h into the head's
        # matmul. Left split (sequence parallelism), the partitioner gathers the head's weight instead.
        h = sharding.constrain(self.norm(h), ("batch", None, "act_embed"))
        if self.lm_head is not None:
            return self.lm_head(h)
        emb = self.embed_tokens
        extra = None if emb.additional_embedding is None else emb.additional_embedding[...].T
        return _logits(h, emb.weight[...].T, extra, emb.dtype)


def image_mask_of(image_attention_mask: jax.Array, seq_per_image: int) -> L.Mask:
    """The cross-attention's mask: image_attention_mask bool [B, T, N] (token t may see image n) over
    keys laid out image by image, `seq_per_image` each (key s belongs to image s // seq_per_image)."""
    n = image_attention_mask.shape[-1]
    return L.Mask(q_images=image_attention_mask.astype(bool), kv_image=jnp.arange(n * seq_per_image) // seq_per_image)


def _check_shape(x: Any, shape: tuple[int, ...], name: str) -> jax.Array:
    x = jnp.asarray(x)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {shape}")
    return x


def count_params(tree: Any) -> int:
    """Number of scalars in a tree of arrays / ShapeDtypeStructs / nnx Variables."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_model(config: IdeficsConfig) -> Idefics:
    """`Idefics(config)` whose Variables hold jax.ShapeDtypeStructs (shapes and dtypes as the real
    model's: params in `config.param_dtype`): nothing is allocated, so it works for 80B on a laptop."""
    return nnx.eval_shape(lambda: Idefics(config, rngs=nnx.Rngs(0)))


def abstract_state(config: IdeficsConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of `Idefics(config)`: `nnx.split(abstract_model(config))`."""
    return nnx.split(abstract_model(config))
