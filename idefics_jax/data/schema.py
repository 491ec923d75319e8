"""The training batch, defined once: its keys, dtypes and shapes.

The pipeline yields it (per process), the train step consumes it (`MODEL_INPUTS` go to the model),
and the plan and the benchmarks compile against `batch_spec`. Dimensions by name:
B rows, T = data.seq_len, N = data.max_num_images, S = data.image_size.

    input_ids             int32   [B, T]   packed token ids (padding: the pad id)
    attention_mask        int32   [B, T]   1 on real tokens
    position_ids          int32   [B, T]   restart per packed example when data.use_segment_ids
    segment_ids           int32   [B, T]   1, 2, … per packed example, 0 on padding
    pixel_values          float32 [B, N, 3, S, S]  CLIP-normalised, zero for absent images
    image_attention_mask  int32   [B, T, N]  one-hot: the image each token sees (none: all zero)
    loss_mask             float32 [B, T]   1 where the token is a prediction target
    dataset_id            int32   [B]      index of the row's dataset in data.datasets order

Imports no JAX at module level (the pipeline's worker processes use it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

BATCH: dict[str, tuple[tuple[str, ...], Any]] = {
    "input_ids": (("B", "T"), np.int32),
    "attention_mask": (("B", "T"), np.int32),
    "position_ids": (("B", "T"), np.int32),
    "segment_ids": (("B", "T"), np.int32),
    "pixel_values": (("B", "N", "3", "S", "S"), np.float32),
    "image_attention_mask": (("B", "T", "N"), np.int32),
    "loss_mask": (("B", "T"), np.float32),
    "dataset_id": (("B",), np.int32),
}
BATCH_KEYS = tuple(BATCH)
# What the model's __call__ takes; the rest (loss_mask, dataset_id) is for the loss and the metrics.
MODEL_INPUTS = ("input_ids", "pixel_values", "image_attention_mask", "attention_mask", "position_ids", "segment_ids")


def batch_shapes(data_cfg: Mapping[str, Any], batch_size: int | None = None) -> dict[str, tuple[tuple[int, ...], Any]]:
    """key → (shape, numpy dtype) of a batch of `batch_size` rows (default: data.global_batch_size)."""
    sizes = {
        "B": data_cfg["global_batch_size"] if batch_size is None else batch_size,
        "T": data_cfg["seq_len"],
        "N": data_cfg["max_num_images"],
        "S": data_cfg["image_size"],
        "3": 3,
    }
    return {k: (tuple(sizes[d] for d in dims), dtype) for k, (dims, dtype) in BATCH.items()}


def batch_spec(data_cfg: Mapping[str, Any], mesh: Any = None, batch_size: int | None = None) -> dict[str, Any]:
    """key → `jax.ShapeDtypeStruct` of the global batch; with `mesh`, sharded over the 'batch'
    logical axis exactly as the trainer places the pipeline's arrays (`batch_sharding`)."""
    import jax

    out = {}
    for k, (shape, dtype) in batch_shapes(data_cfg, batch_size).items():
        sharding = None if mesh is None else batch_sharding(mesh, len(shape))
        out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return out


def batch_sharding(mesh: Any, ndim: int) -> Any:
    """The NamedSharding of a batch array of rank `ndim`: rows over 'batch', the rest whole."""
    from jax.sharding import NamedSharding

    from idefics_jax import sharding

    return NamedSharding(mesh, sharding.logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def check_batch(batch: Mapping[str, np.ndarray], data_cfg: Mapping[str, Any], batch_size: int) -> None:
    """Raises ValueError naming the key whose shape or dtype differs from the schema."""
    want = batch_shapes(data_cfg, batch_size)
    if set(batch) != set(want):
        raise ValueError(f"batch keys {sorted(batch)}; expected {sorted(want)}")
    for k, (shape, dtype) in want.items():
        if batch[k].shape != shape or batch[k].dtype != np.dtype(dtype):
            raise ValueError(
                f"batch[{k!r}]: {batch[k].dtype}{list(batch[k].shape)}; expected {np.dtype(dtype)}{list(shape)}"
            )
