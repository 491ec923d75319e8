"""Stage `dedup` (signatures, then decisions) and stage `write` (apply them, write the final parquet).

OBELICS's deduplications plus near-duplicate detection by MinHash-LSH, which OBELICS lacks:
  1. exact URL: of the documents with one URL, the most recent crawl (WARC-Date) is kept;
  2. image URLs used by more than `max_image_url_count` documents (those left by step 1) are
     removed from all of them;
  3. identical image set: documents whose (non-empty) set of image URLs, frequent ones left out,
     equals an earlier one's;
  4. near duplicates: MinHash (`num_perm` permutations of word `shingle`-grams, datasketch) with
     LSH at `minhash_threshold`; a candidate pair counts only when the estimated Jaccard similarity
     is at least the threshold too;
  5. paragraphs repeated within a domain: a paragraph kept once per domain (its first document).
"Earlier" and "first" are in the order (shard name, row in shard) — a fixed order of the input,
so the output is the same whatever the number of tasks or workers.

Three datatrove passes: `DedupSignatures` (parallel over shards: per document its id, url, date,
domain, image URLs, paragraph hashes and MinHash), `DedupDecide` (one task: reads every signature
and writes `decisions.parquet` and `frequent_image_urls.json`), `ApplyDedup` (parallel: drops and
trims documents as decided; documents left without an image or text are dropped, so that the
training pipeline skips nothing). The decision task holds every signature in memory
(≈ 4·num_perm bytes + 8 per paragraph per document, plus Python overhead: order of 1–2 GB per
million documents at 128 permutations); past tens of millions of documents, step 4 needs
datatrove's bucketed MinHash stages instead (docs/curation.md).
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
from idefics_jax.curate.docs import ShardedParquet, paragraphs, set_nodes


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


def _signature_schema(num_perm: int):
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("shard", pa.string()),
            ("row", pa.int64()),
            ("url", pa.string()),
            ("date", pa.string()),
            ("domain", pa.string()),
            ("image_urls", pa.list_(pa.string())),
            ("paragraph_hashes", pa.list_(pa.int64())),
            ("minhash", pa.list_(pa.uint32(), num_perm)),
        ]
    )


class DedupSignatures(PipelineStep):
    """Writes one signature row per document to `{folder}/{shard}.parquet`."""

    name = "🔑 dedup signatures"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str, cfg: DedupConfig):
        super().__init__()
        self.folder, self.cfg = folder, cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        out = ShardedParquet(self.folder, _signature_schema(self.cfg.num_perm), 1024)
        row = {}
        for doc in data or ():
            with self.track_time():
                shard = doc.metadata["shard"]
                row[shard] = row.get(shard, -1) + 1
                url = doc.metadata.get("url") or ""
                out.add(
                    shard,
                    {
                        "id": doc.id,
                        "shard": shard,
                        "row": row[shard],
                        "url": url,
                        "date": doc.metadata.get("date") or "",
                        "domain": (urlsplit(url).hostname or "").lower(),
                        "image_urls": [m.url for m in doc.media],
                        "paragraph_hashes": [_hash64(" ".join(p.split()).lower()) for _, p in paragraphs(doc)],
                        "minhash": minhash(doc.text, self.cfg).hashvalues.tolist(),
                    },
                )
                self.stat_update("documents")
        out.close()
        yield from ()  # a terminal step: nothing flows on


def decide(signature_files: list[str], cfg: DedupConfig) -> tuple[dict, list[str], dict[str, int]]:
    """All signatures → ({(shard, row): (reason or "", [paragraph index to drop])}, frequent image
    URLs, counts by reason). Pure function of the signatures and `cfg` (module docstring).
    Documents are keyed by position, not id: crawls repeat record ids across files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasketch import LeanMinHash, MinHashLSH

    if signature_files:
        table = pa.concat_tables([pq.read_table(f) for f in signature_files])
        rows = sorted(table.to_pylist(), key=lambda r: (r["shard"], r["row"]))
    else:
        rows = []
    counts = {"documents": len(rows), "dup_url": 0, "dup_image_set": 0, "near_duplicate": 0}
    key = lambda r: (r["shard"], r["row"])
    drop: dict[tuple, str] = {}
    # 1. exact URL: latest date wins, then the earliest in order.
    best: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r["url"] and (r["url"] not in best or r["date"] > rows[best[r["url"]]]["date"]):
            best[r["url"]] = i
    for i, r in enumerate(rows):
        if r["url"] and best[r["url"]] != i:
            drop[key(r)] = "dup_url"
    # 2. image URLs used by too many documents (counted once per document).
    uses: dict[str, int] = {}
    for r in rows:
        if key(r) not in drop:
            for u in set(r["image_urls"]):
                uses[u] = uses.get(u, 0) + 1
    frequent = sorted(u for u, n in uses.items() if n > cfg.max_image_url_count)
    frequent_set = set(frequent)
    # 3. identical image sets, frequent URLs (logos) left out.
    seen_sets: set = set()
    for r in rows:
        image_set = frozenset(r["image_urls"]) - frequent_set
        if key(r) in drop or not image_set:
            continue
        if image_set in seen_sets:
            drop[key(r)] = "dup_image_set"
        seen_sets.add(image_set)
    # 4. near duplicates.
    lsh = MinHashLSH(threshold=cfg.minhash_threshold, num_perm=cfg.num_perm)
    kept_hashes: dict[tuple, LeanMinHash] = {}
    for r in rows:
        if key(r) in drop:
            continue
        m = LeanMinHash(seed=cfg.seed, hashvalues=np.asarray(r["minhash"], np.uint32), scheme=SCHEME)
        if any(m.jaccard(kept_hashes[c]) >= cfg.minhash_threshold for c in lsh.query(m)):
            drop[key(r)] = "near_duplicate"
            continue
        lsh.insert(key(r), m)
        kept_hashes[key(r)] = m
    for reason in drop.values():
        counts[reason] += 1
    kept = [r for r in rows if key(r) not in drop]
    # 5. paragraphs repeated within a domain.
    seen_paragraphs: set = set()
    decisions = {key(r): (reason, []) for r in rows if (reason := drop.get(key(r)))}
    for r in kept:
        dup = []
        for j, h in enumerate(r["paragraph_hashes"]):
            if (r["domain"], h) in seen_paragraphs:
                dup.append(j)
            seen_paragraphs.add((r["domain"], h))
        decisions[key(r)] = ("", dup)
    counts["paragraphs_removed"] = sum(len(d) for _, d in decisions.values())
    counts["frequent_image_urls"] = len(frequent)
    return decisions, frequent, counts


class DedupDecide(PipelineStep):
    """The one-task pass: signatures in `sig_folder` → `{out_folder}/decisions.parquet` and
    `{out_folder}/frequent_image_urls.json` (both written atomically)."""

    name = "⚖ dedup decisions"
    type = "🫂 - DEDUP"

    def __init__(self, sig_folder: str, out_folder: str, cfg: DedupConfig):
        super().__init__()
        self.sig_folder, self.out_folder, self.cfg = sig_folder, out_folder, cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import glob

        import pyarrow as pa
        import pyarrow.parquet as pq

        files = sorted(glob.glob(os.path.join(self.sig_folder, "*.parquet")))
        decisions, frequent, counts = decide(files, self.cfg)
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
        os.makedirs(self.out_folder, exist_ok=True)
        tmp = os.path.join(self.out_folder, ".decisions.parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, os.path.join(self.out_folder, "decisions.parquet"))
        tmp = os.path.join(self.out_folder, ".frequent_image_urls.json.tmp")
        with open(tmp, "w") as f:
            json.dump(frequent, f, indent=0)
        os.replace(tmp, os.path.join(self.out_folder, "frequent_image_urls.json"))
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
            if doc.metadata["shard"] != shard:  # only this shard's decisions in memory
                shard, row = doc.metadata["shard"], -1
                t = pq.read_table(path, filters=[("shard", "=", shard)]).to_pydict()
                decisions = {r: (why, set(d)) for r, why, d in zip(t["row"], t["reason"], t["drop_paragraphs"])}
            row += 1
            reason, drop = decisions.get(row, ("no_signature", set()))
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
