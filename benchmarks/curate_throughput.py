"""Curation throughput on this machine, one process (one datatrove task), printed, never asserted.

    PYTHONPATH=. python benchmarks/curate_throughput.py [--articles 400] [--dedup-sizes 1000,2000,4000]

Measures, on the synthetic crawl of idefics_jax.curate.sample (article pages with
navigation, banners, comments, 3 images and `--page-kib` KiB of site menu):
  * extract: pages/s (WARC read + decode + selectolax DOM simplification);
  * images: documents/s resolving images from an img2dataset tar (index lookup, full decode, checks);
  * filter: documents/s through OBELICS's node- and document-level text filters (no lid/KenLM);
  * dedup: MinHash signatures (documents/s), the partitioned passes (buckets and image sets, all
    `dedup.partitions` tasks run one after another here) and the final merge, for growing corpora;
  * the whole `run` through datatrove's local executor (1 worker), pages/s end to end.
Rates are per task (one core); datatrove runs one task per core and per node, so a cluster's rate
is this times the cores (docs/curation.md has the estimate).
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import tempfile
import time

from datatrove.data import Document


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--articles", type=int, default=400)
    p.add_argument(
        "--page-kib", type=int, default=40, help="site menu added to each article page (real pages: tens of KiB)"
    )
    p.add_argument("--dedup-sizes", default="1000,2000,4000")
    args = p.parse_args()

    from idefics_jax.curate import config, sample
    from idefics_jax.curate.__main__ import main as cli
    from idefics_jax.curate.extract import ExtractWebDocument, WebPageReader
    from idefics_jax.curate.filters import TextFilters
    from idefics_jax.curate.images import ResolveImages, build_index

    cfg = config.CurateConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        crawl, build_s = _timed(
            lambda: sample.build(tmp, articles=args.articles, truncated=False, warc_files=4, page_kib=args.page_kib)
        )
        print(
            f"synthetic crawl: {args.articles} articles (+{args.page_kib} KiB of menu each) + 11 other pages, built in {build_s:.1f}s"
        )
        reader = WebPageReader(crawl["warc"], progress=False)
        pages, read_s = _timed(lambda: list(reader.run()))
        html_mb = sum(len(p.text.encode()) for p in pages) / 2**20  # before extraction replaces .text
        docs, extract_s = _timed(lambda: list(ExtractWebDocument(cfg.extract).run(iter(pages))))
        rows.append(("extract (read WARC + DOM)", len(pages), "pages", read_s + extract_s))
        rows.append((f"extract, HTML ({html_mb:.0f} MiB)", html_mb, "MiB", read_s + extract_s))
        index = os.path.join(tmp, "index.sqlite")
        _, index_s = _timed(lambda: build_index(sorted(glob.glob(crawl["images"])), index))
        rows.append(("image store index", 1, "stores", index_s))
        docs, images_s = _timed(lambda: list(ResolveImages(index, cfg.images).run(iter(docs))))
        rows.append(("images (lookup+decode+checks)", len(docs), "docs", images_s))
        _, filter_s = _timed(lambda: list(TextFilters(cfg.filter, os.path.join(tmp, "removed")).run(iter(docs))))
        rows.append(("filter (OBELICS text filters)", len(docs), "docs", filter_s))
        out = os.path.join(tmp, "out")
        _, run_s = _timed(
            lambda: cli(
                [
                    "run",
                    "--warc",
                    crawl["warc"],
                    "--images",
                    crawl["images"],
                    "--out",
                    out,
                    "--no-progress",
                    "--workers",
                    "1",
                ]
            )
        )
        rows.append(("run, local executor, 1 worker", len(pages), "pages", run_s))

    print(f"\n{'stage':<32} {'items':>7} {'seconds':>8} {'rate':>14}")
    for name, n, unit, s in rows:
        print(f"{name:<32} {n:>7.0f} {s:>8.2f} {n / s:>10.1f} {unit}/s")

    print(
        f"\n{'MinHash dedup, documents':<26} {'signatures/s':>13} {'partitions s':>13} {'merge s':>8} {'docs/s after signatures':>24}"
    )
    rng = random.Random(0)
    for n in (int(x) for x in args.dedup_sizes.split(",")):
        print(f"{n:<26} " + _dedup_rates(n, rng, cfg))


def _dedup_rates(n: int, rng: random.Random, cfg) -> str:
    """MinHash signatures and the decision pass over `n` synthetic documents, 10% near duplicates."""
    from idefics_jax.curate import dedup, sample
    from idefics_jax.curate.docs import image, set_nodes

    texts = [[sample.paragraph(rng) for _ in range(4)] for _ in range(n)]
    for i in range(0, n, 10):  # a near duplicate of the next document: one word added
        texts[i] = [texts[(i + 1) % n][0] + " indeed", *texts[(i + 1) % n][1:]]

    def docs():
        for i, t in enumerate(texts):
            meta = {"url": f"https://s{i % 97}.org/{i}", "shard": f"s{i * 8 // n}"}  # shards are contiguous runs
            yield set_nodes(
                Document(text="", id=str(i), metadata=meta), [t[0], None, *t[1:]], [image(f"https://img.org/{i}.jpg")]
            )

    with tempfile.TemporaryDirectory() as tmp:
        step = dedup.DedupSignatures(tmp, cfg.dedup)
        _, sig_s = _timed(lambda: list(step.run(docs())))

        def partitioned():
            for kind in (dedup.DedupBuckets, dedup.DedupImageSets):
                for p in range(cfg.dedup.partitions):
                    list(kind(tmp, cfg.dedup).run(rank=p, world_size=cfg.dedup.partitions))

        _, part_s = _timed(partitioned)
        (_, _, counts), merge_s = _timed(lambda: dedup.decide(tmp, cfg.dedup))
    rate = n / (part_s + merge_s)
    return (
        f"{n / sig_s:>13.0f} {part_s:>13.2f} {merge_s:>8.2f} {rate:>24.0f}   near_duplicate={counts['near_duplicate']}"
    )


if __name__ == "__main__":
    main()
