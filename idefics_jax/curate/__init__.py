"""Curation: web pages (WARC) → OBELICS-style interleaved documents for data.pipeline.

Stages (each a datatrove pipeline; `python -m idefics_jax.curate`, docs/curation.md):
  extract.py  WARC/HTML → web documents (selectolax DOM simplification, text and images in order)
  images.py   image URLs → bytes from an img2dataset store, image filters
  filters.py  OBELICS's node- and document-level text filters (+ optional fastText lid, KenLM)
  dedup.py    URL / image-set / MinHash near-duplicate / frequent image / paragraph dedup
  docs.py     the document inside datatrove and the parquet layout every stage writes
  config.py   every threshold, OBELICS's values as defaults
  stages.py   executors (local, SLURM, Ray) and the directory layout; report.py the report
  sample.py   a synthetic crawl (pages, WARC, image store) for tests and benchmarks
"""
