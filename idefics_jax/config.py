"""Model configuration: frozen dataclasses that mirror transformers' `IdeficsConfig`.

Every field that changes the function computed by `IdeficsForVisionText2Text` is here, plus five
fields of our own that change only how it is computed (`dtype`, `param_dtype`, `remat`, `attention`,
`scan_unroll`). `from_hf` and `to_hf` round-trip with HF's `config.json` layout (nested
`vision_config` / `perceiver_config`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "silu", "swish", "relu")
ALPHA_TYPES = ("float", "vector")
ALPHA_INITIALIZERS = ("zeros", "ones", "normal", "gaussian", "random")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "minimal")
# Attention kernels (models/layers.py `attention`); all compute the same function.
ATTENTION_IMPLS = ("xla", "blockwise", "cudnn")
# Our fields: how the function is computed, not which function (not in HF's config.json).
OWN_FIELDS = ("dtype", "param_dtype", "remat", "attention", "scan_unroll")
# HF's freeze_model() maps these module-class names to torch module types.
FREEZE_EXCEPTIONS = ("LayerNorm", "Linear", "Embedding")


def _check(cond: bool, field: str, value: Any, expected: str) -> None:
    if not cond:
        raise ValueError(f"invalid config: {field}={value!r}; expected {expected}")


def _known(cls, d: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT tower (HF `IdeficsVisionConfig`, same defaults, so a config.json that omits a field
    means what it means to transformers); ViT-H/14 is embed_dim 1280, 32 layers, 16 heads."""

    embed_dim: int = 768
    image_size: int = 224
    intermediate_size: int = 5120
    patch_size: int = 14
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in (
            "embed_dim",
            "image_size",
            "intermediate_size",
            "patch_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
        ):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"vision_config.{name}", v, "a positive int")
        _check(
            self.embed_dim % self.num_attention_heads == 0,
            "vision_config.num_attention_heads",
            self.num_attention_heads,
            f"a divisor of vision_config.embed_dim={self.embed_dim}",
        )
        _check(
            self.image_size % self.patch_size == 0,
            "vision_config.patch_size",
            self.patch_size,
            f"a divisor of vision_config.image_size={self.image_size}",
        )
        _check(self.hidden_act in ACTIVATIONS, "vision_config.hidden_act", self.hidden_act, f"one of {ACTIVATIONS}")
        _check(self.layer_norm_eps > 0, "vision_config.layer_norm_eps", self.layer_norm_eps, "> 0")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """Perceiver resampler (HF `IdeficsPerceiverConfig`); used only when `IdeficsConfig.use_resampler`."""

    resampler_n_latents: int = 64
    resampler_depth: int = 6
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    qk_layer_norms_perceiver: bool = False

    def __post_init__(self):
        for name in ("resampler_n_latents", "resampler_depth", "resampler_n_heads", "resampler_head_dim"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"perceiver_config.{name}", v, "a positive int")


@dataclasses.dataclass(frozen=True)
class IdeficsConfig:
    """The whole model (HF `IdeficsConfig`) plus how to compute it.

    Our own fields: `dtype` is the matmul compute dtype (softmax and norms always run in fp32),
    `param_dtype` the storage dtype of parameters, `remat` the rematerialisation policy applied once
    per scanned layer (see `REMAT_POLICIES`), `attention` the attention kernel (`ATTENTION_IMPLS`:
    'xla' dense, 'blockwise' flash-style, 'cudnn' fused on GPU with a logged fallback to 'xla'; see
    `models.layers.attention`), `scan_unroll` how many layers each iteration of the forward's layer scans runs
    (`models.layers.scan`: 1 is one loop iteration per layer, so compile time does not grow with
    depth; a value at least the depth of a stack turns it into straight-line code; generation's
    cached decode step keeps its own one-layer-per-iteration scans).
    """

    vocab_size: int = 32000
    additional_vocab_size: int = 0
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    cross_layer_interval: int = 1
    qk_layer_norms: bool = False
    alpha_type: str = "float"
    alpha_initializer: str = "zeros"
    alphas_initializer_range: float = 0.0
    initializer_range: float = 0.02
    use_resampler: bool = False
    tie_word_embeddings: bool = False
    freeze_text_layers: bool = True
    freeze_text_module_exceptions: tuple[str, ...] = ()
    freeze_lm_head: bool = False
    freeze_vision_layers: bool = True
    freeze_vision_module_exceptions: tuple[str, ...] = ()
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = dataclasses.field(default_factory=PerceiverConfig)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"
    scan_unroll: int = 1

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "cross_layer_interval",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, name, v, "a positive int")
        _check(
            isinstance(self.additional_vocab_size, int) and self.additional_vocab_size >= 0,
            "additional_vocab_size",
            self.additional_vocab_size,
            "an int >= 0",
        )
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            self.num_attention_heads,
            f"a divisor of hidden_size={self.hidden_size}",
        )
        _check(
            self.num_hidden_layers % self.cross_layer_interval == 0,
            "num_hidden_layers",
            self.num_hidden_layers,
            f"a multiple of cross_layer_interval={self.cross_layer_interval}",
        )
        _check(self.hidden_act in ACTIVATIONS, "hidden_act", self.hidden_act, f"one of {ACTIVATIONS}")
        _check(self.alpha_type in ALPHA_TYPES, "alpha_type", self.alpha_type, f"one of {ALPHA_TYPES}")
        _check(
            self.alpha_initializer in ALPHA_INITIALIZERS,
            "alpha_initializer",
            self.alpha_initializer,
            f"one of {ALPHA_INITIALIZERS}",
        )
        _check(self.alphas_initializer_range >= 0, "alphas_initializer_range", self.alphas_initializer_range, ">= 0")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "> 0")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "> 0")
        _check(
            (self.hidden_size // self.num_attention_heads) % 2 == 0,
            "num_attention_heads",
            self.num_attention_heads,
            "a head dim (hidden_size / heads) that is even, for rotary embedding",
        )
        for name in ("freeze_text_module_exceptions", "freeze_vision_module_exceptions"):
            v = getattr(self, name)
            _check(
                isinstance(v, tuple) and all(x in FREEZE_EXCEPTIONS for x in v),
                name,
                v,
                f"a tuple of names from {FREEZE_EXCEPTIONS}",
            )
        for name in ("dtype", "param_dtype"):
            _check(getattr(self, name) in DTYPES, name, getattr(self, name), f"one of {DTYPES}")
        _check(self.remat in REMAT_POLICIES, "remat", self.remat, f"one of {REMAT_POLICIES}")
        _check(self.attention in ATTENTION_IMPLS, "attention", self.attention, f"one of {ATTENTION_IMPLS}")
        _check(
            isinstance(self.scan_unroll, int) and not isinstance(self.scan_unroll, bool) and self.scan_unroll > 0,
            "scan_unroll",
            self.scan_unroll,
            "a positive int (layers per scan iteration)",
        )
        _check(isinstance(self.vision, VisionConfig), "vision", type(self.vision).__name__, "a VisionConfig")
        _check(
            isinstance(self.perceiver, PerceiverConfig), "perceiver", type(self.perceiver).__name__, "a PerceiverConfig"
        )

    # Derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_blocks(self) -> int:
        """Scanned blocks: one gated cross-attention layer + `cross_layer_interval` decoder layers."""
        return self.num_hidden_layers // self.cross_layer_interval

    @property
    def total_vocab_size(self) -> int:
        return self.vocab_size + self.additional_vocab_size

    @property
    def image_seq_len(self) -> int:
        """Tokens per image that the cross-attention sees (latents, or ViT patches + CLS)."""
        if self.use_resampler:
            return self.perceiver.resampler_n_latents
        return self.vision.num_patches + 1

    def replace(self, **kw) -> IdeficsConfig:
        return dataclasses.replace(self, **kw)

    # HF round trip ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | os.PathLike | Any, **overrides) -> IdeficsConfig:
        """Builds a config from an HF `IdeficsConfig`, its dict, a config.json path or its directory.

        `overrides` set our own fields (dtype, param_dtype, remat, attention, scan_unroll) or any other field.
        """
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no config.json found (expected an HF IDEFICS directory)")
            with open(path) as f:
                d = json.load(f)
        elif isinstance(source, Mapping):
            d = dict(source)
        else:
            d = source.to_dict()
        model_type = d.get("model_type", "idefics")
        if model_type != "idefics":
            raise ValueError(f"config model_type={model_type!r}; expected 'idefics'")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config rope_parameters.rope_type={rope_type!r}; only 'default' RoPE is supported")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        vision = d.get("vision_config") or {}
        perceiver = d.get("perceiver_config") or {}
        for name in ("image_size", "patch_size"):
            if isinstance(vision.get(name), (list, tuple)):
                a, b = vision[name]
                _check(a == b, f"vision_config.{name}", vision[name], "a square size")
                vision = {**vision, name: a}
        eos = d.get("eos_token_id", 2)
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        # HF's "dtype" is the storage dtype of its weights, not our compute dtype.
        kw = {k: v for k, v in _known(cls, d).items() if k not in OWN_FIELDS}
        kw.update(
            rope_theta=float(theta),
            eos_token_id=eos,
            freeze_text_module_exceptions=tuple(d.get("freeze_text_module_exceptions") or ()),
            freeze_vision_module_exceptions=tuple(d.get("freeze_vision_module_exceptions") or ()),
            vision=VisionConfig(**_known(VisionConfig, vision)),
            perceiver=PerceiverConfig(**_known(PerceiverConfig, perceiver)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (loadable by `transformers.IdeficsConfig(**d)`)."""
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("vision", "perceiver", "rope_theta", *OWN_FIELDS)
        }
        d["freeze_text_module_exceptions"] = list(self.freeze_text_module_exceptions)
        d["freeze_vision_module_exceptions"] = list(self.freeze_vision_module_exceptions)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d["vision_config"] = dataclasses.asdict(self.vision)
        d["perceiver_config"] = {**dataclasses.asdict(self.perceiver), "use_resampler": self.use_resampler}
        d["model_type"] = "idefics"
        d["architectures"] = ["IdeficsForVisionText2Text"]
        d["dtype"] = self.param_dtype
        return d

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested, JSON-able (what checkpoints store beside the weights)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IdeficsConfig:
        """Inverse of `to_dict`; also accepts an ml_collections ConfigDict."""
        d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
        kw = _known(cls, d)
        kw["vision"] = VisionConfig(**_known(VisionConfig, dict(d.get("vision", {}))))
        kw["perceiver"] = PerceiverConfig(**_known(PerceiverConfig, dict(d.get("perceiver", {}))))
        for name in ("freeze_text_module_exceptions", "freeze_vision_module_exceptions"):
            if name in kw:
                kw[name] = tuple(kw[name])
        return cls(**kw)
