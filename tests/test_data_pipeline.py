"""The step-indexed pipeline: batch contract, determinism, mixture, bad inputs."""

import importlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from data_conftest_helpers import (  # noqa: F401  (tiny_dir is a fixture)
    encode,
    good_image,
    one_dataset_config,
    repo_root,
    rows_equal,
    small_config,
    tiny_dir,
    write_docs_parquet,
    write_pairs_parquet,
    write_tar,
)
from PIL import Image

from idefics_jax.data import BATCH_KEYS, Pipeline, default_config, pipeline
from idefics_jax.data.pipeline import Mixture
from idefics_jax.data.processor import image_array
from idefics_jax.run_config import check_data

STEPS = 10


def _straight(cfg, n=STEPS):
    p = pipeline(cfg)
    return [next(p) for _ in range(n)], p


def test_batch_contract(tiny_dir):
    cfg = small_config(tiny_dir)
    b = pipeline(cfg).batch(0)
    B, T, N, S = 4, cfg.seq_len, cfg.max_num_images, cfg.image_size
    shapes = {
        "input_ids": ((B, T), np.int32), "attention_mask": ((B, T), np.int32), "position_ids": ((B, T), np.int32),
        "segment_ids": ((B, T), np.int32), "pixel_values": ((B, N, 3, S, S), np.float32),
        "image_attention_mask": ((B, T, N), np.int32), "loss_mask": ((B, T), np.float32), "dataset_id": ((B,), np.int32),
    }  # fmt: skip
    assert set(b) == set(BATCH_KEYS) == set(shapes)
    for k, (shape, dtype) in shapes.items():
        assert b[k].shape == shape and b[k].dtype == dtype, k
    real = b["attention_mask"] == 1
    assert (b["segment_ids"][~real] == 0).all() and (b["segment_ids"][real] > 0).all()
    assert (b["loss_mask"][~real] == 0).all() and (b["loss_mask"][b["position_ids"] == 0] == 0).all()
    assert (b["input_ids"][b["position_ids"] == 0][b["attention_mask"][b["position_ids"] == 0] == 1] == 1).all()
    # every image a token looks at is a real (non-zero) image slot, and each row's images are used
    used = b["image_attention_mask"].any(1)  # [B, N]
    filled = np.abs(b["pixel_values"]).sum((2, 3, 4)) > 0
    np.testing.assert_array_equal(used, filled)
    assert filled.any(1).all()


def test_step_order_straight_restored_processes_workers(tiny_dir, tmp_path):
    cfg = small_config(tiny_dir)
    straight, _ = _straight(cfg)
    assert not rows_equal(straight[0], straight[1])
    # batch(step) builds the same thing in-process
    assert all(rows_equal(straight[s], pipeline(cfg).batch(s)) for s in (0, 7))
    # 2 processes' rows, concatenated
    halves = [Pipeline(cfg, i, 2) for i in range(2)]
    for s in range(STEPS):
        parts = [next(h) for h in halves]
        both = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        assert rows_equal(both, straight[s]), f"step {s}"
    # 0-4 here, then a fresh process restores the state and produces 5-9; and 0-9 with 2 workers
    p = pipeline(cfg)
    first = [next(p) for _ in range(5)]
    assert all(rows_equal(a, b) for a, b in zip(first, straight))
    state = json.loads(json.dumps(p.state()))
    assert state["step"] == 5
    script = tmp_path / "fresh.py"  # a file with a main guard: Grain spawns its workers
    script.write_text(f"""
import json, sys, numpy as np
sys.path.insert(0, {os.path.join(repo_root(), "tests")!r})
from data_conftest_helpers import small_config
from idefics_jax.data import pipeline
if __name__ == "__main__":
    cfg = small_config({dict(tiny_dir)!r})
    p = pipeline(cfg)
    p.restore(json.loads({json.dumps(state)!r}))
    out = {{f"r{{s}}_{{k}}": v for s in range(5, 10) for k, v in next(p).items()}}
    cfg.worker_count = 2
    w = pipeline(cfg)
    out.update({{f"w{{s}}_{{k}}": v for s in range(10) for k, v in next(w).items()}})
    w.close()
    np.savez({str(tmp_path / "out.npz")!r}, **out)
    print(json.dumps(p.state()["counters"]))
""")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    for s in range(STEPS):
        for k in BATCH_KEYS:
            if s >= 5:
                np.testing.assert_array_equal(out[f"r{s}_{k}"], straight[s][k], err_msg=f"restored step {s} {k}")
            np.testing.assert_array_equal(out[f"w{s}_{k}"], straight[s][k], err_msg=f"2 workers step {s} {k}")
    # counters survive the restore: after 10 steps they count all 40 rows
    counters = json.loads(res.stdout.strip().splitlines()[-1])
    assert sum(c["rows"] for c in counters.values()) == STEPS * cfg.global_batch_size


def test_skip_steps(tiny_dir):
    cfg = small_config(tiny_dir)
    ref = pipeline(cfg)
    cfg.skip_steps = [[2, 5]]
    p = pipeline(cfg)
    assert [p.data_step(t) for t in range(5)] == [0, 1, 5, 6, 7]
    assert rows_equal(p.batch(2), ref.batch(5)) and rows_equal(p.batch(1), ref.batch(1))
    cfg.skip_steps = [[4, 2]]
    with pytest.raises(ValueError, match="data.skip_steps"):
        check_data(cfg)


def test_mixture_proportions_over_2000_rows():
    weights = {"obelics": 73.85, "laion": 17.18, "wikipedia": 6.15, "pmd": 2.82}
    m = Mixture(list(weights.values()), block=10_000, seed=0)
    picks = np.array([m(g)[0] for g in range(2000)])
    for d, w in enumerate(weights.values()):
        assert abs(np.mean(picks == d) * 100 - w) < 3, (d, np.mean(picks == d))
    # each dataset's rows get distinct consecutive ranks (no example slot is used twice)
    ranks = [sorted(m(g)[1] for g in range(10_000) if m(g)[0] == d) for d in range(4)]
    assert all(r == list(range(len(r))) for r in ranks)


def test_mixture_in_batches(tiny_dir):
    cfg = small_config(tiny_dir, global_batch_size=8)
    p = pipeline(cfg)
    for _ in range(3):
        next(p)
    c = p.counters()
    assert [c[n]["rows"] for n in p.dataset_names] == np.bincount(
        [Mixture([0.4, 0.2, 0.2, 0.2], cfg.mixture_block_rows, cfg.seed)(g)[0] for g in range(24)], minlength=4
    ).tolist()


def test_config_errors_name_the_field(tiny_dir):
    cfg = small_config(tiny_dir)
    cfg.datasets.docs_tar.weight = 0
    with pytest.raises(ValueError, match="data.datasets.docs_tar.weight"):
        check_data(cfg)
    cfg = small_config(tiny_dir, seq_len=2)
    with pytest.raises(ValueError, match="data.seq_len"):
        check_data(cfg)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        Pipeline(small_config(tiny_dir), 0, 3)
    assert default_config().seq_len == 1024 and default_config().max_num_images == 5


# ---------------------------------------------------------------- bad inputs (issue item 7)

BIG_MIN = 10**9  # skip-rate check off, so that each test sees the counters


def _run(cfg, steps=2):
    p = pipeline(cfg)
    batches = [next(p) for _ in range(steps)]
    return p.counters()["bad"], batches


def _docs_with_bad_image(tmp_path, tiny_dir, bad: bytes, **overrides):
    """Each document: text, a bad image, text, a good image: the bad image is dropped, the
    document is kept with the good one."""
    docs = [[f"doc {i} text", bad, "after", good_image()] for i in range(4)]
    write_docs_parquet(str(tmp_path / "d.parquet"), docs)
    cfg = one_dataset_config(
        tiny_dir, "documents", str(tmp_path / "d.parquet"), skip_check_min_examples=BIG_MIN, **overrides
    )
    c, _batches = _run(cfg)
    assert c["examples"] > 0 and c["images"] == c["examples"], "documents kept with their good image only"
    return c


def test_bad_corrupt_image_bytes(tmp_path, tiny_dir):
    assert _docs_with_bad_image(tmp_path, tiny_dir, b"\x89PNG\r\n\x1a\n garbage")["skip_image_undecodable"] > 0


def test_bad_truncated_image(tmp_path, tiny_dir):
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    assert _docs_with_bad_image(tmp_path, tiny_dir, jpeg[: len(jpeg) // 2])["skip_image_undecodable"] > 0


def test_bad_zero_byte_image(tmp_path, tiny_dir):
    assert _docs_with_bad_image(tmp_path, tiny_dir, b"")["skip_image_empty"] > 0


def test_bad_one_pixel_image(tmp_path, tiny_dir):
    assert _docs_with_bad_image(tmp_path, tiny_dir, encode(Image.new("RGB", (1, 1)), "PNG"))["skip_image_too_small"] > 0


def test_bad_decompression_bomb(tmp_path, tiny_dir):
    bomb = encode(Image.new("L", (1500, 1000)), "PNG")  # 1.5 Mpx in a few KB
    c = _docs_with_bad_image(tmp_path, tiny_dir, bomb, max_image_pixels=1_000_000)
    assert c["skip_image_too_large"] > 0


def test_bad_missing_image_file(tmp_path, tiny_dir):
    (tmp_path / "ok.jpg").write_bytes(good_image())
    docs = [["text", "img:none.jpg", "more", "img:ok.jpg"] for _ in range(3)]
    docs = [[x[4:] if x.startswith("img:") else x for x in d] for d in docs]
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [[None if x.endswith(".jpg") else x for x in d] for d in docs]
    images = [[x if x.endswith(".jpg") else None for x in d] for d in docs]
    pq.write_table(pa.table({"texts": texts, "images": images}), tmp_path / "d.parquet")
    cfg = one_dataset_config(tiny_dir, "documents", str(tmp_path / "d.parquet"), skip_check_min_examples=BIG_MIN)
    c, _ = _run(cfg)
    assert c["skip_image_missing"] > 0 and c["examples"] > 0


def _expected_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "I;16", "animated"])
def test_unusual_image_modes_are_converted(mode, tmp_path, tiny_dir):
    base = Image.new("RGB", (32, 32), (200, 40, 20))
    if mode == "CMYK":
        img, data, rgb = base, encode(base.convert("CMYK"), "JPEG", quality=95), None
    elif mode == "P":
        img = base.convert("P")
        data, rgb = encode(img, "PNG"), img.convert("RGB")
    elif mode == "LA":
        img = Image.new("LA", (32, 32), (90, 255))
        data, rgb = encode(img, "PNG"), Image.new("RGB", (32, 32), (90, 90, 90))
    elif mode == "I;16":
        img = Image.fromarray(np.full((32, 32), 257 * 100, np.uint16))
        assert img.mode.startswith("I;16")
        data, rgb = encode(img, "PNG"), Image.new("RGB", (32, 32), (100, 100, 100))
    else:
        frames = [Image.new("RGB", (32, 32), c) for c in [(200, 40, 20), (0, 0, 255)]]
        buf = __import__("io").BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
        data, rgb = buf.getvalue(), Image.open(__import__("io").BytesIO(buf.getvalue())).convert("RGB")
    write_pairs_parquet(str(tmp_path / "p.parquet"), [(data, "a red square")] * 3)
    cfg = one_dataset_config(tiny_dir, "pairs", str(tmp_path / "p.parquet"), skip_check_min_examples=BIG_MIN)
    c, batches = _run(cfg, steps=1)
    assert c["skipped"] == 0 and c["images"] == c["examples"] > 0
    got = batches[0]["pixel_values"][0, 0]
    if rgb is None:  # CMYK JPEG: colour survives the round trip approximately
        mean = got.mean((1, 2)) * np.array([0.26862954, 0.26130258, 0.27577711]) + np.array(
            [0.48145466, 0.4578275, 0.40821073]
        )
        assert mean[0] > 0.6 and mean[2] < 0.3
    else:
        np.testing.assert_allclose(got, image_array(rgb, cfg.image_size), atol=1e-6)


def test_bad_non_utf8_text(tmp_path, tiny_dir):
    members = []
    for k in range(3):
        members += [(f"d{k}.0.text.txt", b"caf\xe9 \xff\xfe"), (f"d{k}.1.image.jpeg", good_image())]
    write_tar(str(tmp_path / "d.tar"), members)
    cfg = one_dataset_config(tiny_dir, "documents", str(tmp_path / "d.tar"), skip_check_min_examples=BIG_MIN)
    c, _ = _run(cfg)
    assert c["skip_text_not_utf8"] > 0 and c["skipped"] == c["attempted"]


def _docs(tmp_path, tiny_dir, docs):
    write_docs_parquet(str(tmp_path / "d.parquet"), docs + [["good", good_image(), "doc"]])
    cfg = one_dataset_config(tiny_dir, "documents", str(tmp_path / "d.parquet"), skip_check_min_examples=BIG_MIN)
    return _run(cfg, steps=3)[0]


def test_bad_document_without_image(tmp_path, tiny_dir):
    c = _docs(tmp_path, tiny_dir, [["only text", "and more text"]])
    assert c["skip_document_no_image"] > 0 and c["examples"] > 0


def test_bad_document_without_text(tmp_path, tiny_dir):
    c = _docs(tmp_path, tiny_dir, [[good_image(), good_image()]])
    assert c["skip_document_no_text"] > 0 and c["examples"] > 0


def test_document_longer_than_seq_len_is_truncated(tmp_path, tiny_dir):
    long_doc = ["word " * 40, good_image(), "a red square " * 30, good_image(), "end " * 40]
    write_docs_parquet(str(tmp_path / "d.parquet"), [long_doc])
    cfg = one_dataset_config(tiny_dir, "documents", str(tmp_path / "d.parquet"), skip_check_min_examples=BIG_MIN)
    c, batches = _run(cfg, steps=1)
    assert c["truncated"] == c["examples"] == c["rows"] == 4 and c["skipped"] == 0
    b = batches[0]
    assert (b["attention_mask"].sum(1) <= cfg.seq_len).all() and b["image_attention_mask"].any((1, 2)).all()


def test_bad_pair_with_empty_caption(tmp_path, tiny_dir):
    write_pairs_parquet(str(tmp_path / "p.parquet"), [(good_image(), "  \n"), (good_image(), "a red square")])
    cfg = one_dataset_config(tiny_dir, "pairs", str(tmp_path / "p.parquet"), skip_check_min_examples=BIG_MIN)
    c, _ = _run(cfg)
    assert c["skip_pair_empty_caption"] > 0 and c["examples"] > 0


def test_bad_input_logged_once_with_shard_and_id(tmp_path, tiny_dir, caplog):
    # the module (idefics_jax.data.pipeline, the attribute, is the function of the same name)
    importlib.import_module("idefics_jax.data.pipeline")._logged.clear()
    with caplog.at_level(logging.WARNING, logger="idefics_jax.data.pipeline"):
        c = _docs_with_bad_image(tmp_path, tiny_dir, b"")
    lines = [r.getMessage() for r in caplog.records if "image_empty" in r.getMessage()]
    assert c["skip_image_empty"] > 1 and len(lines) == 1
    assert str(tmp_path / "d.parquet") in lines[0] and "example row" in lines[0]


def test_shard_of_only_bad_data_stops_the_run(tmp_path, tiny_dir):
    write_docs_parquet(str(tmp_path / "d.parquet"), [["no image here"]] * 5)
    cfg = one_dataset_config(tiny_dir, "documents", str(tmp_path / "d.parquet"), skip_check_min_examples=10)
    p = pipeline(cfg)
    with pytest.raises(RuntimeError, match=r"dataset 'bad' skipped \d+ of \d+ examples \(100.0%\).*max_skip_fraction"):
        for _ in range(5):
            next(p)
