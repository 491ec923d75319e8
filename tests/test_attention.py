"""Attention by structure: every `model.attention` kernel is the dense-mask function.

The reference is the model as it was before masks became structure: dense boolean [B, 1, T, S]
masks built by hand (causal ∧ padding ∧ segments; image index repeated over each image's latents)
through `jax.nn.dot_product_attention`, rows that see nothing zeroed.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig
from idefics_jax.models import Idefics
from idefics_jax.models import layers as L

T, N_IMAGES = 200, 2  # T > BLOCK: the blockwise kernel runs several query and key tiles (and a partial one)


def _config(attention: str) -> IdeficsConfig:
    return IdeficsConfig(
        vocab_size=128,
        additional_vocab_size=2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=2,
        qk_layer_norms=True,
        use_resampler=True,
        alpha_type="vector",
        alpha_initializer="normal",
        alphas_initializer_range=0.5,
        vision=VisionConfig(
            embed_dim=32, image_size=16, intermediate_size=64, patch_size=8, num_hidden_layers=2, num_attention_heads=4
        ),
        perceiver=PerceiverConfig(resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=8),
        attention=attention,
    )


def _batch() -> dict[str, np.ndarray]:
    """Row 0 packed (three segments, positions restarting), row 1 left-padded by 30, row 2 sees no
    image, row 3 sees both images from its middle on (multi-hot)."""
    rng = np.random.default_rng(0)
    b = 4
    seg = np.ones((b, T), np.int32)
    seg[0, 70:150], seg[0, 150:] = 2, 3
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (b, T)).copy()
    pos[0, 70:150], pos[0, 150:] = np.arange(80), np.arange(T - 150)
    am = np.ones((b, T), np.int32)
    am[1, :30] = 0
    pos[1] = np.where(am[1], np.cumsum(am[1]) - 1, 1)
    iam = np.zeros((b, T, N_IMAGES), np.int32)
    iam[0, 10:70, 0], iam[0, 80:, 1] = 1, 1
    iam[1, 40:, 0] = 1
    iam[3, 100:, :] = 1
    return dict(
        input_ids=rng.integers(0, 130, (b, T)).astype(np.int32),
        pixel_values=rng.standard_normal((b, N_IMAGES, 3, 16, 16)).astype(np.float32),
        image_attention_mask=iam,
        attention_mask=am,
        position_ids=pos,
        segment_ids=seg,
    )


def _dense_masks(batch) -> tuple[np.ndarray, np.ndarray]:
    """The self- and cross-attention masks as dense arrays, built as the model built them before."""
    causal = np.tril(np.ones((T, T), bool))
    seg = batch["segment_ids"]
    self_mask = causal[None] & batch["attention_mask"].astype(bool)[:, None, :] & (seg[:, :, None] == seg[:, None, :])
    per_image = _config("xla").perceiver.resampler_n_latents
    cross_mask = np.repeat(batch["image_attention_mask"].astype(bool), per_image, axis=-1)
    return self_mask[:, None], cross_mask[:, None]


def _reference_attention(q, k, v, mask, scale, impl="xla"):
    """The dense-mask attention: [B, 1, T, S] booleans into jax.nn.dot_product_attention."""
    dense = None if mask is None else _DENSE[(q.shape[1], k.shape[1])]
    out = jax.nn.dot_product_attention(q, k, v, mask=None if dense is None else jnp.asarray(dense), scale=scale)
    if dense is not None:
        out = out * jnp.asarray(dense.any(-1)[:, 0])[:, :, None, None].astype(out.dtype)
    return out.reshape(*out.shape[:2], -1)


_DENSE: dict[tuple[int, int], np.ndarray] = {}


def _fused_as_on_gpu(q, k, v, mask, scale, impl="xla"):
    """The 'cudnn' kernel's mask translation (`_fused`), run by XLA's implementation of the same call."""
    return L._fused(q, k, v, mask, scale, "xla")


@functools.cache
def _logits_and_grads(attention: str, reference: bool = False, kernel=None):
    batch = _batch()
    graphdef, state = nnx.split(Idefics(_config(attention), rngs=nnx.Rngs(0)))
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((4, T, 130)).astype(np.float32))

    def loss(s):
        logits = nnx.merge(graphdef, s)(**batch)
        return jnp.sum(logits * weights), logits

    fn = jax.value_and_grad(loss, has_aux=True)
    if reference:
        self_mask, cross_mask = _dense_masks(batch)
        _DENSE.update({(T, T): self_mask, (T, cross_mask.shape[-1]): cross_mask})
    if reference or kernel is not None:
        original = L.attention
        L.attention = _reference_attention if reference else kernel
        try:
            (_, logits), grads = jax.jit(fn)(state)
        finally:
            L.attention = original
    else:
        (_, logits), grads = jax.jit(fn)(state)
    return np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]


def test_structure_gives_the_dense_masks():
    batch = _batch()
    self_mask, cross_mask = _dense_masks(batch)
    seg, slots = jnp.asarray(batch["segment_ids"]), jnp.broadcast_to(jnp.arange(T), (4, T))
    structure = L.Mask(
        kv_valid=jnp.asarray(batch["attention_mask"].astype(bool)), q_pos=slots, kv_pos=slots, q_seg=seg, kv_seg=seg
    )
    np.testing.assert_array_equal(np.asarray(structure.allowed()), self_mask)
    from idefics_jax.models.idefics import image_mask_of

    per_image = cross_mask.shape[-1] // N_IMAGES
    np.testing.assert_array_equal(
        np.asarray(image_mask_of(jnp.asarray(batch["image_attention_mask"]), per_image).allowed()), cross_mask
    )
    # The batch exercises what it claims: dead rows (left padding) and a row with no image.
    assert not self_mask[1, 0, :30].any(-1).any() and not cross_mask[2].any()


@pytest.mark.parametrize("attention", ["xla", "blockwise", "cudnn", "cudnn-masks"])
def test_every_kernel_gives_the_dense_mask_logits_and_gradients(attention):
    """'cudnn' falls back to 'xla' on this CPU; 'cudnn-masks' runs what it hands cuDNN on a GPU
    (`_fused`: the structure as a dense mask, dead rows zeroed) through XLA's implementation."""
    assert T > L.BLOCK and T % L.BLOCK, "the blockwise kernel must run full and partial tiles"
    ref_logits, ref_grads = _logits_and_grads("xla", reference=True)
    if attention == "cudnn-masks":
        logits, grads = _logits_and_grads("xla", kernel=_fused_as_on_gpu)
    else:
        logits, grads = _logits_and_grads(attention)
    assert ref_logits.std() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=0)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5 * max(1.0, float(np.abs(r).max())), rtol=0)


def test_cudnn_falls_back_with_a_reason(caplog):
    q = jnp.ones((1, 8, 2, 8), jnp.float32)
    L._logged.clear()
    with caplog.at_level(logging.WARNING):
        out = L.attention(q, q, q, None, 0.5, "cudnn")
    assert out.shape == (1, 8, 16)
    assert any("falls back to 'xla'" in r.getMessage() for r in caplog.records)


def test_cudnn_refuses_what_it_cannot_run_on_a_gpu(monkeypatch):
    """What `cudnn` would hand cuDNN on a GPU, decided on this CPU (the backend check patched)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    bf16 = lambda t, h=8: jnp.zeros((1, t, 2, h), jnp.bfloat16)
    slots = lambda t: jnp.arange(t)[None]
    causal = lambda t: L.Mask(q_pos=slots(t), kv_pos=slots(t))
    padded = lambda t: L.Mask(kv_valid=jnp.ones((1, t), bool), q_pos=slots(t), kv_pos=slots(t))
    assert L._cudnn_refusal(bf16(7), bf16(7), causal(7)) is None  # is_causal: no bias, any length
    assert L._cudnn_refusal(bf16(8), bf16(8), padded(8)) is None
    assert "even lengths" in L._cudnn_refusal(bf16(7), bf16(7), padded(7))
    assert "even lengths" in L._cudnn_refusal(bf16(1), bf16(8), causal(8)._replace(q_pos=slots(1)))  # a decode step
    assert "head dim 12" in L._cudnn_refusal(bf16(8, 12), bf16(8, 12), None)
    assert "float32" in L._cudnn_refusal(jnp.zeros((1, 8, 2, 8)), jnp.zeros((1, 8, 2, 8)), None)


def test_attention_field_is_validated():
    with pytest.raises(ValueError, match=r"attention='flash'.*'xla', 'blockwise', 'cudnn'"):
        _config("flash")
