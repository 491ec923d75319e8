"""Stage `dedup` (signatures, partitioned decisions, merge) and stage `write` (apply them).

OBELICS's deduplications plus near-duplicate detection by MinHash-LSH, which OBELICS lacks:
  1. exact URL: of the documents with one URL, the most recent crawl (WARC-Date) is kept;
  2. image URLs used by more than `max_image_url_count` documents (those left by step 1) are
     removed from all of them;
  3. identical image set: documents whose (non-empty) set of image URLs, frequent ones left out,
     equals an earlier one's (of those left by step 1);
  4. near duplicates: MinHash (`num_perm` permutations of word `shingle`-grams, datasketch) with
     datasketch's LSH bands at `minhash_threshold`; a document left by steps 1 and 3 is dropped when
     it shares a band with an earlier *kept* document whose estimated Jaccard similarity is at least
     the threshold (datasketch's MinHashLSH query, done in order);
  5. paragraphs repeated within a domain: a paragraph kept once per domain (its first kept document).
"Earlier" and "first" are in the order (shard name, row in shard) — a fixed order of the input,
so the output is the same whatever the number of tasks, workers or partitions.

Bounded memory, the way datatrove's bucketed MinHash is: no task holds the corpus.
  * `DedupSignatures` (parallel over shards) writes each document's keys — URL, image URLs, LSH
    bands, (domain, paragraph hash) — to `buckets/{kind}/{p}/{shard}.parquet`, p = hash(key) mod P
    (`partitions`). Holds one shard's keys.
  * `DedupBuckets` (P tasks) reads partition p of every shard and writes only what duplicates:
    URL losers (with their image URLs), image URLs used more than `max_image_url_count` times (a
    count before step 1: candidates), near-duplicate edges (doc, earlier doc with Jaccard ≥
    threshold and a shared band) and the occurrences of repeated paragraphs. Holds one partition.
  * `DedupImageSets` (P tasks) needs the frequent URLs (steps 1–2, read from every partition's
    candidates and URL losers): each document's image set minus them is grouped in the partition
    of its smallest remaining image URL; it writes the later members of each group. Holds one
    partition's image records, the URL losers and the frequent URLs.
  * `DedupDecide` (one task) merges: steps 1–3 as read, step 4 greedily over the edges in order,
    step 5 over the repeated paragraphs, to `decisions.parquet` (only documents dropped or trimmed)
    and `frequent_image_urls.json`. Holds the duplicates: edges, drops, repeated paragraphs.
  * `ApplyDedup` (parallel: the `write` stage) drops and trims documents as decided, reading one
    shard's decisions at a time; documents left without an image or text are dropped, so that the
    training pipeline skips nothing.
Image sets are compared as sets of 64-bit URL hashes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from urllib.parse import urlsplit

import numpy as np
from datatrove.pipeline.base import PipelineStep

from idefics_jax.curate.config import DedupConfig
from idefics_jax.curate.docs import paragraphs, set_nodes


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


# datasketch's hashing scheme (32-bit values); stored signatures are only valid under it.
SCHEME = "affine32"


@functools.cache
def _permutations(num_perm: int, seed: int):
    # datasketch draws the permutations from (num_perm, seed) on every MinHash; drawn once here.
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations


def minhash(text: str, cfg: DedupConfig):
    """datasketch MinHash of the lower-cased word `cfg.shingle`-grams of `text` (`num_perm` uint32)."""
    from datasketch import MinHash

    ws = text.lower().split()
    shingles = {" ".join(ws[i : i + cfg.shingle]) for i in range(max(len(ws) - cfg.shingle + 1, 1))}
    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME, permutations=_permutations(cfg.num_perm, cfg.seed))
    m.update_batch([s.encode("utf-8") for s in shingles])  # order-free: a min over the set
    return m


def _partition(key: bytes, partitions: int) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % partitions


def _bands(cfg: DedupConfig) -> list[tuple[int, int]]:
    """datasketch's LSH band ranges for (`minhash_threshold`, `num_perm`): [(start, end)] of each band."""
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=cfg.minhash_threshold, num_perm=cfg.num_perm).hashranges


def _schemas(num_perm: int) -> dict:
    import pyarrow as pa

    doc = [("shard", pa.string()), ("row", pa.int64())]
    return {
        "url": pa.schema([("url", pa.string()), ("date", pa.string()), *doc, ("image_urls", pa.list_(pa.string()))]),
        "image": pa.schema([("url", pa.string()), *doc, ("image_set", pa.list_(pa.int64()))]),
        "band": pa.schema(
            [("band", pa.int32()), ("key", pa.binary()), *doc, ("minhash", pa.list_(pa.uint32(), num_perm))]
        ),
        "paragraph": pa.schema([("domain", pa.string()), ("hash", pa.int64()), *doc, ("index", pa.int32())]),
    }


def _write(path: str, table) -> None:
    """`table` to `path` atomically (a task killed midway leaves the old file or none)."""
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, row_group_size=4096)
    os.replace(tmp, path)


def _read(pattern: str, columns=None) -> list[dict]:
    import glob

    import pyarrow.parquet as pq

    return [r for f in sorted(glob.glob(pattern)) for r in pq.read_table(f, columns=columns).to_pylist()]


class DedupSignatures(PipelineStep):
    """Writes each document's dedup keys, partitioned: `{folder}/buckets/{kind}/{p:04d}/{shard}.parquet`
    for kind url, image, band, paragraph and p < `cfg.partitions` (module docstring)."""

    name = "🔑 dedup signatures"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str, cfg: DedupConfig):
        super().__init__()
        self.folder, self.cfg = folder, cfg

    def _flush(self, shard, rows) -> None:
        import pyarrow as pa

        for kind, schema in _schemas(self.cfg.num_perm).items():
            for p, part in enumerate(rows[kind]):
                if part:
                    path = os.path.join(self.folder, "buckets", kind, f"{p:04d}", f"{shard}.parquet")
                    _write(path, pa.Table.from_pylist(part, schema))

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        P = self.cfg.partitions
        bands = _bands(self.cfg)
        shard, row, rows = None, -1, None
        for doc in data or ():
            with self.track_time():
                if doc.metadata["shard"] != shard:  # readers emit a shard's documents contiguously
                    if shard is not None:
                        self._flush(shard, rows)
                    shard, row = doc.metadata["shard"], -1
                    rows = {kind: [[] for _ in range(P)] for kind in ("url", "image", "band", "paragraph")}
                row += 1
                url = doc.metadata.get("url") or ""
                image_urls = [m.url for m in doc.media]
                if url:  # documents without a URL are never URL duplicates
                    rows["url"][_partition(url.encode(), P)].append(
                        {"url": url, "date": doc.metadata.get("date") or "", "shard": shard, "row": row,
                         "image_urls": image_urls}
                    )  # fmt: skip
                image_set = sorted({_hash64(u) for u in image_urls})
                for u in sorted(set(image_urls)):
                    rows["image"][_partition(u.encode(), P)].append(
                        {"url": u, "shard": shard, "row": row, "image_set": image_set}
                    )
                hashvalues = minhash(doc.text, self.cfg).hashvalues
                for b, (start, end) in enumerate(bands):
                    # datasketch's band key: the band's values, big-endian bytes
                    key = bytes(hashvalues[start:end].byteswap().data)
                    rows["band"][_partition(b.to_bytes(4, "little") + key, P)].append(
                        {"band": b, "key": key, "shard": shard, "row": row, "minhash": hashvalues.tolist()}
                    )
                domain = (urlsplit(url).hostname or "").lower()
                for j, (_, p) in enumerate(paragraphs(doc)):
                    h = _hash64(" ".join(p.split()).lower())
                    rows["paragraph"][_partition(f"{domain}\0{h}".encode(), P)].append(
                        {"domain": domain, "hash": h, "shard": shard, "row": row, "index": j}
                    )
                self.stat_update("documents")
        if shard is not None:
            self._flush(shard, rows)
        yield from ()  # a terminal step: nothing flows on


def _doc(r: dict) -> tuple[str, int]:
    return r["shard"], r["row"]


def bucket_decisions(folder: str, p: int, cfg: DedupConfig) -> dict:
    """Partition `p` of every shard's keys → what duplicates in it (module docstring), as
    {"url_losers", "frequent_candidates", "near_edges", "repeated_paragraphs"}: lists of rows."""
    buckets = os.path.join(folder, "buckets")
    part = f"{p:04d}"
    # 1. exact URL: latest date wins, then the earliest in order.
    by_url: dict[str, list] = {}
    for r in _read(os.path.join(buckets, "url", part, "*.parquet")):
        by_url.setdefault(r["url"], []).append(r)
    losers = []
    for group in by_url.values():
        group.sort(key=_doc)
        best = group[0]
        for r in group[1:]:
            if r["date"] > best["date"]:
                best = r
        losers += [
            {"shard": r["shard"], "row": r["row"], "image_urls": r["image_urls"]} for r in group if r is not best
        ]
    del by_url
    # 2. image URL counts (one record per document using it), before step 1: candidates.
    uses: dict[str, int] = {}
    for r in _read(os.path.join(buckets, "image", part, "*.parquet"), columns=["url"]):
        uses[r["url"]] = uses.get(r["url"], 0) + 1
    candidates = [{"url": u, "count": n} for u, n in sorted(uses.items()) if n > cfg.max_image_url_count]
    del uses
    # 4. near duplicates: pairs sharing a band whose estimated Jaccard similarity passes.
    by_band: dict[tuple, list] = {}
    for r in _read(os.path.join(buckets, "band", part, "*.parquet")):
        by_band.setdefault((r["band"], r["key"]), []).append(r)
    edges = set()
    for group in by_band.values():
        group.sort(key=_doc)
        values = np.asarray([r["minhash"] for r in group], np.uint32)
        for i in range(1, len(group)):
            # LeanMinHash.jaccard: the fraction of equal values
            similar = np.count_nonzero(values[:i] == values[i], axis=1) / np.float64(cfg.num_perm)
            edges.update((_doc(group[i]), _doc(group[j])) for j in np.flatnonzero(similar >= cfg.minhash_threshold))
    del by_band
    # 5. paragraphs seen more than once in a domain: all their occurrences, in order.
    by_paragraph: dict[tuple, list] = {}
    for r in _read(os.path.join(buckets, "paragraph", part, "*.parquet")):
        by_paragraph.setdefault((r["domain"], r["hash"]), []).append((r["shard"], r["row"], r["index"]))
    repeated = [sorted(o) for o in by_paragraph.values() if len(o) > 1]
    return {
        "url_losers": sorted(losers, key=_doc),
        "frequent_candidates": candidates,
        "near_edges": [{"shard": a[0], "row": a[1], "kept_shard": b[0], "kept_row": b[1]} for a, b in sorted(edges)],
        "repeated_paragraphs": [
            {"shard": [o[0] for o in g], "row": [o[1] for o in g], "index": [o[2] for o in g]} for g in sorted(repeated)
        ],
    }


def _decision_schemas() -> dict:
    import pyarrow as pa

    doc = [("shard", pa.string()), ("row", pa.int64())]
    return {
        "url_losers": pa.schema([*doc, ("image_urls", pa.list_(pa.string()))]),
        "frequent_candidates": pa.schema([("url", pa.string()), ("count", pa.int64())]),
        "near_edges": pa.schema([*doc, ("kept_shard", pa.string()), ("kept_row", pa.int64())]),
        "repeated_paragraphs": pa.schema(
            [("shard", pa.list_(pa.string())), ("row", pa.list_(pa.int64())), ("index", pa.list_(pa.int32()))]
        ),
        "image_set_dups": pa.schema(doc),
    }


class DedupBuckets(PipelineStep):
    """Task p of `cfg.partitions`: `bucket_decisions` → `{folder}/partitions/{p:04d}/{what}.parquet`."""

    name = "🪣 dedup buckets"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str, cfg: DedupConfig):
        super().__init__()
        self.folder, self.cfg = folder, cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import pyarrow as pa

        schemas = _decision_schemas()
        with self.track_time():
            for what, rows in bucket_decisions(self.folder, rank, self.cfg).items():
                self.stat_update(what, value=len(rows))
                path = os.path.join(self.folder, "partitions", f"{rank:04d}", f"{what}.parquet")
                _write(path, pa.Table.from_pylist(rows, schemas[what]))
        yield from ()  # a terminal step: nothing flows on


def _url_losers(folder: str) -> list[dict]:
    return _read(os.path.join(folder, "partitions", "*", "url_losers.parquet"))


def frequent_image_urls(folder: str, cfg: DedupConfig, losers: list[dict]) -> list[str]:
    """Step 2 from every partition's candidates, less the uses by URL losers (step 1), sorted."""
    counts = {
        r["url"]: r["count"] for r in _read(os.path.join(folder, "partitions", "*", "frequent_candidates.parquet"))
    }
    for r in losers:
        for u in set(r["image_urls"]):
            if u in counts:
                counts[u] -= 1
    return sorted(u for u, n in counts.items() if n > cfg.max_image_url_count)


def image_set_duplicates(folder: str, p: int, cfg: DedupConfig) -> list[tuple[str, int]]:
    """Step 3 in partition `p`: the documents whose image set (frequent URLs left out) equals an
    earlier document's. A set is looked at in the partition of its smallest URL hash only."""
    losers = _url_losers(folder)
    frequent = {_hash64(u) for u in frequent_image_urls(folder, cfg, losers)}
    dropped = {_doc(r) for r in losers}
    del losers
    groups: dict[frozenset, list] = {}
    for r in _read(os.path.join(folder, "buckets", "image", f"{p:04d}", "*.parquet")):
        image_set = frozenset(r["image_set"]) - frequent
        if image_set and _hash64(r["url"]) == min(image_set) and _doc(r) not in dropped:
            groups.setdefault(image_set, []).append(_doc(r))
    return sorted(d for g in groups.values() for d in sorted(g)[1:])


class DedupImageSets(PipelineStep):
    """Task p of `cfg.partitions`: `image_set_duplicates` → `{folder}/partitions/{p:04d}/image_set_dups.parquet`."""

    name = "🖼 dedup image sets"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str, cfg: DedupConfig):
        super().__init__()
        self.folder, self.cfg = folder, cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import pyarrow as pa

        with self.track_time():
            dups = image_set_duplicates(self.folder, rank, self.cfg)
            self.stat_update("image_set_dups", value=len(dups))
            table = pa.table(
                {"shard": [d[0] for d in dups], "row": [d[1] for d in dups]},
                schema=_decision_schemas()["image_set_dups"],
            )
            _write(os.path.join(self.folder, "partitions", f"{rank:04d}", "image_set_dups.parquet"), table)
        yield from ()  # a terminal step: nothing flows on


def decide(folder: str, cfg: DedupConfig) -> tuple[dict, list[str], dict[str, int]]:
    """Every partition's outputs → ({(shard, row): (reason or "", [paragraph index to drop])} for
    the documents dropped or trimmed only, frequent image URLs, counts by reason). Documents are
    keyed by position, not id: crawls repeat record ids across files."""
    parts = os.path.join(folder, "partitions", "*")
    losers = _url_losers(folder)
    frequent = frequent_image_urls(folder, cfg, losers)
    drop = {_doc(r): "dup_url" for r in losers}
    del losers
    for r in _read(os.path.join(parts, "image_set_dups.parquet")):
        drop[_doc(r)] = "dup_image_set"
    # 4. greedily in order: a document is dropped when an edge leads to a kept earlier one
    # (datasketch's LSH holds the kept documents only).
    earlier: dict[tuple, list] = {}
    for r in _read(os.path.join(parts, "near_edges.parquet")):
        earlier.setdefault(_doc(r), []).append((r["kept_shard"], r["kept_row"]))
    for d in sorted(earlier):
        if d not in drop and any(e not in drop for e in earlier[d]):
            drop[d] = "near_duplicate"
    del earlier
    counts = {"dup_url": 0, "dup_image_set": 0, "near_duplicate": 0}
    for reason in drop.values():
        counts[reason] += 1
    decisions: dict[tuple, tuple[str, list]] = {d: (reason, []) for d, reason in drop.items()}
    # 5. a repeated paragraph is kept in its first kept document only.
    removed = 0
    for g in _read(os.path.join(parts, "repeated_paragraphs.parquet")):
        kept = [(s, r, j) for s, r, j in zip(g["shard"], g["row"], g["index"]) if (s, r) not in drop]
        for s, r, j in kept[1:]:
            decisions.setdefault((s, r), ("", []))[1].append(j)
            removed += 1
    for _, d in decisions.values():
        d.sort()
    counts["paragraphs_removed"] = removed
    counts["frequent_image_urls"] = len(frequent)
    return decisions, frequent, counts


class DedupDecide(PipelineStep):
    """The one-task merge: `decide` → `{folder}/decisions.parquet` (sorted by shard, row) and
    `{folder}/frequent_image_urls.json` (both written atomically)."""

    name = "⚖ dedup decisions"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str, cfg: DedupConfig):
        super().__init__()
        self.folder, self.cfg = folder, cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import pyarrow as pa

        decisions, frequent, counts = decide(self.folder, self.cfg)
        for k, v in counts.items():
            self.stat_update(k, value=v)
        keys = sorted(decisions)
        table = pa.table(
            {
                "shard": pa.array([k[0] for k in keys], pa.string()),
                "row": pa.array([k[1] for k in keys], pa.int64()),
                "reason": pa.array([decisions[k][0] for k in keys], pa.string()),
                "drop_paragraphs": pa.array([decisions[k][1] for k in keys], pa.list_(pa.int32())),
            }
        )
        _write(os.path.join(self.folder, "decisions.parquet"), table)
        tmp = os.path.join(self.folder, ".frequent_image_urls.json.tmp")
        with open(tmp, "w") as f:
            json.dump(frequent, f, indent=0)
        os.replace(tmp, os.path.join(self.folder, "frequent_image_urls.json"))
        yield from ()  # a terminal step: nothing flows on


class ApplyDedup(PipelineStep):
    """Drops the documents `DedupDecide` marked, removes their duplicated paragraphs and frequent
    image URLs; documents left with no image or no text are dropped (`no_image_left`,
    `no_text_left`)."""

    name = "✂ apply dedup"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import pyarrow.parquet as pq

        path = os.path.join(self.folder, "decisions.parquet")
        with open(os.path.join(self.folder, "frequent_image_urls.json")) as f:
            frequent = set(json.load(f))
        shard, decisions, row = None, {}, -1
        for doc in data or ():
            if doc.metadata["shard"] != shard:  # only this shard's drops in memory
                shard, row = doc.metadata["shard"], -1
                t = pq.read_table(path, filters=[("shard", "=", shard)]).to_pydict()
                decisions = {r: (why, set(d)) for r, why, d in zip(t["row"], t["reason"], t["drop_paragraphs"])}
            row += 1
            reason, drop = decisions.get(row, ("", ()))  # not in the decisions: kept whole
            if reason:
                self.stat_update(f"removed_{reason}")
                continue
            texts, media, images, j = [], [], iter(doc.media), 0
            for t in doc.metadata["texts"]:
                if t is None:
                    m = next(images)
                    if m.url in frequent:
                        self.stat_update("image_frequent_url")
                    else:
                        texts.append(None)
                        media.append(m)
                    continue
                kept = []
                for p in t.split("\n\n"):
                    if j in drop:
                        self.stat_update("paragraph_duplicate_in_domain")
                    else:
                        kept.append(p)
                    j += 1
                texts.append("\n\n".join(kept))
            set_nodes(doc, texts, media)
            if not doc.media:
                self.stat_update("removed_no_image_left")
                continue
            if not doc.text.strip():
                self.stat_update("removed_no_text_left")
                continue
            self.stat_update("documents_kept")
            yield doc
