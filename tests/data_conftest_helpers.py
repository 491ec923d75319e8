"""Shared fixtures and writers for the tests/test_data_*.py files (import what you use)."""

from __future__ import annotations

import io
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from idefics_jax.data import tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> dict[str, str]:
    """The tiny dataset, generated once per test session."""
    return tiny.ensure(str(tmp_path_factory.getbasetemp() / "tiny-data"))


def small_config(tiny_paths: dict[str, str], **overrides) -> ml_collections.ConfigDict:
    """The tiny data config with test sizes (seq_len 48, 3 images of 30², batch 4)."""
    cfg = tiny.config(tiny_paths["root"])
    cfg.seq_len = 48
    cfg.global_batch_size = 4
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_image(colour=(200, 30, 30), size=(32, 24)) -> bytes:
    return encode(Image.new("RGB", size, colour), "JPEG")


def write_docs_parquet(path: str, docs: list[list], image_as_path: bool = False) -> None:
    """docs: lists of str (text) or bytes/str (image: inline bytes, or a path when image_as_path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [[x if isinstance(x, str) and not _is_img(x, image_as_path) else None for x in d] for d in docs]
    images = [[None if t is not None else x for t, x in zip(tt, d)] for tt, d in zip(texts, docs)]
    pq.write_table(
        pa.table(
            {
                "texts": pa.array(texts, pa.list_(pa.string())),
                "images": pa.array(images, pa.list_(pa.string() if image_as_path else pa.binary())),
            }
        ),
        path,
        row_group_size=4,
    )


def _is_img(x, image_as_path: bool) -> bool:
    return image_as_path and isinstance(x, str) and x.startswith("img:")


def write_pairs_parquet(path: str, pairs: list[tuple[bytes, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"image": pa.array([p[0] for p in pairs], pa.binary()), "text": [p[1] for p in pairs]}), path
    )


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def one_dataset_config(tiny_paths, kind: str, paths: str, **overrides) -> ml_collections.ConfigDict:
    """A config reading only `paths` (examples_per_row 2, so each row tries two examples)."""
    cfg = small_config(tiny_paths, **overrides)
    cfg.datasets = ml_collections.ConfigDict(
        {"bad": {"kind": kind, "paths": paths, "weight": 1.0, "examples_per_row": 2}}
    )
    return cfg


def rows_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
