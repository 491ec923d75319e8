"""Random-access readers for the three on-disk formats.

A dataset is a sorted list of shards matched by a glob; `Source(paths, kind)` gives random access
to its examples by a global index (shards concatenated), which is what a Grain `MapDataset` needs.

  * OBELICS-layout parquet (documents): list columns `texts` and `images` aligned position by
    position, exactly one non-null per position; an image cell is inline bytes (binary), a path
    relative to the dataset root (string), or an HF-datasets Image struct {bytes, path}; an optional
    `metadata` column is ignored. Image-text pairs as parquet: columns `image` (same cell types) and
    `text`.
  * m4 WebDataset tars: documents as `{id}.{i}.text.txt` / `{id}.{i}.image.{ext}` members (i the
    position in the document), pairs as `{id}.image.{ext}` + `{id}.text.txt`.

Random access without an offline conversion:
  * parquet: the footer gives each row group's row count, so index → (row group, row) is a
    search; one row group (only the needed columns) is read per access and the last few are cached
    per process. Row groups should be small (tens of rows) for this to be cheap; the tiny dataset
    writes 16-row groups.
  * tar: one pass over the member headers (no data read) gives every member's byte offset and
    size; an example is then a few `seek`+`read`s. The index is saved next to the shard as
    `<shard>.idx.npz` (when the directory is writable) so it is built once per shard, not once per
    run or per worker.

Examples come back as `RawExample`: items in document order, text as `str` or undecoded `bytes`
(UTF-8 is checked by the pipeline, which counts failures), images as `ImageRef` (bytes, or an
absolute path the pipeline reads). Nothing here decodes images or tokenizes.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import os
import tarfile
import threading

import numpy as np

KINDS = ("documents", "pairs")


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image not yet read: inline encoded `data`, or a `path` on disk (absolute)."""

    data: bytes | None = None
    path: str | None = None


@dataclasses.dataclass
class RawExample:
    """One document or pair as stored. `items`: for documents, the positions in order, each a
    text (`str`, or `bytes` not yet decoded) or an `ImageRef`; for pairs, `[ImageRef, text]`.
    `shard` and `id` identify it in log lines."""

    shard: str
    id: str
    items: list


class FormatError(Exception):
    """A stored example does not follow its format's layout (the pipeline skips and counts it)."""


def _image_cell(cell, root: str) -> ImageRef | None:
    """A parquet image cell → ImageRef: bytes inline, str path relative to `root`, or an
    HF-datasets {bytes, path} struct."""
    if cell is None:
        return None
    if isinstance(cell, (bytes, bytearray)):
        return ImageRef(data=bytes(cell))
    if isinstance(cell, str):
        return ImageRef(path=os.path.join(root, cell))
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return ImageRef(data=cell["bytes"])
        if cell.get("path"):
            return ImageRef(path=os.path.join(root, cell["path"]))
        return ImageRef(data=b"")
    raise FormatError(f"image cell of type {type(cell).__name__}: expected bytes, str or {{bytes, path}}")


class ParquetShard:
    """Random access to one parquet shard (see module docstring for the columns)."""

    def __init__(self, path: str, kind: str, root: str):
        import pyarrow.parquet as pq

        self.path, self.kind, self.root = path, kind, root
        self.columns = ("texts", "images") if kind == "documents" else ("image", "text")
        f = pq.ParquetFile(path)
        meta, names = f.metadata, set(f.schema_arrow.names)
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise ValueError(
                f"{path}: {kind} parquet needs columns {list(self.columns)}; missing {missing} (has {sorted(names)})"
            )
        counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_file", "_cache", "_lock")}

    def _row_group(self, rg: int) -> dict:
        """Row group `rg` as python lists; the last few are kept (reader threads share them)."""
        import pyarrow.parquet as pq

        if "_lock" not in self.__dict__:
            self.__dict__.setdefault("_lock", threading.Lock())
        with self._lock:
            cache = self.__dict__.setdefault("_cache", collections.OrderedDict())
            if rg in cache:
                cache.move_to_end(rg)
                return cache[rg]
            if "_file" not in self.__dict__:
                self._file = pq.ParquetFile(self.path)
            rows = cache[rg] = self._file.read_row_group(rg, columns=list(self.columns)).to_pydict()
            if len(cache) > 4:
                cache.popitem(last=False)
            return rows

    def __getitem__(self, i: int) -> RawExample:
        rg = int(np.searchsorted(self.starts, i, side="right")) - 1
        rows = self._row_group(rg)
        j = i - int(self.starts[rg])
        ex_id = f"row{i}"
        if self.kind == "pairs":
            return RawExample(self.path, ex_id, [_image_cell(rows["image"][j], self.root), rows["text"][j]])
        texts, images = rows["texts"][j], rows["images"][j]
        if texts is None or images is None or len(texts) != len(images):
            raise FormatError(f"texts/images must be equal-length lists, got {texts!r:.60} / {images!r:.60}")
        items = []
        for pos, (t, im) in enumerate(zip(texts, images)):
            if (t is None) == (im is None):
                raise FormatError(f"position {pos} has {'both' if t is not None else 'neither'} text and image")
            items.append(t if t is not None else _image_cell(im, self.root))
        return RawExample(self.path, ex_id, items)


def _tar_index(path: str) -> dict[str, np.ndarray]:
    """Scans a tar's member headers once → arrays: `keys` (example ids, in first-appearance order),
    `starts` [n+1] into the member arrays, and per member `pos` (position in the document, -1 for
    pairs), `image` (bool), `offset`, `size` (bytes in the tar). Cached as `<path>.idx.npz`."""
    cache = path + ".idx.npz"
    if os.path.exists(cache) and os.path.getmtime(cache) >= os.path.getmtime(path):
        with np.load(cache) as z:
            return dict(z)
    members: dict[str, list] = {}
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            parts = os.path.basename(m.name).split(".")
            key = os.path.join(os.path.dirname(m.name), parts[0])
            # {id}.{i}.text.txt / {id}.{i}.image.jpeg (documents) or {id}.text.txt / {id}.image.jpeg (pairs)
            pos = int(parts[1]) if len(parts) >= 4 and parts[1].isdigit() else -1
            field = parts[-2] if len(parts) >= 3 else ""
            if field not in ("text", "image"):
                continue  # other members (json metadata, …) are not used
            members.setdefault(key, []).append((pos, field == "image", m.offset_data, m.size))
    keys = list(members)
    rows = [sorted(members[k]) for k in keys]
    flat = [r for rs in rows for r in rs]
    index = {
        "keys": np.array(keys, dtype=str),
        "starts": np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64),
        "pos": np.array([r[0] for r in flat], np.int32),
        "image": np.array([r[1] for r in flat], bool),
        "offset": np.array([r[2] for r in flat], np.int64),
        "size": np.array([r[3] for r in flat], np.int64),
    }
    try:
        tmp = f"{cache}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **index)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only dataset directory: the index is rebuilt by each process
    return index


class TarShard:
    """Random access to one m4 WebDataset tar shard through its member index."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = path, kind
        self._n = len(self._index()["keys"])

    def __len__(self) -> int:
        return self._n

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_idx", "_fd", "_pid")}

    def _index(self) -> dict[str, np.ndarray]:
        if "_idx" not in self.__dict__:
            self._idx = _tar_index(self.path)
        return self._idx

    def _read(self, offset: int, size: int) -> bytes:
        # pread: no shared file position, so reader threads need no lock; one descriptor per
        # process (pid check) so that a forked worker does not use its parent's.
        if self.__dict__.get("_pid") != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return os.pread(self._fd, size, offset)

    def __getitem__(self, i: int) -> RawExample:
        idx = self._index()
        key = str(idx["keys"][i])
        lo, hi = int(idx["starts"][i]), int(idx["starts"][i + 1])
        items = []
        for m in range(lo, hi):
            data = self._read(int(idx["offset"][m]), int(idx["size"][m]))
            items.append(ImageRef(data=data) if idx["image"][m] else data)
        if self.kind == "pairs":
            imgs = [x for x in items if isinstance(x, ImageRef)]
            texts = [x for x in items if not isinstance(x, ImageRef)]
            if len(imgs) != 1 or len(texts) != 1:
                raise FormatError(f"pair needs one image and one text member, has {len(imgs)} and {len(texts)}")
            items = [imgs[0], texts[0]]
        return RawExample(self.path, key, items)


class Source:
    """All shards of one dataset, concatenated.

    Args:
      paths: a glob, or a comma-separated list of globs, of `.parquet` and/or `.tar` shards.
      kind: "documents" or "pairs".
      root: directory that relative image paths in parquet are resolved against (default: the
        directory of each shard).
    """

    def __init__(self, paths: str, kind: str, root: str = ""):
        if kind not in KINDS:
            raise ValueError(f"dataset kind {kind!r}: expected one of {KINDS}")
        files = sorted({f for p in paths.split(",") if p.strip() for f in glob.glob(os.path.expanduser(p.strip()))})
        files = [f for f in files if not f.endswith(".idx.npz")]
        if not files:
            raise FileNotFoundError(f"no shard matches {paths!r}")
        self.shards = []
        for f in files:
            if f.endswith(".parquet"):
                self.shards.append(ParquetShard(f, kind, root or os.path.dirname(f)))
            elif f.endswith(".tar"):
                self.shards.append(TarShard(f, kind))
            else:
                raise ValueError(f"{f}: unknown shard format (expected .parquet or .tar)")
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])]).astype(np.int64).tolist()
        if self.offsets[-1] == 0:
            raise ValueError(f"{paths!r}: the shards hold no examples")

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> RawExample:
        s = bisect.bisect_right(self.offsets, i) - 1
        return self.shards[s][i - self.offsets[s]]
