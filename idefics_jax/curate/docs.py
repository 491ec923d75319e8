"""The interleaved web document inside datatrove, and the one parquet layout every stage reads and writes.

Inside a pipeline a web document is a datatrove `Document`:
  * `metadata["texts"]`: list of `str | None`, one per position in page order; `None` marks an
    image position. Consecutive paragraphs of one text position are joined by a blank line
    ("\\n\\n"), and two text positions are never adjacent (OBELICS's layout).
  * `media`: one `Media` per image position, in order (`url`, `alt`, `media_bytes` once resolved).
  * `text`: all paragraphs joined by "\\n\\n" — what document-level filters and MinHash see.
  * `metadata["shard"]`: the output shard (the input file's stem); `url`, `date` of the page.

On disk (every stage's output, `DIR/<stage>/<shard>.parquet`) one row per document:
  id: string · texts: list<string> · images: list<binary> · image_urls: list<string> ·
  metadata: string (JSON: url, date, alts, …).
`texts[i]` and `image_urls[i]` are non-null exactly where the other is null; `images[i]` holds the
image bytes once the `images` stage has run. That is data.formats' OBELICS layout (`texts` /
`images` with inline bytes, `metadata` ignored), so the final shards are read by data.pipeline as
they are.
"""

from __future__ import annotations

import abc
import glob
import json
import os

from datatrove.data import Document, Media, MediaType
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

# Metadata keys that are columns of their own (texts) or only meaningful inside a run (shard).
_NOT_SAVED = ("texts", "shard")


def set_nodes(doc: Document, texts: list, media: list) -> Document:
    """Sets the document's positions: `texts` (str or None per position) and `media` (one per None).
    Adjacent text positions are merged with a blank line and empty texts dropped, so removing an
    image or a paragraph keeps the layout valid."""
    out_texts, out_media, images = [], [], iter(media)
    for t in texts:
        if t is None:
            out_texts.append(None)
            out_media.append(next(images))
        elif t.strip():
            if out_texts and out_texts[-1] is not None:
                out_texts[-1] = out_texts[-1] + "\n\n" + t
            else:
                out_texts.append(t)
    doc.metadata["texts"] = out_texts
    doc.media = out_media
    doc.text = "\n\n".join(t for t in out_texts if t is not None)
    return doc


def paragraphs(doc: Document) -> list[tuple[int, str]]:
    """(text position, paragraph) for every paragraph, in order."""
    return [(i, p) for i, t in enumerate(doc.metadata["texts"]) if t is not None for p in t.split("\n\n")]


def image(url: str, alt: str = "", data: bytes | None = None, meta: dict | None = None) -> Media:
    return Media(id=url, type=MediaType.IMAGE, url=url, alt=alt, media_bytes=data, metadata=meta or {})


def shard_name(path: str) -> str:
    """Output shard name of an input file: its base name without (compression) extensions."""
    name = os.path.basename(path)
    for ext in (".gz", ".zst", ".warc", ".arc", ".parquet", ".html", ".htm"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name


def matching(pattern: str) -> list[str]:
    """Sorted files matching a glob (or comma-separated globs); sorted so that every task, whatever
    the number of tasks, sees the same list."""
    files = {f for p in pattern.split(",") if p.strip() for f in glob.glob(os.path.expanduser(p.strip()))}
    return sorted(f for f in files if os.path.isfile(f))


def list_files(pattern: str, what: str) -> list[str]:
    """`matching(pattern)`, which must not be empty (a UserError naming `what`)."""
    from idefics_jax.errors import UserError

    if not (files := matching(pattern)):
        raise UserError(f"{what} {pattern!r}: no file matches")
    return files


class FilesReader(PipelineStep):
    """Base of our readers: task `rank` of `world_size` reads files[rank::world_size] of the files
    matching `pattern` (listed when the task starts, so a stage can be set up before the stage
    that writes its input has run), with a progress bar over its files. Subclasses implement
    `read_file`."""

    type = "📖 - READER"

    def __init__(self, pattern: str, progress: bool = True):
        super().__init__()
        self.pattern = pattern
        self.progress = progress

    @abc.abstractmethod
    def read_file(self, path: str):
        """Yields the datatrove Documents of one input file."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        shard = matching(self.pattern)[rank::world_size]
        for path in tqdm(shard, desc=f"{self.name} task {rank}", unit="file", disable=not self.progress):
            self.stat_update("input_files")
            yield from self.read_file(path)


class DocReader(FilesReader):
    """Reads the web documents a previous stage wrote (module docstring layout)."""

    name = "📄 web documents"

    def read_file(self, path: str):
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path)
        shard = shard_name(path)
        for rg in range(f.metadata.num_row_groups):
            rows = f.read_row_group(rg).to_pylist()
            for row in rows:
                meta = json.loads(row["metadata"])
                alts = meta.pop("alts", [])
                urls = [u for u in row["image_urls"] if u is not None]
                datas = [d for u, d in zip(row["image_urls"], row["images"]) if u is not None]
                media = [image(u, a, d) for u, a, d in zip(urls, alts, datas)]
                doc = Document(text="", id=row["id"], metadata={**meta, "shard": shard})
                self.stat_update("documents")
                yield set_nodes(doc, row["texts"], media)


class ShardedParquet:
    """Rows written to `{folder}/{shard}.parquet`, one shard at a time: a shard's file appears
    (atomic rename) only when it is complete, so a task killed midway leaves no partial output and
    its rerun rewrites the same file."""

    def __init__(self, folder: str, schema, row_group_size: int):
        self.folder, self.schema, self.row_group_size = folder, schema, row_group_size
        self.shard, self.rows = None, []
        self._writer = None
        self._done: set[str] = set()

    def add(self, shard: str, row: dict) -> None:
        if shard != self.shard:
            self.close()
            if shard in self._done:  # readers emit a shard's documents contiguously; reopening would truncate it
                raise RuntimeError(f"shard {shard!r} came back after it was closed")
            self.shard = shard
        self.rows.append(row)
        if len(self.rows) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            os.makedirs(self.folder, exist_ok=True)
            self._tmp = os.path.join(self.folder, f".{self.shard}.parquet.{os.getpid()}.tmp")
            self._writer = pq.ParquetWriter(self._tmp, self.schema)
        if self.rows:
            self._writer.write_table(pa.Table.from_pylist(self.rows, self.schema), row_group_size=self.row_group_size)
        self.rows = []

    def close(self) -> None:
        if self.shard is None:
            return
        self._flush()
        self._writer.close()
        os.replace(self._tmp, os.path.join(self.folder, f"{self.shard}.parquet"))
        self._done.add(self.shard)
        self._writer, self.shard = None, None


def doc_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("texts", pa.list_(pa.string())),
            ("images", pa.list_(pa.binary())),
            ("image_urls", pa.list_(pa.string())),
            ("metadata", pa.string()),
        ]
    )


def to_row(doc: Document) -> dict:
    texts = doc.metadata["texts"]
    media = iter(doc.media)
    images, urls, alts = [], [], []
    for t in texts:
        if t is None:
            m = next(media)
            images.append(m.media_bytes)
            urls.append(m.url)
            alts.append(m.alt or "")
        else:
            images.append(None)
            urls.append(None)
    meta = {k: v for k, v in doc.metadata.items() if k not in _NOT_SAVED}
    meta["alts"] = alts
    return {
        "id": doc.id,
        "texts": texts,
        "images": images,
        "image_urls": urls,
        "metadata": json.dumps(meta, sort_keys=True),
    }


class DocWriter(PipelineStep):
    """Writes web documents to `{folder}/{shard}.parquet` (module docstring layout). Row groups of
    `row_group_size` documents: data.formats reads one row group per random access."""

    name = "💾 web documents"
    type = "💽 - WRITER"

    def __init__(self, folder: str, row_group_size: int = 16):
        super().__init__()
        self.folder, self.row_group_size = folder, row_group_size

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        out = ShardedParquet(self.folder, doc_schema(), self.row_group_size)
        for doc in data or ():
            out.add(doc.metadata["shard"], to_row(doc))
            self.stat_update("documents_written")
            self.stat_update("images_written", value=len(doc.media))
            yield doc
        out.close()


def image_urls(out: str):
    """The image URLs of DIR/extracted, shard by shard (unique within a shard, so memory stays that
    of one shard): the list to give img2dataset to build the image store."""
    import pyarrow.parquet as pq

    from idefics_jax.errors import UserError

    files = matching(os.path.join(out, "extracted", "*.parquet"))
    if not files:
        raise UserError(f"{out}/extracted: no shard; run the extract stage first")
    for path in files:
        urls = pq.read_table(path, columns=["image_urls"]).column("image_urls").to_pylist()
        yield from sorted({u for row in urls for u in row if u})
