"""Which parameters train: HF's freeze flags, reproduced per parameter.

HF (`IdeficsModel.freeze_relevant_params`, `freeze_model`, the decoupled embedding / linear):
- `freeze_text_layers`: the LLaMA decoder layers, the final norm and the base embedding rows are
  frozen; the additional embedding rows always train.
- `freeze_vision_layers`: the whole ViT is frozen.
- `freeze_lm_head`: the base LM-head columns are frozen; the additional ones always train.
- `freeze_*_module_exceptions` (names from "LayerNorm", "Linear", "Embedding") keep training the
  parameters owned *directly* by a module of that torch type inside a frozen part (torch's
  `requires_grad_` is applied parent-first, so a parameter's own module decides). Our RMSNorm, like
  HF's, is no `nn.LayerNorm`; the ViT position embedding is an `nn.Embedding` in HF; the patch conv
  and the class embedding match no exception.
The perceiver and the gated cross-attention layers always train.
"""

from __future__ import annotations

from flax import nnx

from idefics_jax.models import layers as L
from idefics_jax.models.idefics import Idefics


def _torch_type(owner: nnx.Module, leaf: str) -> str | None:
    """The HF torch module type that owns our parameter `leaf` of module `owner`."""
    if isinstance(owner, L.Linear):
        return "Linear"
    if isinstance(owner, L.LayerNorm):
        return "LayerNorm"
    if leaf == "position_embedding":
        return "Embedding"
    return None


def trainable_mask(model: Idefics) -> nnx.State:
    """A State shaped like `nnx.state(model, nnx.Param)` holding True where the parameter trains."""
    cfg = model.config
    owners = {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}

    def trains(path: tuple) -> bool:
        head, leaf = path[0], path[-1]
        kind = _torch_type(owners[tuple(path[:-1])], leaf)
        if head == "embed_tokens":
            return leaf == "additional_embedding" or not cfg.freeze_text_layers
        if head == "lm_head":
            return leaf == "additional_fc" or not cfg.freeze_lm_head
        if head == "norm" or (head == "blocks" and path[1] == "layers"):
            return not cfg.freeze_text_layers or kind in cfg.freeze_text_module_exceptions
        if head == "vision_model":
            return not cfg.freeze_vision_layers or kind in cfg.freeze_vision_module_exceptions
        return True

    params = nnx.state(model, nnx.Param)
    return nnx.from_flat_state([(p, v.replace(trains(tuple(p)))) for p, v in nnx.to_flat_state(params)])
