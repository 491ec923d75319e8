"""Few-shot evaluation of one model on one task: demonstrations, batched prompts, generation or
log-likelihood scoring, the official metric, predictions and results files.

`evaluate(model, processor, task, data_dir, shots=…)` is what `python -m idefics_jax.eval` and the
trainer (`train.eval_tasks`) both call. With several processes each evaluates its share of the
examples (the model may sit on a mesh: every process makes the same calls), and process 0 gathers
the predictions, scores them and writes the files.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax.data.processor import BadExample, decode_image
from idefics_jax.errors import UserError
from idefics_jax.eval import demos as demos_lib
from idefics_jax.eval import metrics, prompts
from idefics_jax.eval.tasks import Example, Split, Task, get

# Prompt lengths are rounded up to a multiple of this (left padding), so that a few compiled
# shapes serve a whole evaluation instead of one per batch.
LENGTH_BUCKET = 64
_MAX_IMAGE_PIXELS = 2**28


@functools.lru_cache(maxsize=128)
def _image(path: str):
    """The RGB image at `path` (cached: demonstrations repeat). UserError when the file is missing;
    BadExample when it cannot be decoded (the example is skipped and counted)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    return decode_image(data, _MAX_IMAGE_PIXELS, 1)


def _read(task: Task, data_dir: str) -> Split:
    if not os.path.isdir(data_dir):
        raise UserError(f"--data {data_dir}: not a directory")
    return task.read(data_dir)


def evaluate(
    model,
    processor,
    task_name: str,
    data_dir: str,
    *,
    shots: Sequence[int] = (0,),
    seeds: Sequence[int] = (42,),
    num_samples: int | None = None,
    query_set_size: int = 2048,
    rices: bool = False,
    batch_size: int = 8,
    num_beams: int = 3,
    output_dir: str | None = None,
    cache_dir: str | None = None,
    model_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Scores `model` on a task at each number of shots and seed.

    Args:
      model: an `Idefics` module (possibly sharded on a mesh).
      processor: a `data.Processor` with the model's tokenizer and image size.
      task_name: a name in `tasks.TASKS`.
      data_dir: the task's files (see `tasks`).
      shots, seeds: the grid; seeds draw the test subset and the random demonstrations.
      num_samples: test examples scored per seed (None: the whole test split).
      query_set_size: random demonstrations come from this many train examples.
      rices: demonstrations by image similarity instead of at random.
      batch_size: prompts per model call.
      num_beams: beam width of generation (3 in the IDEFICS protocol).
      output_dir: where predictions-<task>-<shots>shot-seed<s>.json go (process 0); None: nowhere.
      cache_dir: where RICES features are cached (needs `model_id`); None: not cached.
      model_id: identifies the weights for the RICES cache (checkpoint dir + step, HF dir).
      progress: show a progress bar on stderr.
    Returns:
      {str(shots): {"scores": {str(seed): score}, "mean", "std", "num_examples", "skipped": {reason: n},
      "metric"}}; scores in percent (CIDEr ×100, VQA accuracy, ROC AUC, top-1).
    """
    task = get(task_name)
    split = _read(task, data_dir)
    need = max(max(shots), prompts.ZERO_SHOT_TEXT_DEMOS if 0 in shots else 0)
    if need > len(split.train):
        raise UserError(
            f"{task.name}: {need} demonstrations per prompt need a train split of at least {need} examples; "
            f"the one in {data_dir} has {len(split.train)}"
        )
    if not split.test:
        raise UserError(f"{task.name}: the test split in {data_dir} is empty")
    missing = [ex.image for ex in split.train + split.test if not os.path.isfile(ex.image)]
    if missing:  # found before any model work, not hours into a run
        raise UserError(f"{missing[0]}: image not found ({len(missing)} of {task.name}'s images are missing)")
    selector_rices = _rices(model, processor, task, split, batch_size, cache_dir, model_id) if rices else None
    out: dict[str, Any] = {}
    for k in shots:
        per_seed, skipped, count = {}, {}, 0
        for seed in seeds:
            rng = np.random.default_rng(seed)
            n = len(split.test) if num_samples is None else min(num_samples, len(split.test))
            test = [split.test[i] for i in rng.choice(len(split.test), size=n, replace=False)]
            selector = selector_rices or demos_lib.RandomDemos(split.train, query_set_size, seed)
            records, skips = _run(model, processor, task, split, test, selector, k, batch_size, num_beams, progress)
            score = _score(task, split, records)
            per_seed[str(seed)] = score
            count = len(records)
            for r, c in skips.items():
                skipped[r] = skipped.get(r, 0) + c
            if output_dir is not None and jax.process_index() == 0:
                os.makedirs(output_dir, exist_ok=True)
                path = os.path.join(output_dir, f"predictions-{task.name}-{k}shot-seed{seed}.json")
                with open(path, "w") as f:
                    json.dump(records, f, indent=1)
        scores = np.asarray(list(per_seed.values()), np.float64)
        out[str(k)] = {
            "metric": task.metric,
            "scores": per_seed,
            "mean": float(scores.mean()),
            "std": float(scores.std()),
            "num_examples": count,
            "skipped": skipped,
        }
    return out


def _score(task: Task, split: Split, records: list[dict]) -> float:
    if not records:
        raise UserError(f"{task.name}: every test example was skipped (see 'skipped' in results.json)")
    if task.kind == "caption":
        return metrics.cider(
            {i: r["prediction"] for i, r in enumerate(records)}, {i: r["references"] for i, r in enumerate(records)}
        )
    if task.kind == "vqa":
        return 100.0 * float(np.mean([metrics.vqa_accuracy(r["prediction"], r["references"]) for r in records]))
    if task.kind == "binary":
        return metrics.roc_auc([r["score"] for r in records], [r["label"] for r in records])
    return 100.0 * float(np.mean([r["prediction"] == r["references"][0] for r in records]))


# One pass over the test examples ---------------------------------------------------------------------


def _run(model, processor, task, split, test, selector, shots, batch_size, num_beams, progress):
    """This process's share of `test`, in batches; returns (all processes' records in test order,
    {skip reason: count})."""
    n_proc, me = jax.process_count(), jax.process_index()
    mine = list(range(me, len(test), n_proc))
    # Every process makes the same number of model calls (collectives on a shared mesh).
    batches = math.ceil(math.ceil(len(test) / n_proc) / batch_size)
    records, skips = [], {}
    bar = _Progress(len(test), f"{task.name} {shots}-shot", progress and me == 0)
    for b in range(batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        prompts_, kept = [], []
        for pos in chunk:
            ex = test[pos]
            picked = selector(pos, ex, shots or prompts.ZERO_SHOT_TEXT_DEMOS)
            try:
                prompts_.append(prompts.build(task, picked, ex, lambda e: _image(e.image), shots))
                kept.append(pos)
            except BadExample as e:
                skips[e.reason] = skips.get(e.reason, 0) + 1
        outputs = _call(model, processor, task, split, prompts_, shots, batch_size, num_beams)
        for pos, items, result in zip(kept, prompts_, outputs):
            ex = test[pos]
            rec = {"position": pos, "id": ex.id, "prompt": prompts.render(items), **result}
            rec["references"] = list(ex.references) if task.kind in ("caption", "vqa") else [ex.target]
            if task.kind == "binary":
                rec["label"] = ex.label
            records.append(rec)
        bar.update(len(chunk) * n_proc)
    bar.close()
    records, skips = _gather(records, skips)
    records.sort(key=lambda r: r.pop("position"))
    return records, skips


def _call(model, processor, task, split, prompt_list, shots, batch_size, num_beams) -> list[dict]:
    """One batch of prompts through the model: generation ({"prediction"}) or log-likelihood of the
    candidate answers ({"prediction", "score"}). An empty list still makes the call (multi-process)."""
    n_images = shots + 1
    if task.kind in ("caption", "vqa"):
        batch = _batch(processor, prompt_list, batch_size, n_images)
        from idefics_jax import generate

        tok = processor.tokenizer
        out = generate(
            model,
            batch["input_ids"],
            batch["pixel_values"],
            batch["image_attention_mask"],
            batch["attention_mask"],
            max_new_tokens=task.max_new_tokens,
            num_beams=num_beams,
            bad_words_ids=[[processor.image_token_id], [processor.fake_token_id]],
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        t = batch["input_ids"].shape[1]
        texts = tok.batch_decode(np.asarray(out)[: len(prompt_list), t:], skip_special_tokens=True)
        return [{"prediction": prompts.postprocess(s), "generated": s} for s in texts]
    # Log-likelihood: one row per (prompt, candidate), the candidate appended to the query's text.
    cands = split.classes
    rows = [p[:-1] + [f"{p[-1]} {c}"] for p in prompt_list for c in cands]
    lengths = [_continuation_tokens(processor, p, c) for p in prompt_list for c in cands]
    if not rows:  # this process has no examples left but must join the collective calls
        rows, lengths = [[processor.tokenizer.bos_token]], [1]
    scores = []
    for i in range(0, len(rows), batch_size):
        batch = _batch(processor, rows[i : i + batch_size], batch_size, n_images)
        k = np.ones(batch_size, np.int32)
        k[: len(lengths[i : i + batch_size])] = lengths[i : i + batch_size]
        ll = np.asarray(_loglik(model, batch, k))[: len(rows[i : i + batch_size])]
        scores += list(ll / (k[: len(ll)] if task.kind == "rank" else 1))
    scores = np.asarray(scores[: len(prompt_list) * len(cands)]).reshape(len(prompt_list), len(cands))
    out = []
    for s in scores:
        if task.kind == "binary":  # P(yes) among the two answers
            out.append(
                {"prediction": cands[int(np.argmax(s))], "score": float(np.exp(s[1] - np.logaddexp(s[0], s[1])))}
            )
        else:
            out.append({"prediction": cands[int(np.argmax(s))]})
    return out


def _continuation_tokens(processor, prompt: list, candidate: str) -> int:
    """How many tokens appending " candidate" to the prompt's last text adds."""
    tok = processor.tokenizer
    full, _ = processor.prompt_text(prompt[:-1] + [f"{prompt[-1]} {candidate}"])
    head, _ = processor.prompt_text(prompt)
    return len(tok(full, add_special_tokens=False)["input_ids"]) - len(tok(head, add_special_tokens=False)["input_ids"])


def _batch(processor, prompt_list: list, batch_size: int, n_images: int) -> dict[str, np.ndarray]:
    """Processor output padded to fixed shapes: rows to `batch_size` (copies of the first prompt, or
    of a bare `<s>` when there is none), length up to a multiple of LENGTH_BUCKET on the left, images
    to `n_images` slots."""
    rows = list(prompt_list) or [[processor.tokenizer.bos_token]]
    rows += [rows[0]] * (batch_size - len(rows))
    enc = processor(rows)
    t = enc["input_ids"].shape[1]
    pad_t = -t % LENGTH_BUCKET
    n = max(n_images, enc["pixel_values"].shape[1])
    pad_n = n - enc["pixel_values"].shape[1]
    pad_id = processor.tokenizer.pad_token_id
    return {
        "input_ids": np.pad(enc["input_ids"], ((0, 0), (pad_t, 0)), constant_values=pad_id),
        "attention_mask": np.pad(enc["attention_mask"], ((0, 0), (pad_t, 0))),
        "pixel_values": np.pad(enc["pixel_values"], ((0, 0), (0, pad_n), (0, 0), (0, 0), (0, 0))),
        "image_attention_mask": np.pad(enc["image_attention_mask"], ((0, 0), (pad_t, 0), (0, pad_n))),
    }


@functools.partial(jax.jit, static_argnums=0)
def _loglik_jit(graphdef, state, input_ids, pixel_values, image_attention_mask, attention_mask, k):
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, pixel_values, image_attention_mask, attention_mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    t = tok.shape[1]
    last = jnp.arange(t)[None, :] >= t - k[:, None]  # the final k tokens (left padding aligns ends)
    return jnp.where(last, tok, 0.0).sum(axis=1)


def _loglik(model, batch: dict[str, np.ndarray], k: np.ndarray) -> jax.Array:
    """Sum of log p of the last `k` tokens of each row, float32 [B]."""
    graphdef, state = nnx.split(model)
    return _loglik_jit(
        graphdef,
        state,
        batch["input_ids"],
        batch["pixel_values"],
        batch["image_attention_mask"],
        batch["attention_mask"],
        k,
    )


# RICES features ----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _features_jit(graphdef, state, pixels):
    model = nnx.merge(graphdef, state)
    cls = model.vision_model.post_layernorm(model.vision_model(pixels)[:, 0]).astype(jnp.float32)
    return cls / jnp.maximum(jnp.linalg.norm(cls, axis=-1, keepdims=True), 1e-12)


def image_features(model, processor, examples: Sequence[Example], batch_size: int) -> np.ndarray:
    """L2-normalised vision features [len(examples), D] float32; NaN rows for undecodable images."""
    from idefics_jax.data.processor import image_array

    graphdef, state = nnx.split(model)
    s = processor.image_size
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        pixels = np.zeros((batch_size, 3, s, s), np.float32)
        bad = np.zeros(batch_size, bool)
        for j, ex in enumerate(chunk):
            try:
                pixels[j] = image_array(_image(ex.image), s)
            except BadExample:
                bad[j] = True
        f = np.array(_features_jit(graphdef, state, pixels))
        f[bad] = np.nan
        out.append(f[: len(chunk)])
    return np.concatenate(out)


def _rices(model, processor, task, split, batch_size, cache_dir, model_id) -> demos_lib.Rices:
    def cached(examples):
        if cache_dir is None or model_id is None:
            return image_features(model, processor, examples, batch_size)
        path = demos_lib.cache_path(cache_dir, model_id, task.name, examples)
        if os.path.exists(path):
            return np.load(path)
        f = image_features(model, processor, examples, batch_size)
        if jax.process_index() == 0:
            os.makedirs(cache_dir, exist_ok=True)
            np.save(path + ".tmp.npy", f)
            os.replace(path + ".tmp.npy", path)
        return f

    query = cached(split.test)
    return demos_lib.Rices(split.train, cached(split.train), {ex.id: q for ex, q in zip(split.test, query)})


# Processes and progress ------------------------------------------------------------------------


def _gather(records: list[dict], skips: dict) -> tuple[list[dict], dict]:
    """Every process's records and skip counts, on every process (JSON bytes through an all-gather)."""
    if jax.process_count() == 1:
        return records, skips
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps([records, skips]).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.int64(len(blob)))))
    padded = np.zeros(size, np.uint8)
    padded[: len(blob)] = blob
    lengths = multihost_utils.process_allgather(np.int64(len(blob)))
    gathered = multihost_utils.process_allgather(padded)
    all_records, all_skips = [], {}
    for row, n in zip(gathered, lengths):
        r, s = json.loads(bytes(row[: int(n)]).decode())
        all_records += r
        for k, v in s.items():
            all_skips[k] = all_skips.get(k, 0) + v
    return all_records, all_skips


class _Progress:
    """A one-line progress bar on stderr: examples done, examples/s, ETA."""

    def __init__(self, total: int, label: str, active: bool):
        self.total, self.label, self.active = total, label, active
        self.done, self.t0 = 0, time.perf_counter()

    def update(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if self.active:
            dt = time.perf_counter() - self.t0
            rate = self.done / dt if dt > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(
                f"\r{self.label}: {self.done}/{self.total} examples | {rate:.2f} ex/s | ETA {eta:.0f}s",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.active:
            print(file=sys.stderr, flush=True)
