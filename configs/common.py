"""Shared defaults for every config file (model architecture aside).

A config is a Python file with `get_config()` returning an `ml_collections.ConfigDict` with sections:
- `model`: the fields of `idefics_jax.config.IdeficsConfig` (nested `vision` / `perceiver`);
- `mesh`: {data, fsdp, tensor}; one -1 takes the remaining devices;
- `sharding_rules`: None = the default table in `idefics_jax.sharding`, or ((logical, mesh axes), ...);
- `data` / `eval_data`: `idefics_jax.data.default_config()` sections (eval_data None = no eval);
- `train`: see `train_section()`;
- `seed`, `workdir` (None: --workdir is required; the tiny config sets a default).
"""

from __future__ import annotations

import ml_collections

from idefics_jax import data
from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig


def model_section(config: IdeficsConfig) -> ml_collections.ConfigDict:
    """An `IdeficsConfig` as a ConfigDict (so `--config.model.x=v` overrides work)."""
    return ml_collections.ConfigDict(config.to_dict())


def published(
    hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int, rms_norm_eps: float
) -> IdeficsConfig:
    """The published IDEFICS architecture around a LLaMA of the given size (HuggingFaceM4/idefics-*).

    LLaMA vocab 32000 + 2 additional tokens (<fake_token_around_image>, <image>), a gated
    cross-attention block before every 4th LLaMA layer, qk layer norms in both the cross-attention
    and the perceiver, float gates initialised at zero, a 6-layer perceiver resampler to 64 latents,
    the ViT-H/14 vision tower; vision and LLaMA frozen (only the new parts train), bf16 compute,
    cuDNN attention.
    """
    return IdeficsConfig(
        vocab_size=32000,
        additional_vocab_size=2,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        rms_norm_eps=rms_norm_eps,
        hidden_act="silu",
        max_position_embeddings=2048,
        cross_layer_interval=4,
        qk_layer_norms=True,
        alpha_type="float",
        alpha_initializer="zeros",
        alphas_initializer_range=0.0,
        use_resampler=True,
        tie_word_embeddings=False,
        freeze_text_layers=True,
        freeze_vision_layers=True,
        freeze_lm_head=True,
        vision=VisionConfig(
            embed_dim=1280,
            image_size=224,
            intermediate_size=5120,
            patch_size=14,
            num_hidden_layers=32,
            num_attention_heads=16,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        perceiver=PerceiverConfig(
            resampler_n_latents=64,
            resampler_depth=6,
            resampler_n_heads=16,
            resampler_head_dim=96,
            qk_layer_norms_perceiver=True,
        ),
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        # cuDNN's fused attention: on one H200 the 9B/80B-width train step is 8% / 3% faster than
        # with 'xla' (README, "Measured"); off a GPU it falls back to 'xla' and logs why.
        attention="cudnn",
    )


def train_section() -> ml_collections.ConfigDict:
    """Defaults of the `train` section (the 9b/80b recipe's optimizer numbers are set there)."""
    return ml_collections.ConfigDict(
        dict(
            steps=1000,
            micro_batches=1,  # gradient accumulation: global batch = micro_batches × micro-batch
            z_loss=1e-3,  # coefficient of logsumexp² on target tokens
            init_from=ml_collections.FieldReference(None, field_type=str),  # checkpoint dir (convert_weights)
            # Storage dtype of frozen params (None = model.param_dtype). With bf16 compute, bf16 frozen
            # weights give the same function at half the memory and all-gather traffic.
            frozen_dtype=ml_collections.FieldReference(None, field_type=str),
            # Rules table for the frozen params (None = sharding_rules); see without_fsdp().
            frozen_sharding_rules=ml_collections.FieldReference(None, field_type=tuple),
            # How the step computes with the trainable params (train/step.py):
            #  fsdp:  as stored, sharded over the batch axes ('data', 'fsdp'): each micro-batch
            #         all-gathers them layer by layer and reduce-scatters their gradients;
            #  zero1: one compute copy per step, in the model's compute dtype, sharded over
            #         'tensor' only (gathered once before the micro-batch loop); gradients
            #         accumulate locally in fp32 and are reduce-scattered once per step. The fp32
            #         master weights and the AdamW moments stay sharded as in fsdp (same checkpoint).
            trainable_layout="fsdp",
            optimizer=dict(
                lr=1e-4,
                end_lr=1e-5,
                warmup_steps=100,
                decay_steps=1000,
                b1=0.9,
                b2=0.999,
                eps=1e-8,
                weight_decay=0.1,
                clip_norm=1.0,  # global gradient norm threshold (0 = no clipping)
            ),
            checkpoint_every=250,
            keep_checkpoints=3,  # newest kept
            keep_period=0,  # steps that are multiples of this are kept forever (0 = none)
            async_checkpointing=True,
            # A workdir lock whose heartbeat is older than this is taken over (train/lock.py).
            lock_stale_after_s=300.0,
            eval_every=0,  # 0 = no eval
            eval_steps=4,
            # Few-shot benchmarks run on the live parameters during training (idefics_jax.eval):
            # [{task, data, shots: [0, 4], num_samples, every}], scores logged as eval/<task>/<k>shot.
            eval_tasks=[],
            log_every=10,
            peak_flops_per_device=312e12,  # for MFU: A100 bf16 dense
            guards=dict(
                max_nonfinite_in_a_row=5,
                max_spikes_in_a_row=20,  # with spike_action=skip: stop instead of skipping forever
                spike_action="skip",  # none | skip (drop the update) | rollback (to last ckpt + skip data)
                spike_window=100,  # losses in the rolling window
                spike_sigmas=6.0,  # spike: loss > mean + k·σ of the window
                rollback_skip_steps=200,
                max_rollbacks=10,
            ),
            # [[data step, scale], ...]: multiplies that batch's loss and gradients (fault injection for
            # tests: nan → a non-finite step; 1000 → a loss spike that follows the bad batch).
            debug=dict(loss_scale_at_steps=[]),
        )
    )


def web_mixture(c: ml_collections.ConfigDict, root: str = "/data/idefics") -> None:
    """IDEFICS's training mixture (OBELICS 73.85%, LAION 17.18%, Wikipedia 6.15%, PMD 2.82%) at
    placeholder paths under `root`; override with --config.data.datasets.NAME.paths=..."""
    c.data.tokenizer_path = f"{root}/tokenizer"
    c.data.datasets = ml_collections.ConfigDict(
        {
            "obelics": dict(kind="documents", paths=f"{root}/obelics/*.parquet", weight=73.85),
            "laion": dict(kind="pairs", paths=f"{root}/laion/*.tar", weight=17.18),
            "wikipedia": dict(kind="documents", paths=f"{root}/wikipedia/*.parquet", weight=6.15),
            "pmd": dict(kind="pairs", paths=f"{root}/pmd/*.tar", weight=2.82),
        }
    )
    c.data.seq_len, c.data.max_num_images, c.data.image_size = 1024, 5, 224


def without_fsdp() -> tuple:
    """The default rules with the weights' width axes kept whole over 'fsdp' (split over 'tensor'
    only). For frozen weights this trades memory (65B bf16 / 8 = 16 GB per GPU for the 80B's LLaMA)
    for no all-gathers of them at all: the network then carries only the trainable weights."""
    from idefics_jax.sharding import DEFAULT_RULES

    return tuple((name, None if name in ("embed", "vision_embed") else target) for name, target in DEFAULT_RULES)


def sequence_parallel() -> tuple:
    """The default rules with sequence parallelism: the decoder's residual stream split over
    'tensor' along the sequence between layers ('length' → 'tensor'; see idefics_jax.sharding).
    For `c.sharding_rules` with train.trainable_layout='zero1'; with tensor=1 it changes nothing.
    (With the fsdp layout the partitioner reduced activations over 'fsdp' instead of gathering the
    weights: the 9B at tensor 8 planned at 19.2%, docs/cluster.md.)"""
    from idefics_jax.sharding import DEFAULT_RULES

    return tuple((name, "tensor" if name == "length" else target) for name, target in DEFAULT_RULES)


def base(model: IdeficsConfig) -> ml_collections.ConfigDict:
    """The config skeleton around `model`."""
    c = ml_collections.ConfigDict()
    c.model = model_section(model)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding_rules = ml_collections.FieldReference(None, field_type=tuple)
    c.data = data.default_config()
    c.eval_data = ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict)
    c.train = train_section()
    c.seed = 0
    c.workdir = ml_collections.FieldReference(None, field_type=str)
    return c
