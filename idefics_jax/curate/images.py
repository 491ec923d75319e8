"""Stage `images`: image URLs → bytes from an offline image store, and OBELICS's image filters.

The store is what `img2dataset` writes, the format its users already have:
  * webdataset tars: members `{key}.{jpg,png,webp}` with `{key}.json` holding `{"url": …}`;
  * parquet: a `url` column and the image bytes in `jpg` (or `png`/`webp`/`image`);
or a directory of image files with a manifest: a `.tsv` file of `url<TAB>path` lines (paths
relative to the manifest's directory).
`build_index` scans the store once (tar headers and json members; parquet's `url` column; the
manifest) into a SQLite file `url → (file, a, b)` (tar: byte offset and size; parquet: row group
and row; manifest: the image file, a = b = -1), so every
task looks images up with bounded memory and reads only the bytes it needs. When a URL is in the
store twice, the first in sorted file order wins. A corrupt or truncated tar keeps the members read
before the damage and is counted; it never stops the stage.

Per image (in this order, first failure counted): missing from the store, undecodable (PIL cannot
fully decode it), format not in `images.formats`, a side under `min_side` or over `max_side`,
aspect ratio over `max_aspect_ratio`. A failing image is removed from its document.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile

from datatrove.pipeline.base import PipelineStep

from idefics_jax.curate.config import ImagesConfig
from idefics_jax.curate.docs import set_nodes

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "image")


def _index_tar(path: str) -> tuple[list[tuple], bool]:
    """(url, path, offset, size) rows of one img2dataset tar, and whether it was read to the end."""
    images, urls = {}, {}
    size = os.path.getsize(path)
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition(".")
                if ext.lower() in _IMAGE_EXTS and m.offset_data + m.size <= size:
                    images[key] = (m.offset_data, m.size)
                elif ext == "json":
                    try:
                        urls[key] = json.loads(tar.extractfile(m).read())["url"]
                    except (ValueError, KeyError, TypeError, OSError, tarfile.TarError):
                        continue
        complete = True
    except (tarfile.TarError, OSError, EOFError):
        complete = False
    return [(urls[k], path, *images[k]) for k in sorted(images) if k in urls], complete


def _index_parquet(path: str) -> tuple[list[tuple], bool]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        if "url" not in f.schema_arrow.names or not set(_PARQUET_IMAGE_COLUMNS) & set(f.schema_arrow.names):
            return [], False
        rows = []
        for rg in range(f.metadata.num_row_groups):
            urls = f.read_row_group(rg, columns=["url"]).column("url").to_pylist()
            rows += [(u, path, rg, i) for i, u in enumerate(urls) if u]
        return rows, True
    except Exception:  # pyarrow raises several types on a damaged file
        return [], False


def _index_manifest(path: str) -> tuple[list[tuple], bool]:
    root, rows, complete = os.path.dirname(os.path.abspath(path)), [], True
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            url, sep, rel = line.rstrip("\n").partition("\t")
            if not sep or not url or not rel:
                complete = False  # a malformed line is skipped, the manifest counted as damaged
                continue
            rows.append((url, os.path.join(root, rel), -1, -1))
    return rows, complete


def build_index(files: list[str], index_path: str) -> dict[str, int]:
    """Scans the store files into the SQLite index at `index_path` (written atomically; reused when
    it is newer than every store file). Returns counts: files, corrupt_files, images."""
    if os.path.exists(index_path) and all(os.path.getmtime(index_path) >= os.path.getmtime(f) for f in files):
        with sqlite3.connect(f"file:{index_path}?mode=ro", uri=True) as db:
            return dict(db.execute("SELECT name, value FROM counts").fetchall())
    os.makedirs(os.path.dirname(index_path) or ".", exist_ok=True)
    tmp = f"{index_path}.{os.getpid()}.tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    counts = {"files": 0, "corrupt_files": 0, "images": 0}
    db = sqlite3.connect(tmp)
    db.execute("CREATE TABLE images (url TEXT PRIMARY KEY, file TEXT, a INTEGER, b INTEGER)")
    db.execute("CREATE TABLE counts (name TEXT PRIMARY KEY, value INTEGER)")
    for path in files:
        index = (
            _index_parquet if path.endswith(".parquet") else _index_manifest if path.endswith(".tsv") else _index_tar
        )
        rows, complete = index(path)
        counts["files"] += 1
        counts["corrupt_files"] += not complete
        db.executemany("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)", rows)
    counts["images"] = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    db.executemany("INSERT INTO counts VALUES (?, ?)", counts.items())
    db.commit()
    db.close()
    os.replace(tmp, index_path)
    return counts


class BuildImageIndex(PipelineStep):
    """`build_index` as a one-task datatrove step (so that on SLURM it runs on a compute node)."""

    name = "🗂 image index"
    type = "🖼 - IMAGES"

    def __init__(self, files: list[str], index_path: str):
        super().__init__()
        self.files, self.index_path = files, index_path

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for k, v in build_index(self.files, self.index_path).items():
            self.stat_update(f"store_{k}", value=v)
        yield from ()  # a terminal step: nothing flows on


class ImageStore:
    """Reads image bytes by URL through the index (`build_index`)."""

    def __init__(self, index_path: str):
        self.db = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True)
        self._row_group = (None, None, None)  # (file, row group, table): documents' images are often neighbours

    def get(self, url: str) -> bytes | None:
        hit = self.db.execute("SELECT file, a, b FROM images WHERE url = ?", (url,)).fetchone()
        if hit is None:
            return None
        path, a, b = hit
        if a == -1:  # a manifest's image file
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:
                return None
        if not path.endswith(".parquet"):
            with open(path, "rb") as f:
                f.seek(a)
                return f.read(b)
        import pyarrow.parquet as pq

        if self._row_group[:2] != (path, a):
            self._row_group = (path, a, pq.ParquetFile(path).read_row_group(a))
        table = self._row_group[2]
        column = next(c for c in _PARQUET_IMAGE_COLUMNS if c in table.column_names)
        return table.column(column)[b].as_py()


def check_image(data: bytes, cfg: ImagesConfig) -> tuple[str | None, dict]:
    """(reason it fails or None, {format, width, height}) for encoded image bytes."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = (im.format or "").lower(), im.size
            im.load()  # a truncated file opens (header only) but fails here
    except Exception:
        return "undecodable", {}
    meta = {"format": fmt, "width": w, "height": h}
    if fmt not in cfg.formats:
        return "format", meta
    if min(w, h) < cfg.min_side:
        return "too_small", meta
    if max(w, h) > cfg.max_side:
        return "too_large", meta
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        return "aspect_ratio", meta
    return None, meta


class ResolveImages(PipelineStep):
    """Fills each image position's bytes from the store and removes the images that are missing or
    fail `check_image` (counted as `image_<reason>`)."""

    name = "🖼 images"
    type = "🖼 - IMAGES"

    def __init__(self, index_path: str, cfg: ImagesConfig):
        super().__init__()
        self.index_path, self.cfg = index_path, cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        store = ImageStore(self.index_path)
        for doc in data or ():
            with self.track_time():
                texts, media, images = [], [], iter(doc.media)
                for t in doc.metadata["texts"]:
                    if t is not None:
                        texts.append(t)
                        continue
                    m = next(images)
                    data_ = store.get(m.url)
                    reason, meta = ("missing", {}) if data_ is None else check_image(data_, self.cfg)
                    if reason:
                        self.stat_update(f"image_{reason}")
                        continue
                    self.stat_update("image_kept")
                    m.media_bytes, m.metadata = data_, meta
                    texts.append(None)
                    media.append(m)
                self.stat_update("documents")
            yield set_nodes(doc, texts, media)
