"""Our model is the same function as transformers' IdeficsForVisionText2Text (logits and gradients)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hf_models import hf_config, hf_model, inputs, ours_from_torch, torch_logits

from idefics_jax import IdeficsConfig, hf

# (alpha_type, qk_layer_norms, qk_layer_norms_perceiver, use_resampler, cross_layer_interval, layers)
GRID = [
    ("float", True, True, True, 1, 3),
    ("vector", False, True, True, 2, 4),
    ("vector", True, False, True, 4, 4),
    ("float", False, False, False, 2, 2),
    ("vector", True, True, False, 1, 2),
    ("float", True, False, True, 4, 8),
]


def _case_id(c):
    return "alpha={}-qk={}-qkp={}-resampler={}-interval={}-L={}".format(*c)


@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_logits_match_hf(case):
    alpha, qk, qkp, res, interval, layers = case
    model = hf_model(
        hf_config(alpha_type=alpha, qk=qk, qk_perceiver=qkp, resampler=res, interval=interval, layers=layers)
    )
    ours = ours_from_torch(model)
    # 1-3 images per row, left padding, a row that sees no image, a row whose tokens see all earlier images.
    batch = inputs(4, 48, 3, pad=(0, 7, 3, 0), no_image_rows=(2,), multi_hot_rows=(3,), seed=layers)
    ref = torch_logits(model, batch)
    got = np.asarray(ours(**batch))
    assert got.dtype == np.float32 and got.shape == ref.shape == (4, 48, 98)
    assert ref.std() > 0.1, "logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_long_sequence_matches_hf():
    """≥512 tokens: RoPE bugs (wrong frequencies, halves swapped) only show at long range."""
    model = hf_model(hf_config(alpha_type="vector", interval=2, layers=4))
    ours = ours_from_torch(model)
    batch = inputs(2, 576, 3, pad=(0, 40), seed=5)
    np.testing.assert_allclose(np.asarray(ours(**batch)), torch_logits(model, batch), atol=1e-4, rtol=0)


def test_alphas_are_live():
    """The grid would prove nothing about cross-attention if its gates were zero."""
    model = hf_model(hf_config())
    alphas = [p.abs().min().item() for n, p in model.named_parameters() if "alpha" in n]
    assert alphas and min(alphas) > 1e-3


def test_text_only_equals_hf_with_no_image_seen():
    """No pixel_values: every token sees no image, as HF with an all-zero image_attention_mask."""
    model = hf_model(hf_config(alpha_type="vector"))
    ours = ours_from_torch(model)
    batch = inputs(2, 32, 1, pad=(0, 4), no_image_rows=(0, 1))
    got = np.asarray(ours(batch["input_ids"], attention_mask=batch["attention_mask"]))
    np.testing.assert_allclose(got, torch_logits(model, batch), atol=1e-4, rtol=0)


def test_tied_embeddings_match_hf():
    model = hf_model(hf_config(tie=True))
    ours = ours_from_torch(model)
    assert ours.lm_head is None
    batch = inputs(2, 24, 2, pad=(0, 3))
    np.testing.assert_allclose(np.asarray(ours(**batch)), torch_logits(model, batch), atol=1e-4, rtol=0)


def test_parity_check_can_fail():
    """A perturbed weight must break the comparison (the test above is not vacuous)."""
    model = hf_model(hf_config())
    ours = ours_from_torch(model)
    blocks = ours.blocks.gated_cross_attn_layer.cross_attn.v_proj.kernel
    blocks.set_value(blocks[...] * 1.01)
    batch = inputs(2, 24, 2)
    assert np.abs(np.asarray(ours(**batch)) - torch_logits(model, batch)).max() > 1e-4


def _masked_next_token_loss_torch(logits, ids, mask):
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    w = mask[:, 1:]
    return (nll * w).sum() / w.sum()


@pytest.mark.parametrize("case", GRID[:4], ids=_case_id)
def test_gradients_match_torch(case):
    alpha, qk, qkp, res, interval, layers = case
    model = hf_model(
        hf_config(alpha_type=alpha, qk=qk, qk_perceiver=qkp, resampler=res, interval=interval, layers=layers)
    ).train()
    ours = ours_from_torch(model)
    batch = inputs(3, 32, 2, pad=(0, 5, 2), no_image_rows=(2,), seed=1)
    mask = batch["attention_mask"].astype(np.float32)

    model.zero_grad()
    logits = model(**{k: torch.from_numpy(v) for k, v in batch.items()}, use_cache=False).logits
    _masked_next_token_loss_torch(logits, torch.from_numpy(batch["input_ids"]), torch.from_numpy(mask)).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}

    graphdef, params = nnx.split(ours)

    def loss_fn(p):
        out = nnx.merge(graphdef, p)(**batch)
        nll = optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], batch["input_ids"][:, 1:])
        return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()

    grads = jax.grad(loss_fn)(params)
    flat = {tuple(str(k) for k in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    config = IdeficsConfig.from_hf(model.config)
    # A gradient that is analytically zero (the perceiver's k_layer_norm bias: adding a constant
    # vector to every key shifts all scores of a query equally, and softmax ignores that) is float
    # noise on both sides; relative error is undefined there, so both must just be noise-sized.
    noise = 1e-6 * np.sqrt(sum(float((g.float() ** 2).sum()) for g in ref.values() if g is not None))
    checked = 0
    for entry in hf.entries(config):
        for name, g in hf.iter_hf(entry, flat[entry.path]):
            r = ref[name]
            if r is None:  # torch never touched it (post_layernorm: its output is unused) → ours is zero
                assert not np.any(g), name
                continue
            r = r.numpy()
            if np.linalg.norm(r) < noise:
                assert np.linalg.norm(g) < noise, name
                continue
            rel = np.linalg.norm(g - r) / np.linalg.norm(r)
            assert rel <= 1e-4, (name, rel)
            checked += 1
    assert checked > 50
