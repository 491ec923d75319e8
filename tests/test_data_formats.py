"""Readers: OBELICS parquet (inline bytes, paths, HF Image structs), m4 tars, pair parquet."""

import os

import numpy as np
import pytest
from data_conftest_helpers import good_image, tiny_dir, write_docs_parquet, write_tar  # noqa: F401

from idefics_jax.data.formats import FormatError, ImageRef, Source
from idefics_jax.data.tiny import N_DOCS_PARQUET, N_DOCS_TAR, N_PAIRS


def _check_document(ex):
    assert any(isinstance(x, ImageRef) for x in ex.items)
    assert any(isinstance(x, (str, bytes)) for x in ex.items)


def test_tiny_dataset_every_format(tiny_dir):
    docs = Source(tiny_dir["obelics"], "documents")
    assert len(docs) == 2 * N_DOCS_PARQUET and len(docs.shards) == 2
    inline, by_path = docs[0], docs[N_DOCS_PARQUET]  # shard 0 inline bytes, shard 1 relative paths
    _check_document(inline)
    _check_document(by_path)
    assert all(r.data for r in inline.items if isinstance(r, ImageRef))
    paths = [r.path for r in by_path.items if isinstance(r, ImageRef)]
    assert paths and all(os.path.isfile(p) for p in paths)

    tar_docs = Source(tiny_dir["docs_tar"], "documents")
    assert len(tar_docs) == N_DOCS_TAR
    ex = tar_docs[N_DOCS_TAR - 1]
    _check_document(ex)
    assert ex.id.endswith(f"d{N_DOCS_TAR - 1:05d}")

    for key in ("pairs_tar", "pairs_parquet"):
        pairs = Source(tiny_dir[key], "pairs")
        assert len(pairs) == N_PAIRS
        img, text = pairs[N_PAIRS // 2].items
        assert isinstance(img, ImageRef) and img.data[:2] == b"\xff\xd8"  # JPEG
        assert (text.decode() if isinstance(text, bytes) else text).startswith(("a ", "this"))


def test_tar_order_and_index_cache(tmp_path):
    members = [
        ("x.1.image.jpeg", good_image()),  # out of order on purpose: positions come from names
        ("x.0.text.txt", b"first"),
        ("x.2.text.txt", b"third"),
        ("y.0.image.png", good_image()),
        ("y.1.text.txt", b"caption"),
        ("y.json", b"{}"),  # ignored
    ]
    path = str(tmp_path / "s.tar")
    write_tar(path, members)
    src = Source(path, "documents")
    assert os.path.exists(path + ".idx.npz")
    x = src[0]
    assert x.items[0] == b"first" and isinstance(x.items[1], ImageRef) and x.items[2] == b"third"
    assert len(src) == 2 and len(Source(path, "documents")) == 2  # second open reads the cached index


def test_parquet_hf_image_struct(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "im.jpg").write_bytes(good_image())
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(
        pa.table(
            {
                "texts": pa.array([["hi", None, None]], pa.list_(pa.string())),
                "images": pa.array([[None, {"bytes": good_image(), "path": None}, {"bytes": None, "path": "im.jpg"}]], pa.list_(struct)),
            }
        ),
        tmp_path / "d.parquet",
    )  # fmt: skip
    ex = Source(str(tmp_path / "d.parquet"), "documents")[0]
    assert ex.items[1].data and ex.items[2].path == str(tmp_path / "im.jpg")


def test_parquet_position_with_both_text_and_image_is_malformed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"texts": pa.array([["a", "b"]]), "images": pa.array([[good_image(), None]], pa.list_(pa.binary()))}),
        tmp_path / "d.parquet",
    )
    with pytest.raises(FormatError, match="position 0 has both"):
        Source(str(tmp_path / "d.parquet"), "documents")[0]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        Source(str(tmp_path / "*.parquet"), "documents")
    write_docs_parquet(str(tmp_path / "d.parquet"), [["a", good_image()]])
    with pytest.raises(ValueError, match=r"d\.parquet: pairs parquet needs columns \['image', 'text'\]"):
        Source(str(tmp_path / "d.parquet"), "pairs")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="x.csv: unknown shard format"):
        Source(str(tmp_path / "x.csv"), "pairs")
    with pytest.raises(ValueError, match="kind 'pair'"):
        Source(str(tmp_path / "d.parquet"), "pair")


def test_random_access_matches_sequential(tiny_dir):
    src = Source(tiny_dir["obelics"], "documents")
    order = np.random.default_rng(0).permutation(len(src))[:20]
    again = Source(tiny_dir["obelics"], "documents")
    for i in order:
        assert src[int(i)].items == again[int(i)].items
        assert src[int(i)].id == f"row{int(i) - (N_DOCS_PARQUET if i >= N_DOCS_PARQUET else 0)}"
