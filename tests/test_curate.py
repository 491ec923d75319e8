"""Curation (idefics_jax.curate) on a synthetic crawl packed in WARC files: extraction content,
filter thresholds at their boundaries, dedup, bad inputs, resumability, workers, and the output
read (and trained on) by data.pipeline."""

from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import ml_collections
import pyarrow.parquet as pq
import pytest
from data_conftest_helpers import tiny_dir  # noqa: F401  (fixture)
from testlib import ROOT

from idefics_jax.curate import config as curate_config
from idefics_jax.curate import filters, report, sample
from idefics_jax.curate.__main__ import main

# Small enough that the six article pages' shared logo counts as a frequent image URL.
OVERRIDES = {"dedup": {"max_image_url_count": 3}}


def _cli(out, crawl, *extra):
    return [
        "run", "--warc", crawl["warc"], "--images", crawl["images"], "--out", str(out),
        "--config", crawl["config"], "--no-progress", *extra,
    ]  # fmt: skip


def _docs(out) -> dict[str, list[dict]]:
    """url → rows (texts, images, metadata) of DIR/documents."""
    docs: dict[str, list[dict]] = {}
    for f in sorted(glob.glob(os.path.join(out, "documents", "*.parquet"))):
        for r in pq.read_table(f).to_pylist():
            r["metadata"] = json.loads(r["metadata"])
            docs.setdefault(r["metadata"]["url"], []).append(r)
    return docs


def _output_bytes(out) -> dict[str, bytes]:
    return {
        os.path.basename(f): open(f, "rb").read()
        for f in sorted(glob.glob(os.path.join(out, "documents", "*.parquet")))
    }


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp("crawl")
    paths = sample.build(str(root))
    paths["config"] = str(root / "config.json")
    with open(paths["config"], "w") as f:
        json.dump(OVERRIDES, f)
    return paths


@pytest.fixture(scope="module")
def curated(crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "out"
    main(_cli(out, crawl, "--workers", "1"))
    return str(out)


def test_extraction_keeps_article_text_and_images_in_order_and_drops_boilerplate(crawl, curated):
    facts = crawl["facts"]
    extracted = {}
    for f in glob.glob(os.path.join(curated, "extracted", "*.parquet")):
        for r in pq.read_table(f).to_pylist():
            extracted.setdefault(json.loads(r["metadata"])["url"], []).append(r)
    url = next(iter(facts["articles"]))
    art = facts["articles"][url]
    (doc,) = extracted[url]
    # page order: the title, the logo (first in the first <p>), its text, the figure and its caption …
    seq = [("img", u) if u is not None else ("txt", t) for t, u in zip(doc["texts"], doc["image_urls"])]
    assert seq[0] == ("txt", "Article 0")
    assert seq[1] == ("img", art["logo"])
    assert seq[2] == ("txt", art["paragraphs"][0])
    assert seq[3] == ("img", art["images"][0])
    assert seq[4] == ("txt", art["caption"] + "\n\n" + art["paragraphs"][1])
    assert seq[5] == ("img", art["images"][1])  # lazy-loaded (data-src)
    assert seq[6] == ("txt", art["paragraphs"][2] + "\n\n" + facts["author"])
    assert len(seq) == 7
    everything = " ".join(t for rows in extracted.values() for r in rows for t in r["texts"] if t)
    for boilerplate in (*sample.FURNITURE_TEXTS, "tracking", "color: red", "do not extract"):
        assert boilerplate not in everything, boilerplate
    assert not any("ads/banner" in (u or "") for rows in extracted.values() for r in rows for u in r["image_urls"])
    (cafe,) = extracted[facts["cp1252"]]
    assert facts["cp1252_text"] in cafe["texts"][0]  # decoded as cp1252, not mojibake
    (bad,) = extracted[facts["malformed"]]
    assert facts["malformed_text"] in bad["texts"][0] and sum(u is not None for u in bad["image_urls"]) == 1
    assert "https://news.example.com/empty.html" not in extracted  # boilerplate only
    assert facts["truncated_survivor"] in extracted  # the records before the cut are read


def test_run_keeps_exactly_the_expected_documents(crawl, curated):
    facts = crawl["facts"]
    docs = _docs(curated)
    articles = list(facts["articles"])
    expected = set(articles) | {facts["broken"], facts["cp1252"], facts["malformed"], facts["truncated_survivor"]}
    assert set(docs) == expected
    # dedup: the recrawl (later date) of article 1 is the one kept
    (a1,) = docs[articles[1]]
    assert any(facts["recrawl_marker"] in (t or "") for t in a1["texts"])
    # the logo (in 6 documents > 3) is gone everywhere; the author paragraph is kept once per domain
    assert not any(facts["articles"][articles[0]]["logo"] == u for rows in docs.values() for u in rows[0]["image_urls"])
    with_author = [u for u, rows in docs.items() if any(facts["author"] in (t or "") for t in rows[0]["texts"])]
    assert with_author == [articles[0]]
    # broken images: only the good one is left
    (broken,) = docs[facts["broken"]]
    assert [u for u in broken["image_urls"] if u] == ["https://cdn.example.com/broken/good.jpg"]
    for rows in docs.values():  # every image position holds bytes, every text position text
        for t, im in zip(rows[0]["texts"], rows[0]["images"]):
            assert (t is None) != (im is None)


def test_report_counts_each_removal_and_bad_input(curated):
    s = report.load(curated)
    want = {
        ("extract", "not_html"): 1, ("extract", "truncated_files"): 1, ("extract", "empty"): 1,
        ("image_index", "store_corrupt_files"): 1,
        ("images", "image_missing"): 1, ("images", "image_undecodable"): 1, ("images", "image_too_small"): 1,
        ("images", "image_aspect_ratio"): 1,
        ("filter", "doc_images_max"): 1,
        ("dedup_decide", "dup_url"): 1, ("dedup_decide", "near_duplicate"): 1, ("dedup_decide", "dup_image_set"): 1,
        ("dedup_decide", "frequent_image_urls"): 1, ("write", "paragraph_duplicate_in_domain"): 4,
    }  # fmt: skip
    got = {k: report._count(s, *k) for k in want}
    assert got == want
    text = report.main(curated)
    assert "node_stopwords" in text and "language id (filter.lid_model)" in text  # French paragraphs; lid off
    assert os.path.getsize(os.path.join(curated, "report.png")) > 1000


def test_pipeline_batches_the_curated_documents_without_skips(curated, tiny_dir):
    from idefics_jax.data import pipeline
    from idefics_jax.data.tiny import config as tiny_config

    cfg = tiny_config(tiny_dir["root"])
    cfg.datasets = ml_collections.ConfigDict(
        {"curated": {"kind": "documents", "paths": os.path.join(curated, "documents", "*.parquet"), "weight": 1.0}}
    )
    cfg.min_image_side = 8
    p = pipeline(cfg)
    b = next(p)
    assert b["pixel_values"].shape[0] == cfg.global_batch_size
    c = p.counters()["curated"]
    assert c["examples"] > 0 and c["skipped"] == 0, c


@pytest.mark.slow
def test_tiny_model_trains_on_curated_documents(curated, tmp_path):
    from testlib import load_config, records

    from idefics_jax.train.loop import train

    c = load_config("tiny")
    c.eval_data = None
    c.train.eval_every = 0
    c.train.steps, c.train.checkpoint_every, c.train.log_every = 3, 1000, 1
    c.data.datasets = ml_collections.ConfigDict(
        {"curated": {"kind": "documents", "paths": os.path.join(curated, "documents", "*.parquet"), "weight": 1.0}}
    )
    summary = train(c, str(tmp_path))
    assert summary["final_step"] == 3 and math.isfinite(summary["last_loss"])
    last = [r for r in records(os.path.join(tmp_path, "metrics.jsonl")) if "data/curated/examples" in r][-1]
    assert last["data/curated/examples"] > 0 and last["data/curated/skipped"] == 0, last


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "idefics_jax.curate", *args], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True, **kw,
    )  # fmt: skip


def test_killed_then_resumed_run_with_two_workers_gives_the_same_bytes_as_one_worker(crawl, curated, tmp_path):
    reference = _output_bytes(curated)  # one worker, uninterrupted
    assert reference
    out = tmp_path / "killed"
    proc = _run(_cli(out, crawl, "--workers", "2"))
    deadline = time.time() + 120
    while not os.path.exists(out / "logs" / "filter") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # -9 mid-stage: filter has started
    proc.wait()
    assert not os.path.exists(out / "documents")
    done_before = sorted(os.listdir(out / "logs" / "extract" / "completions"))
    proc = _run(_cli(out, crawl, "--workers", "2"))
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    assert _output_bytes(out) == reference
    assert sorted(os.listdir(out / "logs" / "extract" / "completions")) == done_before  # extract not redone


def test_config_errors_name_the_field(tmp_path, capsys):
    for bad, field in (
        ({"filter": {"stopword_doc_min": 2}}, "filter.stopword_doc_min"),
        ({"filter": {"stopwords": 0.1}}, "filter.stopwords"),
        ({"dedup": {"max_image_url_count": "ten"}}, "dedup.max_image_url_count"),
        ({"filtr": {}}, "'filtr'"),
        ({"filter": {"lid_model": "/no/such/lid.176.bin"}}, "filter.lid_model"),
    ):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit) as e:
            main(["filter", "--out", str(tmp_path / "out"), "--config", str(path)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and field in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):
        main(["run", "--warc", str(tmp_path / "none*.warc"), "--images", "x", "--out", str(tmp_path / "o")])
    assert "no file matches" in capsys.readouterr().err
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(SystemExit):
            main(["extract", "--html", str(tmp_path / "bad.json"), "--out", str(tmp_path / "r"), "--executor", "ray"])
        assert "--executor ray needs ray" in capsys.readouterr().err


def test_rerun_with_other_tasks_or_config_is_refused(crawl, curated, capsys):
    for extra, words in ((["--tasks", "7"], "other tasks of filter (was 3, now 7)"), ([], "another config")):
        config = ["--config", crawl["config"]] if extra else []
        with pytest.raises(SystemExit):
            main(["filter", "--out", curated, "--no-progress", *config, *extra])
        assert words in capsys.readouterr().err


def _check(name: str, level: str = "node", **overrides):
    cfg = curate_config.load(overrides={"filter": overrides})
    fails = dict(filters.checks(cfg.filter, level, filters.Models(cfg.filter), {"flagged": filters.FLAGGED_EN}))
    return lambda text: fails[name](text, filters.words(text))


TEXT = "The cat sat on the mat, and the cat ate 12 fish! Then the cat slept the whole day on the mat."


@pytest.mark.parametrize(
    "name, measure, field, kind",
    [
        ("char_repetition", lambda t: filters.char_repetition(t, 10), "char_rep_node_max", "max"),
        ("word_repetition", lambda t: filters.word_repetition(filters.words(t), 2), "word_rep_node_max", "max"),
        ("special_characters", filters.special_ratio, "special_char_node_max", "max"),
        ("stopwords", lambda t: filters.share(filters.words(t), filters.STOPWORDS_EN), "stopword_node_min", "min"),
        ("flagged_words", lambda t: filters.share(filters.words(t), filters.FLAGGED_EN), "flagged_node_max", "max"),
        ("punctuation", lambda t: filters.punctuation_ratio(t, filters.words(t)), "punctuation_node_min", "min"),
        ("words_min", lambda t: len(filters.words(t)), "words_node_min", "min"),
        ("words_max", lambda t: len(filters.words(t)), "words_node_max", "max"),
    ],
)
def test_each_filter_removes_exactly_past_its_threshold(name, measure, field, kind):
    text = TEXT + (" xxx" if name == "flagged_words" else "")
    value = measure(text)
    assert value > 0
    overrides = {"word_rep_len_node": 2} if name == "word_repetition" else {}
    at = _check(name, **overrides, **{field: value})
    assert not at(text)  # exactly at the threshold: kept
    step = 1 if isinstance(value, int) else 1e-9
    past = _check(name, **overrides, **{field: value - step if kind == "max" else value + step})
    assert past(text)


def test_measures_have_obelics_values():
    assert filters.words("Hello, world! (1999) ... it's") == ["hello", "world", "it's"]  # digits are special
    assert filters.words("“Quoted” 😀ok😀 «non»") == ["quoted", "ok", "non"]  # non-ASCII specials too
    assert filters.special_ratio("a😀 «b»") == 3 / 5
    assert filters.share(filters.words("the cat and the dog"), filters.STOPWORDS_EN) == 3 / 5
    assert filters.special_ratio("ab!1") == 0.5
    assert filters.word_repetition(["a", "b", "a", "b", "c"], 2) == 2 / 4  # "a b" twice of 4 bigrams
    assert filters.punctuation_ratio("A b. C d!", filters.words("A b. C d!")) == 2 / 4
    assert filters.char_repetition("abcabcabc", 3) == 3 / 7  # top ⌊√3⌋=1 n-gram "abc" (×3) of 7


@pytest.mark.parametrize("n_images, kept", [(0, False), (1, True), (30, True), (31, False)])
def test_images_per_document_bounds(n_images, kept, tmp_path):
    from datatrove.data import Document

    from idefics_jax.curate.docs import image, set_nodes

    para = sample.paragraph(random.Random(0))
    doc = set_nodes(Document(text="", id="d", metadata={"url": "https://x.org/"}), [para] + [None] * n_images,
                    [image(f"https://x.org/{k}.jpg") for k in range(n_images)])  # fmt: skip
    step = filters.TextFilters(curate_config.FilterConfig(), str(tmp_path))
    assert bool(list(step.run([doc]))) == kept


def test_language_id_with_a_tiny_fasttext_model(tmp_path):
    import fasttext

    rng = random.Random(0)
    lines = [f"__label__en {sample.sentence(rng)}" for _ in range(200)]
    lines += [f"__label__fr {sample.sentence(rng, sample._FRENCH)}" for _ in range(200)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    model = fasttext.train_supervised(str(tmp_path / "train.txt"), epoch=25, lr=1.0, dim=8, minn=2, maxn=3, verbose=0)
    model.save_model(str(tmp_path / "lid.bin"))
    fails = _check("language", level="doc", lid_model=str(tmp_path / "lid.bin"))
    assert fails(sample.paragraph(rng, sample._FRENCH))
    assert not fails(sample.paragraph(rng))


def test_image_store_formats_parquet_and_manifest_and_damage(tmp_path):
    import pyarrow as pa

    from idefics_jax.curate.images import ImageStore, build_index

    rng = random.Random(0)
    a, b, c = (sample.jpeg(rng) for _ in range(3))
    pq.write_table(
        pa.table({"url": ["https://x.org/a.jpg", "https://x.org/b.jpg"], "jpg": [a, b]}), tmp_path / "s.parquet"
    )
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "c.jpg").write_bytes(c)
    (tmp_path / "m.tsv").write_text("https://x.org/c.jpg\timg/c.jpg\nnot a manifest line\n")
    (tmp_path / "z.parquet").write_bytes(b"PAR1 broken")
    files = [str(tmp_path / n) for n in ("m.tsv", "s.parquet", "z.parquet")]
    counts = build_index(files, str(tmp_path / "index.sqlite"))
    assert counts == {"files": 3, "corrupt_files": 2, "images": 3}
    store = ImageStore(str(tmp_path / "index.sqlite"))
    assert [store.get(f"https://x.org/{n}.jpg") for n in "abc"] == [a, b, c]
    assert store.get("https://x.org/missing.jpg") is None


def test_default_config_round_trips_and_html_input(tmp_path, capsys):
    main(["config"])
    (tmp_path / "c.json").write_text(capsys.readouterr().out)
    assert curate_config.load(str(tmp_path / "c.json")) == curate_config.CurateConfig()
    page = tmp_path / "pages" / "one.html"
    page.parent.mkdir()
    text = sample.paragraph(random.Random(1))
    page.write_bytes(sample._page("T", f"<p>{text}</p>").encode())  # a 1-character title is dropped
    main(["extract", "--html", str(tmp_path / "pages" / "*.html"), "--out", str(tmp_path / "o"), "--no-progress"])
    (row,) = pq.read_table(tmp_path / "o" / "extracted" / "one.parquet").to_pylist()
    assert row["texts"] == [text]


def test_urls_lists_the_extracted_image_urls_for_img2dataset(crawl, curated, capsys):
    main(["urls", "--out", curated])
    urls = capsys.readouterr().out.split()
    article = next(iter(crawl["facts"]["articles"].values()))
    assert set(article["images"]) <= set(urls) and "https://cdn.example.com/broken/missing.jpg" in urls


def test_slurm_executors_chain_the_stages(crawl, tmp_path):
    from idefics_jax.curate import stages

    ex = stages.Execution(
        executor="slurm", slurm_partition="cpu", workers=100, slurm_env_command="source venv/bin/activate"
    )
    built = stages.build(
        list(stages.STAGES), str(tmp_path), curate_config.CurateConfig(), ex, crawl["warc"], crawl["images"]
    )
    names = [n for n, _ in built]
    assert names == [
        "extract", "image_index", "images", "filter", "dedup_signatures", "dedup_buckets", "dedup_image_sets",
        "dedup_decide", "write",
    ]  # fmt: skip
    partitions = curate_config.DedupConfig().partitions
    for (_, before), (name, e) in itertools.pairwise(built):
        tasks = {"image_index": 1, "dedup_decide": 1, "dedup_buckets": partitions, "dedup_image_sets": partitions}
        assert e.depends is before and e.tasks == tasks.get(name, 3)
    script = built[-1][1].get_launch_file_contents(built[-1][1].get_sbatch_args(), "srun true")
    assert "--partition=cpu" in script and "--job-name=curate-write" in script and "source venv/bin/activate" in script


def test_url_blocklist(tmp_path):
    from datatrove.data import Document

    from idefics_jax.curate.docs import image, set_nodes

    (tmp_path / "block.txt").write_text("bad.example\n")
    cfg = curate_config.load(overrides={"filter": {"url_blocklist_path": str(tmp_path / "block.txt")}}).filter
    para = sample.paragraph(random.Random(0))
    docs = [
        set_nodes(Document(text="", id=u, metadata={"url": u}), [para, None], [image(u + "i.jpg")])
        for u in ("https://www.bad.example/", "https://bad.example/", "https://notbad.example/")
    ]
    kept = [d.id for d in filters.TextFilters(cfg, str(tmp_path)).run(docs)]
    assert kept == ["https://notbad.example/"]


@pytest.mark.parametrize("partitions", [1, 4])
def test_dedup_decisions_do_not_depend_on_the_partitions(crawl, curated, tmp_path, partitions):
    from idefics_jax.curate import dedup
    from idefics_jax.curate.docs import DocReader

    cfg = curate_config.load(path=crawl["config"], overrides={"dedup": {"partitions": partitions}}).dedup
    folder = str(tmp_path)
    list(dedup.DedupSignatures(folder, cfg).run(DocReader(os.path.join(curated, "filtered", "*.parquet")).run()))
    kinds = os.listdir(os.path.join(folder, "buckets"))
    assert sorted(kinds) == ["band", "image", "paragraph", "url"]
    for kind in kinds:  # every key lands in one of the `partitions` partitions
        assert {int(p) for p in os.listdir(os.path.join(folder, "buckets", kind))} <= set(range(partitions))
    for step in (dedup.DedupBuckets, dedup.DedupImageSets):
        for rank in range(partitions):
            list(step(folder, cfg).run(rank=rank, world_size=partitions))
    list(dedup.DedupDecide(folder, cfg).run())
    reference = os.path.join(curated, "dedup")  # the run's default partitions
    decisions = pq.read_table(os.path.join(folder, "decisions.parquet")).to_pylist()
    assert decisions == pq.read_table(os.path.join(reference, "decisions.parquet")).to_pylist()
    assert {d["reason"] for d in decisions} == {"dup_url", "dup_image_set", "near_duplicate", ""}
    with (
        open(os.path.join(folder, "frequent_image_urls.json")) as a,
        open(os.path.join(reference, "frequent_image_urls.json")) as b,
    ):
        assert json.load(a) == json.load(b) != []
