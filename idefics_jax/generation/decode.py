"""The model side of generation: a preallocated key/value cache, the prompt's prefill and the
one-token decode step, both built from the model's own layer methods.

Cache layout (one slot per position of the final sequence, L = T + max_new_tokens):
  k, v    [num_blocks, cross_layer_interval, B, L, heads, head_dim]  self-attention, compute dtype
  xk, xv  [num_blocks, B, N*S, heads, head_dim]  gated cross-attention keys/values over the image
          states, computed once at prefill (transformers recomputes them at every step); None
          without images.
Slots are the same for every row (prompts are left-padded to T), so one `start` index says where a
chunk of queries is written; rotary positions are per row (HF's cumsum of the attention mask).
A query in slot s sees the keys in slots j ≤ s whose `key_valid[b, j]` is set (the prompt's
attention mask, then every generated slot).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from idefics_jax import sharding
from idefics_jax.models import layers as L
from idefics_jax.models.idefics import Idefics, image_mask_of
from idefics_jax.models.vision import HIDDEN

# Logical axes of the caches: rows over the batch axes and heads over 'tensor', as the activations
# and the q/k/v projections that produce them. The cache's positions are never split: under
# sequence parallelism ('length' → 'tensor', e.g. the 80B config's few-shot evals during training)
# 'length' would take 'tensor' from the heads and every decode step would write into one shard.
SELF_CACHE_AXES = ("layers", None, "batch", None, "heads", None)
CROSS_CACHE_AXES = ("layers", "batch", "vision_length", "heads", None)


class Cache(NamedTuple):
    """Self-attention k, v [num_blocks, interval, B, L, heads, head_dim]; cross-attention xk, xv
    [num_blocks, B, N*S, heads, head_dim] or None (no images)."""

    k: jax.Array
    v: jax.Array
    xk: jax.Array | None
    xv: jax.Array | None

    def take(self, rows: jax.Array) -> Cache:
        """The cache of rows `rows` (int [B']), e.g. the surviving beams."""
        pick = lambda x, axis: None if x is None else jnp.take(x, rows, axis=axis)
        return Cache(pick(self.k, 2), pick(self.v, 2), pick(self.xk, 1), pick(self.xv, 1))


def positions(attention_mask: jax.Array, length: int) -> jax.Array:
    """HF's position ids for every slot: attention_mask bool [B, T] (left padding) → int32 [B, length],
    cumsum(mask) - 1 on real tokens, 1 on padding, and counting on through the generated slots."""
    t = attention_mask.shape[1]
    full = jnp.concatenate([attention_mask, jnp.ones((attention_mask.shape[0], length - t), bool)], axis=1)
    return jnp.where(full, jnp.cumsum(full, axis=1, dtype=jnp.int32) - 1, 1)


def empty_cache(model: Idefics, batch: int, length: int, cross: tuple[jax.Array, jax.Array] | None) -> Cache:
    """Zeroed self-attention slots for `batch` rows × `length` positions, plus the cross k/v."""
    cfg = model.config
    shape = (cfg.num_blocks, cfg.cross_layer_interval, batch, length, cfg.num_attention_heads, cfg.head_dim)
    zeros = sharding.constrain(jnp.zeros(shape, L.dtype_of(cfg.dtype)), SELF_CACHE_AXES)
    xk, xv = (None, None) if cross is None else cross
    return Cache(zeros, zeros, xk, xv)


def cross_keys_values(model: Idefics, image_states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """image_states [B, N*S, E] → every gated cross-attention layer's keys, values, each
    [num_blocks, B, N*S, heads, head_dim] (one scan over the blocks)."""
    graphdef, state = nnx.split(model.blocks)

    def one(_, block_state):
        kv = nnx.merge(graphdef, block_state).gated_cross_attn_layer.cross_attn.keys_values(image_states)
        return None, tuple(sharding.constrain(x, CROSS_CACHE_AXES[1:]) for x in kv)

    _, (xk, xv) = jax.lax.scan(one, None, state)
    return xk, xv


def forward(
    model: Idefics,
    ids: jax.Array,
    pos: jax.Array,
    start: jax.Array | int,
    key_valid: jax.Array,
    cache: Cache,
    image_mask: L.Mask | jax.Array | None,
    image_live: jax.Array | None = None,
) -> tuple[jax.Array, Cache]:
    """Runs `C` new tokens per row through the decoder against the cache, writing their keys/values.

    ids int [B, C] in slots start .. start+C-1; pos int [B, C] their rotary positions; key_valid bool
    [B, L]; image_mask which images each of the C tokens sees: a `models.idefics.image_mask_of`
    mask, or transformers' per-key layout bool [B, 1, C, N*S] with image_live bool [B, C] (tokens
    that see some image; None: all that the mask lets see one), read as the image index it repeats;
    None without images (then the cache has no xk/xv). Returns float32 logits of the last of the C tokens [B, V + A] and
    the cache with the new slots filled. Prefill is C = T at start 0, a decode step C = 1.
    """
    cfg = model.config
    c, length = ids.shape[1], key_valid.shape[1]
    b = ids.shape[0]
    query_slot = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (b, c))
    key_slot = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    mask = L.Mask(kv_valid=key_valid, q_pos=query_slot, kv_pos=key_slot)
    if image_mask is not None and not isinstance(image_mask, L.Mask):
        per_image = cfg.image_seq_len
        q_images = jnp.asarray(image_mask, bool)[:, 0, :, ::per_image]  # one key per image
        if image_live is not None:
            q_images = q_images & jnp.asarray(image_live, bool)[:, :, None]
        image_mask = image_mask_of(q_images, per_image)
    cos, sin = L.rotary(pos, cfg.head_dim, cfg.rope_theta)
    h = sharding.constrain(model.embed_tokens(ids), HIDDEN)
    block_def, block_state = nnx.split(model.blocks)
    cross = cache.xk is not None

    def block(h, xs):
        state, k_cache, v_cache = xs[:3]
        blk = nnx.merge(block_def, state)
        kv = xs[3:] if cross else None
        h = blk.gated_cross_attn_layer.with_keys_values(h, kv, image_mask)
        layer_def, layer_state = nnx.split(blk.layers)

        def layer(h, ys):
            state, k_slots, v_slots = ys
            lyr = nnx.merge(layer_def, state)
            q, k, v = lyr.self_attn.project(lyr.input_layernorm(h), cos, sin)
            keys = jax.lax.dynamic_update_slice_in_dim(k_slots, k, start, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(v_slots, v, start, axis=1)
            h = h + lyr.self_attn.attend(q, keys, values, mask)
            return lyr.feed_forward(h), (k, v)

        h, new = jax.lax.scan(layer, h, (layer_state, k_cache, v_cache))
        return sharding.constrain(h, HIDDEN), new

    xs = (block_state, cache.k, cache.v) + ((cache.xk, cache.xv) if cross else ())
    h, (k_new, v_new) = jax.lax.scan(block, h, xs)
    # Only the C new slots are written into the (loop-carried, hence updated in place) cache.
    k = jax.lax.dynamic_update_slice_in_dim(cache.k, k_new, start, axis=3)
    v = jax.lax.dynamic_update_slice_in_dim(cache.v, v_new, start, axis=3)
    logits = model.logits(h[:, -1:])[:, 0]
    return logits, cache._replace(k=sharding.constrain(k, SELF_CACHE_AXES), v=sharding.constrain(v, SELF_CACHE_AXES))
