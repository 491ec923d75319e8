"""Few-shot evaluation (idefics_jax.eval): official metrics, task files, prompts, demonstrations, the
runner and the CLI on the tiny tasks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from testlib import ROOT, random_checkpoint

from idefics_jax.data import Processor, tiny
from idefics_jax.errors import UserError
from idefics_jax.eval import demos, metrics, prompts, tasks

# --- VQA accuracy: the official evaluation's cases --------------------------------------------------

TEN = 10


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("2", ["2"] * TEN, 1.0),
        # All humans agree: the official evaluation normalises nothing, so "two" misses "2".
        ("two", ["2"] * TEN, 0.0),
        # Humans disagree: both sides are normalised and "two" → "2" matches nine answers.
        ("two", ["2"] * 9 + ["3"], 1.0),
        ("a dog", ["dog"] * 5 + ["cat"] * 5, 1.0),  # article dropped
        ("The Dog!", ["dog"] * 5 + ["cat"] * 5, 1.0),  # case and "!" dropped
        ("don't", ["dont"] * 3 + ["no"] * 7, 0.9),  # "dont" → "don't" (3 matches)
        ("yes.", ["yes"] * 4 + ["no"] * 6, 1.0),  # trailing period stripped
        ("black-white", ["black white"] * 3 + ["grey"] * 7, 0.9),  # "-" between words → space
        ("1,000", ["1000"] * 3 + ["many"] * 7, 0.9),  # a "d,d" number deletes punctuation
        # 3 / 2 / 1 / 0 matching humans: mean over the ten leave-one-out subsets of min(1, n/3).
        ("red", ["red"] * 3 + ["blue"] * 7, (3 * 2 / 3 + 7 * 1) / 10),
        ("red", ["red"] * 2 + ["blue"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),
        ("red", ["red"] * 1 + ["blue"] * 9, (1 * 0 + 9 * 1 / 3) / 10),
        ("red", ["blue"] * 5 + ["green"] * 5, 0.0),
        ("  red\n", ["red"] * 4 + ["blue"] * 6, 1.0),  # whitespace and newlines
    ],
)
def test_vqa_accuracy_equals_the_official_evaluation(prediction, answers, expected):
    assert metrics.vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_answer_normalisation():
    assert metrics.normalize_answer("Two dogs.") == "2 dogs"
    assert metrics.normalize_answer("an apple") == "apple"
    assert metrics.normalize_answer("isnt") == "isn't"


def test_cider_equals_pycocoevalcap_on_the_same_tokenized_inputs():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {
        1: ["A red circle on grey.", "a red round shape"],
        2: ["A blue square.", "a square, blue"],
        3: ["Two dogs on a couch.", "dogs sleeping on a sofa"],
    }
    preds = {1: "a red circle", 2: "a green square", 3: "a cat on a bed"}
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    direct, _ = Cider().compute_score(gts, res)
    assert metrics.cider(preds, refs) == pytest.approx(100 * direct)
    assert metrics.cider({k: v[0] for k, v in refs.items()}, refs) > metrics.cider(preds, refs)


def test_roc_auc():
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(75.0)
    assert metrics.roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(50.0)  # a tie counts one half
    with pytest.raises(ValueError):
        metrics.roc_auc([0.1, 0.2], [1, 1])


# --- task files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tasks():
    return tiny.eval_tasks()


def test_tiny_tasks_read_in_the_published_formats(tiny_tasks):
    coco = tasks.get("coco").read(tiny_tasks["coco"])
    vqa = tasks.get("vqav2").read(tiny_tasks["vqav2"])
    assert (len(coco.train), len(coco.test)) == (tiny.N_EVAL_TRAIN, tiny.N_EVAL_TEST)
    assert len(vqa.test) == 2 * tiny.N_EVAL_TEST and len(vqa.test[0].references) == 10
    assert {e.text for e in vqa.test} == {"What colour is the shape?", "What shape is this?"}
    assert all(os.path.isfile(e.image) for e in coco.test + vqa.test)


def test_bad_task_files_name_the_file(tmp_path):
    with pytest.raises(UserError, match="unknown task 'cocoo'"):
        tasks.get("cocoo")
    with pytest.raises(UserError, match="dataset_coco.json: not found"):
        tasks.get("coco").read(str(tmp_path))
    (tmp_path / "dataset_coco.json").write_text("{not json")
    with pytest.raises(UserError, match="dataset_coco.json: malformed JSON"):
        tasks.get("coco").read(str(tmp_path))
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [{"split": "test", "filename": "x.jpg"}]}))
    with pytest.raises(UserError, match=r"dataset_coco.json: images\[0\] has no 'sentences' field"):
        tasks.get("coco").read(str(tmp_path))


# --- prompts and demonstrations ----------------------------------------------------------------------

_VQA_EXAMPLE = tasks.Example(
    id=1, image="x.jpg", text="What is on the plate?", target="pizza", references=("pizza",) * 10
)


@pytest.mark.parametrize("shots", [0, 4, 32])
def test_prompt_image_count(tiny_tasks, shots):
    task = tasks.get("vqav2")
    demos_ = [_VQA_EXAMPLE] * (shots or prompts.ZERO_SHOT_TEXT_DEMOS)
    items = prompts.build(task, demos_, _VQA_EXAMPLE, lambda e: Image.new("RGB", (8, 8)), shots)
    processor = Processor(tiny_tasks["tokenizer"], image_size=16)
    enc = processor([items])
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == shots + 1
    text = prompts.render(items)
    assert text.endswith("<image>Question: What is on the plate? Answer:")
    if shots == 0:
        assert text == (
            "Question: What is on the plate? Answer: pizza\n" * 2 + "<image>Question: What is on the plate? Answer:"
        )
    else:
        assert text.startswith("<image>Question: What is on the plate? Answer: pizza\n<image>")


def test_postprocess_cuts_at_the_next_demonstration():
    assert prompts.postprocess(" pizza Question: what") == "pizza"
    assert prompts.postprocess(" a red circle\nCaption: a blue") == "a red circle"
    assert prompts.postprocess("yes Answer: no") == "yes"


def test_random_demos_are_seeded_and_distinct():
    train = [tasks.Example(id=i, image=f"{i}.jpg") for i in range(50)]
    a, b = demos.RandomDemos(train, 20, seed=1), demos.RandomDemos(train, 20, seed=2)
    picked = a(3, train[0], 8)
    assert picked == demos.RandomDemos(train, 20, seed=1)(3, train[0], 8)
    assert len({e.id for e in picked}) == 8 and {e.id for e in picked} <= {train[i].id for i in a.pool}
    assert picked != b(3, train[0], 8) and picked != a(4, train[0], 8)


def test_rices_puts_the_most_similar_last():
    train = [tasks.Example(id=i, image=f"{i}.jpg") for i in range(4)]
    feats = np.eye(4, dtype=np.float32)
    feats[3] = np.nan  # an undecodable train image is never chosen
    q = np.array([0.8, 0.6, 0.1, 0.9], np.float32)
    q /= np.linalg.norm(q)
    r = demos.Rices(train, feats, {"q": q})
    assert [e.id for e in r(0, tasks.Example(id="q", image="q.jpg"), 3)] == [2, 1, 0]


# --- the runner and the CLI on the tiny tasks ---------------------------------------------------------


def _tiny_vqa_copy(src: str, dst, seed: int = 1, num_samples: int = 6) -> tuple[str, str]:
    """The tiny VQAv2 task copied, with the image of the first test example that `seed` draws
    (as the runner draws them) corrupted; returns (data dir, that image)."""
    import shutil

    shutil.copytree(src, dst)
    test = tasks.get("vqav2").read(str(dst)).test
    image = test[np.random.default_rng(seed).choice(len(test), size=num_samples, replace=False)[0]].image
    with open(image, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a jpeg")
    return str(dst), image


def test_bad_input_is_one_user_error_before_any_model_call(tiny_tasks, tmp_path):
    from idefics_jax.eval import evaluate

    processor = Processor(tiny_tasks["tokenizer"], image_size=32)
    with pytest.raises(UserError, match=r"vqav2: 500 demonstrations .* has 192"):
        evaluate(None, processor, "vqav2", tiny_tasks["vqav2"], shots=[500])
    data, _ = _tiny_vqa_copy(tiny_tasks["vqav2"], tmp_path / "vqa")
    missing = tasks.get("vqav2").read(data).train[5].image
    os.remove(missing)
    with pytest.raises(UserError, match=f"{missing}: image not found"):
        evaluate(None, processor, "vqav2", data, shots=[0])


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "idefics_jax.eval", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow
def test_cli_on_the_tiny_task_skips_a_corrupt_image(tiny_tasks, tmp_path):
    random_checkpoint(tmp_path / "ckpt")
    data, corrupt = _tiny_vqa_copy(tiny_tasks["vqav2"], tmp_path / "vqa")
    common = ["--ckpt", str(tmp_path / "ckpt"), "--tokenizer", tiny_tasks["tokenizer"], "--data", data]
    r = _cli(*common, "--task", "vqav2", "--shots", "0,2", "--num-samples", "6", "--batch-size", "4",
             "--seeds", "1,2", "--output", str(tmp_path / "out"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())["vqav2"]
    assert set(results) == {"0", "2"} and set(results["2"]["scores"]) == {"1", "2"}
    assert results["0"]["metric"] == "VQA accuracy" and "vqav2" in r.stdout
    # An untrained model answers nothing right; the corrupt image is skipped whenever it is drawn.
    assert results["0"]["mean"] < 20
    records = json.loads((tmp_path / "out" / "predictions-vqav2-2shot-seed1.json").read_text())
    assert records[0]["prompt"].count("<image>") == 3 and len(records[0]["references"]) == 10
    # Seed 1 draws the corrupt image first: skipped and counted at every number of shots, never scored.
    assert all(r["skipped"].get("image_undecodable", 0) >= 1 for r in results.values())
    assert len(records) < 6 and os.path.isfile(corrupt)
    r = _cli(*common, "--task", "cocoo", "--output", str(tmp_path / "out"))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "unknown task 'cocoo'" in r.stderr


@pytest.mark.slow
def test_in_training_eval_is_logged(tiny_tasks, tmp_path, monkeypatch, capsys):
    from testlib import load_config, records

    from idefics_jax.train.loop import train

    # Where CIDEr cannot run (no Java, no pycocoevalcap) the captioning task is dropped at the start
    # with a warning; the run and its other tasks go on.
    monkeypatch.setattr(metrics, "cider_unavailable", lambda: "no Java here")
    config = load_config("tiny", "train.steps=2", "train.checkpoint_every=100", "train.eval_every=0")
    config.train.eval_tasks = [
        dict(task="coco", data=tiny_tasks["coco"], shots=[0], num_samples=4, every=2),
        dict(task="vqav2", data=tiny_tasks["vqav2"], shots=[0], num_samples=4, every=2),
    ]
    train(config, str(tmp_path))
    assert "warning: train.eval_tasks: coco will not be evaluated: no Java here" in capsys.readouterr().err
    logged = [r for r in records(tmp_path / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in logged] == [2] and 0 <= logged[0]["eval/vqav2/0shot"] <= 100
    assert not any(k.startswith("eval/coco") for r in logged for k in r)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
