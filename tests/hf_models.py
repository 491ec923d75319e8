"""Tiny random HF IDEFICS models built in the tests (no downloads), and inputs in HF's layouts."""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx
from transformers import IdeficsConfig as HFConfig
from transformers import IdeficsForVisionText2Text

from idefics_jax import IdeficsConfig, hf

VOCAB, EXTRA = 96, 2


def hf_config(
    *, alpha_type="float", qk=True, qk_perceiver=True, resampler=True, interval=2, layers=4, tie=False, **kw
) -> HFConfig:
    """A tiny IdeficsConfig (its alphas are re-drawn non-zero by `hf_model`)."""
    args = dict(
        vocab_size=VOCAB,
        additional_vocab_size=EXTRA,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        cross_layer_interval=interval,
        qk_layer_norms=qk,
        use_resampler=resampler,
        alpha_type=alpha_type,
        alpha_initializer="zeros",
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        freeze_lm_head=False,
        max_position_embeddings=1024,
        vision_config=dict(
            embed_dim=24,
            image_size=28,
            patch_size=14,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_act="gelu",
        ),
        perceiver_config=dict(
            use_resampler=resampler,
            resampler_n_latents=3,
            resampler_depth=2,
            resampler_n_heads=2,
            resampler_head_dim=8,
            qk_layer_norms_perceiver=qk_perceiver,
        ),
    )
    args.update(kw)
    return HFConfig(**args)


def hf_model(config: HFConfig, seed: int = 0) -> IdeficsForVisionText2Text:
    """A random fp32 HF model in eval mode. Norm weights, biases and the gates are re-drawn so none is
    trivially 0 or 1: alphas ~ N(0, 0.5²) keep the cross-attention path live. (HF's own
    alpha_initializer='normal' crashes for alpha_type='float' in transformers 5.)"""
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(
                (
                    "layernorm.weight",
                    "layer_norm.weight",
                    "norm.weight",
                    "ln.weight",
                    "layer_norm1.weight",
                    "layer_norm2.weight",
                    "pre_layrnorm.weight",
                )
            ):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "alpha" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def ours_from_torch(model: IdeficsForVisionText2Text, **overrides):
    """Our `Idefics` holding the same weights as an HF torch model."""
    config = IdeficsConfig.from_hf(model.config, **overrides)
    graphdef, state = hf.load_state(config, hf.StateDictReader(model.state_dict()))
    return nnx.merge(graphdef, state)


def inputs(
    batch: int,
    seq: int,
    num_images: int,
    *,
    seed: int = 0,
    image_size: int = 28,
    pad: tuple[int, ...] = (),
    no_image_rows: tuple[int, ...] = (),
    multi_hot_rows: tuple[int, ...] = (),
):
    """A batch in HF's layouts: left padding of `pad[b]` tokens on row b; images placed along each row;
    token t sees the most recent image at or before it (all earlier images on `multi_hot_rows`);
    rows in `no_image_rows` see no image at all; tokens before a row's first image see none."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB + EXTRA, (batch, seq)).astype(np.int64)
    am = np.ones((batch, seq), np.int64)
    iam = np.zeros((batch, seq, num_images), np.int64)
    for b in range(batch):
        p = pad[b] if b < len(pad) else 0
        am[b, :p] = 0
        ids[b, :p] = 0
        if b in no_image_rows:
            continue
        n_img = 1 + (b % num_images)
        starts = np.sort(rng.choice(np.arange(p + 1, seq - 1), n_img, replace=False))
        for n, s in enumerate(starts):
            end = starts[n + 1] if n + 1 < n_img else seq
            if b in multi_hot_rows:
                iam[b, s:, n] = 1
            else:
                iam[b, s:end, n] = 1
    pixels = rng.standard_normal((batch, num_images, 3, image_size, image_size)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=am, pixel_values=pixels, image_attention_mask=iam)


def torch_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()}, use_cache=False)
    return out.logits.float().numpy()
