"""In-context demonstrations: random (seeded) or RICES (retrieval by image similarity).

Random (Flamingo/OpenFlamingo): a query set of `query_set_size` train examples is drawn once per
seed; each test example draws its demonstrations from it, seeded by (seed, example position), so a
result is reproducible example by example.

RICES (Yang et al. 2022, used by Flamingo and IDEFICS): the demonstrations are the train examples
whose images are most similar to the query's, by cosine similarity of image features from our own
vision tower (the ViT's post-layer-normed CLS state), ordered with the most similar last (closest to
the query). Features of a split are computed once and cached on disk when a cache path is given.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from idefics_jax.eval.tasks import Example


class RandomDemos:
    """Seeded random demonstrations from a query set of the train split."""

    def __init__(self, train: Sequence[Example], query_set_size: int, seed: int):
        self.train = train
        self.seed = seed
        rng = np.random.default_rng([seed, 0])
        self.pool = rng.choice(len(train), size=min(query_set_size, len(train)), replace=False)

    def __call__(self, position: int, query: Example, shots: int) -> list[Example]:
        """`shots` distinct demonstrations for the test example at `position`."""
        rng = np.random.default_rng([self.seed, 1, position])
        return [self.train[i] for i in rng.choice(self.pool, size=shots, replace=False)]


class Rices:
    """Demonstrations by image similarity. `train_features` [N_train, D] and `query_features`
    (example id → [D]) are L2-normalised float32; rows of undecodable train images are NaN and never
    chosen."""

    def __init__(self, train: Sequence[Example], train_features: np.ndarray, query_features: dict):
        self.train = train
        self.features = np.nan_to_num(train_features, nan=0.0)
        self.usable = ~np.isnan(train_features).any(axis=1)
        self.query_features = query_features

    def __call__(self, position: int, query: Example, shots: int) -> list[Example]:
        sims = np.where(self.usable, self.features @ self.query_features[query.id], -np.inf)
        best = np.argsort(-sims, kind="stable")[:shots]
        return [self.train[i] for i in best[::-1]]  # most similar last


def cache_path(cache_dir: str, model_id: str, task: str, examples: Sequence[Example]) -> str:
    """Where the features of `examples` under model `model_id` are cached: the name hashes the model
    identity and the image paths, so another checkpoint or another data set never reads stale ones."""
    h = hashlib.sha256(model_id.encode())
    for ex in examples:
        h.update(ex.image.encode() + b"\0")
    return os.path.join(cache_dir, f"rices-{task}-{h.hexdigest()[:16]}.npy")
