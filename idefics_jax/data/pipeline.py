"""The training input pipeline: a step-indexed, resumable mixture of packed IDEFICS rows.

Order is a pure function of (seed, step, data config):

  training step t ──skip_steps──► data step s ──► global rows g = s·B + r, r < B
  row g ──mixture──► (dataset d, k = how many rows of d came before, in a per-block permutation)
  row k of d ──► example slots k·K … k·K+K-1 of d's stream (K = examples_per_row)
  slot q ──► example perm_{d, epoch}(q mod len(d)), epoch = q div len(d)

Nothing depends on which process or worker builds a row or on what was built before, so:
  * each process builds only its rows (B / process_count consecutive ones) and the trainer
    assembles the global batch with `jax.make_array_from_process_local_data`;
  * a Grain `MapDataset` over steps spreads the work over `worker_count` processes;
  * resuming needs only the next training step (`state()` / `restore()`), and rolling back past a
    loss spike is a config entry (`skip_steps`) mapping training steps past the bad data.

The mixture assigns, in each block of `mixture_block_rows` rows, round(weight · block) rows to each
dataset (largest remainders), at positions given by a seeded permutation of the block: proportions
are exact per block and the count of earlier rows of a dataset is known in closed form, which is
what lets examples be drawn without replacement. A row takes its examples from its K slots in
order and packs them until the next does not fit (tokens or images), so slots past that point are
unused in that epoch of the dataset; K defaults to max_num_images (every packed example has at
least one image, so a row never holds more).

Each row also carries its counters (examples, tokens, images, skips by reason), computed where it
is built and summed by the `Pipeline` in the main process, so the numbers do not depend on workers.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import signal
from typing import Any

import grain
import ml_collections
import numpy as np

from idefics_jax.data.formats import FormatError, ImageRef, RawExample, Source
from idefics_jax.data.packing import TokenIds, pack, window
from idefics_jax.data.processor import FAKE_TOKEN, IMAGE_TOKEN, BadExample, cached_tokenizer, decode_image, image_array
from idefics_jax.data.schema import check_batch
from idefics_jax.run_config import check_data

log = logging.getLogger(__name__)

# Why an example (or, for image_* inside a document, one image) was dropped.
REASONS = (
    "image_empty",  # zero-byte image
    "image_undecodable",  # corrupt or truncated bytes
    "image_too_large",  # width × height > max_image_pixels (decompression bomb)
    "image_too_small",  # a side < min_image_side (1×1 tracking pixels)
    "image_missing",  # image path that cannot be read
    "text_not_utf8",
    "text_has_image_token",  # literal <image>/<fake_token_around_image> in the text
    "document_no_image",  # no (readable) image left
    "document_no_text",
    "pair_empty_caption",
    "pair_too_long",  # a pair (never split) longer than seq_len
    "malformed",  # the stored example does not follow its format's layout
)
# Per-dataset counters; each row carries one int64 vector in this order.
COUNTERS = ("rows", "examples", "tokens", "images", "attempted", "skipped", "truncated") + tuple(
    f"skip_{r}" for r in REASONS
)
_C = {name: i for i, name in enumerate(COUNTERS)}
_logged: set[tuple[str, str]] = set()  # (dataset, reason) already logged by this process


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of a training config. Fields:

    datasets: ConfigDict name → {kind, paths, weight, root, examples_per_row}:
        kind "documents" (interleaved web documents) or "pairs" (image-text pairs);
        paths: glob (or comma-separated globs) of .parquet / .tar shards (formats.py);
        weight: share of packed rows (> 0; normalised over datasets);
        root: directory for relative image paths in parquet ("" = each shard's directory);
        examples_per_row: example slots per row, K (0 = max_num_images).
      dataset_id in batches is the index of the name in sorted order (ConfigDict iteration order).
    tokenizer_path: HF tokenizer directory (image tokens added when missing).
    seq_len: tokens per row (1024 for IDEFICS 9b/80b).
    max_num_images: images per row, N (m4: 5); pixel_values is [B, N, 3, S, S].
    image_size: S, the vision encoder's input side (224).
    global_batch_size: rows per step over all processes (divisible by process_count).
    seed: data seed; the batch at a step is a function of it, the step and this config.
    worker_count: Grain worker processes (0 = build in the main process).
    read_threads: threads per worker building batches; prefetch_batches: batches buffered per
        worker.
    skip_steps: list of [start, stop) ranges of *data* steps never used: after a rollback to a
        checkpoint before a loss spike, add the spike's range and training continues past it.
    max_skip_fraction: stop with an error when a dataset's skipped/attempted examples exceed this…
    skip_check_min_examples: …once it has attempted at least this many.
    image_tokens_are_targets: whether <image>/<fake_token_around_image> are prediction targets
        (m4 trained on them).
    use_segment_ids: packed examples do not attend to each other and positions restart per
        example (m4 let them attend).
    max_image_pixels: images with more pixels are skipped before decoding.
    min_image_side: images with a side under this many pixels are skipped.
    mixture_block_rows: rows over which the mixture proportions are exact.
    """
    c = ml_collections.ConfigDict()
    c.datasets = ml_collections.ConfigDict()
    c.tokenizer_path = ""
    c.seq_len = 1024
    c.max_num_images = 5
    c.image_size = 224
    c.global_batch_size = 512
    c.seed = 0
    c.worker_count = 8
    c.read_threads = 4
    c.prefetch_batches = 2
    c.skip_steps = []
    c.max_skip_fraction = 0.25
    c.skip_check_min_examples = 1000
    c.image_tokens_are_targets = True
    c.use_segment_ids = True
    c.max_image_pixels = 30_000_000
    c.min_image_side = 10
    c.mixture_block_rows = 10_000
    return c


# The data fields the sequence of batches depends on. skip_steps is not one: skipping a range is how
# a run deliberately moves past data (rollbacks add to it), and the step → data step map keeps the rest.
ORDER_FIELDS = (
    "datasets",
    "seed",
    "global_batch_size",
    "seq_len",
    "max_num_images",
    "image_size",
    "mixture_block_rows",
    "image_tokens_are_targets",
    "use_segment_ids",
    "max_image_pixels",
    "min_image_side",
)


def order_fingerprint(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """What decides which examples each step sees, as JSON: the `ORDER_FIELDS` of a data config and
    `tokenizer_sha256`, a hash of the tokenizer directory's files (the same tokenizer moved
    elsewhere keeps it; a different vocabulary or merge table does not). The trainer stores it in
    every checkpoint and refuses to resume when it changed (`run_config.differences` names the fields)."""
    out = {k: cfg[k].to_dict() if isinstance(cfg[k], ml_collections.ConfigDict) else cfg[k] for k in ORDER_FIELDS}
    h = hashlib.sha256()
    for name in sorted(os.listdir(cfg.tokenizer_path)):
        path = os.path.join(cfg.tokenizer_path, name)
        if os.path.isfile(path):
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    out["tokenizer_sha256"] = h.hexdigest()
    return out


def _seed(*xs: int) -> int:
    """A 31-bit seed derived from integers (stable across processes and platforms)."""
    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(1, np.uint32)[0] & 0x7FFFFFFF)


def _permute(i: int, n: int, seed: int) -> int:
    """Position of i in a seeded permutation of range(n), computed without materialising it."""
    return 0 if n == 1 else int(grain.experimental.index_shuffle(i, max_index=n - 1, seed=seed, rounds=4))


class Mixture:
    """Global row index → (dataset, rank of the row among that dataset's rows).

    Per block of `block` rows, dataset d owns counts[d] = round(w_d · block) rows (largest
    remainders), placed by a seeded permutation of the block.
    """

    def __init__(self, weights, block: int, seed: int):
        w = np.asarray(weights, np.float64) / np.sum(weights)
        counts = np.floor(w * block).astype(np.int64)
        extra = block - counts.sum()
        counts[np.argsort(-(w * block - counts), kind="stable")[:extra]] += 1
        if (counts == 0).any():
            raise ValueError(
                f"data.mixture_block_rows={block} is too small: weights {list(weights)} give a dataset no row per block"
            )
        self.counts = counts.tolist()
        self.bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self.block, self.seed = block, seed

    def __call__(self, g: int) -> tuple[int, int]:
        b, pos = divmod(g, self.block)
        slot = _permute(pos, self.block, _seed(self.seed, 0, b))
        d = bisect.bisect_right(self.bounds, slot) - 1
        return d, b * self.counts[d] + slot - self.bounds[d]


def _text(x) -> str:
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadExample("text_not_utf8", str(e)) from None
    if not isinstance(x, str):
        raise BadExample("malformed", f"text of type {type(x).__name__}")
    return x


class RowBuilder:
    """Builds global row g (a pure function of g and the config). Picklable: Grain workers get a
    copy; tokenizer and shard handles are opened lazily in each process."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        check_data(cfg)
        self.cfg = cfg
        self.names = list(cfg.datasets.keys())
        specs = [cfg.datasets[n] for n in self.names]
        self.kinds = [s.kind for s in specs]
        self.sources = [Source(s.paths, s.kind, s.get("root", "")) for s in specs]
        self.per_row = [s.get("examples_per_row", 0) or cfg.max_num_images for s in specs]
        self.mixture = Mixture([s.weight for s in specs], cfg.mixture_block_rows, cfg.seed)
        self.tokenizer_path = cfg.tokenizer_path
        self.seed = cfg.seed
        self.seq_len, self.num_images, self.image_size = cfg.seq_len, cfg.max_num_images, cfg.image_size
        self.max_pixels, self.min_side = cfg.max_image_pixels, cfg.min_image_side
        self.image_tokens_are_targets, self.use_segment_ids = cfg.image_tokens_are_targets, cfg.use_segment_ids
        tok = self.tokenizer
        self.ids = TokenIds(
            bos=tok.bos_token_id,
            eos=tok.eos_token_id,
            pad=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            image=tok.convert_tokens_to_ids(IMAGE_TOKEN),
            fake=tok.convert_tokens_to_ids(FAKE_TOKEN),
        )

    @property
    def tokenizer(self):
        return cached_tokenizer(self.tokenizer_path)

    def example_index(self, d: int, q: int) -> int:
        """Slot q of dataset d's stream → example index: epoch q div n, permuted per epoch."""
        n = len(self.sources[d])
        epoch, i = divmod(q, n)
        return _permute(i, n, _seed(self.seed, 1 + d, epoch))

    def _image(self, ref: ImageRef):
        data = ref.data
        if data is None:
            try:
                with open(ref.path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise BadExample("image_missing", f"{ref.path}: {e.strerror}") from None
        return decode_image(data, self.max_pixels, self.min_side)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _document(self, ex: RawExample, d: int, stats: np.ndarray):
        """→ (tokens `<s> … </s>`, PIL images in order). Bad images are dropped and counted."""
        parts = []
        for item in ex.items:
            if isinstance(item, ImageRef):
                try:
                    parts.append(self._image(item))
                except BadExample as e:
                    self._count(stats, d, ex, e)  # the document goes on without this image
            else:
                t = _text(item)
                if IMAGE_TOKEN in t or FAKE_TOKEN in t:
                    raise BadExample("text_has_image_token", repr(t[:60]))
                if t.strip():
                    parts.append(t)
        images = [p for p in parts if not isinstance(p, str)]
        if not images:
            raise BadExample("document_no_image", f"{sum(isinstance(i, ImageRef) for i in ex.items)} image(s) stored")
        if len(images) == len(parts):
            raise BadExample("document_no_text")
        # m4's web-document text: texts joined by a space, glued to a preceding image; consecutive
        # images share their <fake_token_around_image> as in the processor.
        s, last_was_image = "", False
        for p in parts:
            if isinstance(p, str):
                s += p if (last_was_image or not s) else " " + p
                last_was_image = False
            else:
                s += (IMAGE_TOKEN + FAKE_TOKEN) if last_was_image else (FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN)
                last_was_image = True
        return [self.ids.bos] + self._encode(s.strip(" ")) + [self.ids.eos], images

    def _pair(self, ex: RawExample):
        ref, text = ex.items
        caption = _text(text).strip()
        if not caption:
            raise BadExample("pair_empty_caption")
        if IMAGE_TOKEN in caption or FAKE_TOKEN in caption:
            raise BadExample("text_has_image_token", repr(caption[:60]))
        tokens = [self.ids.bos] + self._encode(FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN + caption) + [self.ids.eos]
        if len(tokens) > self.seq_len:
            raise BadExample("pair_too_long", f"{len(tokens)} tokens > seq_len={self.seq_len}")
        return tokens, [self._image(ref)]

    def _count(self, stats: np.ndarray, d: int, ex: RawExample, e: BadExample) -> None:
        stats[_C[f"skip_{e.reason}"]] += 1
        key = (self.names[d], e.reason)
        if key not in _logged:
            _logged.add(key)
            log.warning(
                "data: dataset %s, shard %s, example %s: %s%s (skipped and counted; further %s are not logged)",
                self.names[d], ex.shard, ex.id, e.reason, f" ({e.detail})" if e.detail else "", e.reason,
            )  # fmt: skip

    def __call__(self, g: int) -> dict[str, np.ndarray]:
        """Row g → the batch keys for one row ([T], [N, 3, S, S], [T, N], scalar dataset_id) plus
        `stats`: int64 [len(COUNTERS)]."""
        d, k = self.mixture(g)
        K, ids = self.per_row[d], self.ids
        stats = np.zeros(len(COUNTERS), np.int64)
        rng = np.random.default_rng([self.seed, g])
        segments, images = [], []
        room, budget = self.seq_len, self.num_images
        for j in range(K):
            ex = RawExample("?", "?", [])
            try:
                ex = self.sources[d][self.example_index(d, k * K + j)]
                if self.kinds[d] == "pairs":
                    tokens, imgs = self._pair(ex)
                else:
                    tokens, imgs = self._document(ex, d, stats)
            except (BadExample, FormatError) as e:
                if isinstance(e, FormatError):
                    e = BadExample("malformed", str(e))
                stats[_C["attempted"]] += 1
                stats[_C["skipped"]] += 1
                self._count(stats, d, ex, e)
                continue
            n_image_tokens = tokens.count(ids.image)
            if n_image_tokens != len(imgs):
                raise RuntimeError(f"{ex.shard} {ex.id}: {n_image_tokens} <image> tokens for {len(imgs)} images")
            if len(tokens) <= room and len(imgs) <= budget:
                seg = np.asarray(tokens, np.int32)
            elif not segments:  # only a long document can fail to fit an empty row
                seg, first, n = window(np.asarray(tokens), room, budget, self.seq_len, ids, rng)
                imgs = imgs[first : first + n]
                stats[_C["truncated"]] += 1
            else:
                break  # left for another epoch: never split an example across rows
            stats[_C["attempted"]] += 1
            segments.append(seg)
            images += imgs
            room -= len(seg)
            budget -= len(imgs)
            if budget == 0 or room < 6:  # 6 tokens: the shortest example, <s><fake><image><fake>x</s>
                break
        row = pack(segments, self.seq_len, self.num_images, ids, self.image_tokens_are_targets, self.use_segment_ids)
        pixel_values = np.zeros((self.num_images, 3, self.image_size, self.image_size), np.float32)
        for n, img in enumerate(images):
            pixel_values[n] = image_array(img, self.image_size)
        stats[_C["rows"]] = 1
        stats[_C["examples"]] = len(segments)
        stats[_C["images"]] = len(images)
        stats[_C["tokens"]] = int(row["attention_mask"].sum())
        row.update(pixel_values=pixel_values, dataset_id=np.int32(d), stats=stats)
        return row


class _LocalBatch:
    """Training step's data step → this process's rows stacked (picklable Grain map function)."""

    def __init__(self, builder: RowBuilder, global_batch: int, first_row: int, rows: int):
        self.builder, self.global_batch, self.first_row, self.rows = builder, global_batch, first_row, rows

    def __call__(self, data_step: int) -> dict[str, np.ndarray]:
        base = data_step * self.global_batch + self.first_row
        rows = [self.builder(base + r) for r in range(self.rows)]
        out = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
        check_batch({k: v for k, v in out.items() if k != "stats"}, self.builder.cfg, self.rows)
        return out


class _DataSteps:
    """Training step → data step, skipping the configured ranges (picklable)."""

    def __init__(self, skip_steps):
        self.ranges = [(int(a), int(b)) for a, b in skip_steps]

    def __call__(self, step: int) -> int:
        d = step
        for a, b in self.ranges:
            if d >= a:
                d += b - a
        return d


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
    """Grain workers ignore SIGTERM/SIGINT: a scheduler signals the whole process group (SLURM's
    job-step SIGTERM), and the trainer — not its workers — decides when to stop; it saves a
    checkpoint, then shuts the workers down itself."""
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Pipeline:
    """This process's share of the global batches, by training step.

    Args:
      cfg: the `data` config (`default_config()`), validated here.
      process_index, process_count: this JAX process among all; each builds global rows
        [process_index · B/P, (process_index+1) · B/P) of every step.

    Use `next(pipeline)` (or iterate) for consecutive steps from `state()["step"]` with Grain
    workers, `batch(step)` for one step built in this process. Workers are spawned processes: the
    program's entry point needs the usual `if __name__ == "__main__":` guard. Batches are dicts of numpy arrays
    as `data.schema.BATCH` defines them, with B = global_batch_size / process_count rows.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
        if cfg.global_batch_size % process_count:
            raise ValueError(
                f"data.global_batch_size={cfg.global_batch_size} is not divisible by process_count={process_count}"
            )
        self.cfg = cfg
        self.builder = RowBuilder(cfg)
        self.dataset_names = self.builder.names
        self.local_batch_size = cfg.global_batch_size // process_count
        self._local = _LocalBatch(
            self.builder, cfg.global_batch_size, process_index * self.local_batch_size, self.local_batch_size
        )
        self.data_step = _DataSteps(cfg.skip_steps)
        self._step = 0
        self._iter = None
        self._counters = np.zeros((len(self.dataset_names), len(COUNTERS)), np.int64)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of training step `step`, built here (no workers, counters untouched)."""
        out = self._local(self.data_step(step))
        out.pop("stats")
        return out

    def _dataset(self, start_step: int):
        ds = grain.MapDataset.range(start_step, start_step + 10**12).map(self.data_step).map(self._local)
        it = ds.to_iter_dataset(
            # Grain caps the threads in use at the buffer size, hence at least read_threads.
            grain.ReadOptions(
                num_threads=self.cfg.read_threads,
                prefetch_buffer_size=max(self.cfg.read_threads, self.cfg.prefetch_batches),
            )
        )
        if self.cfg.worker_count > 0:
            from absl import flags

            # Grain's workers read absl flags; a program that does not run absl.app (pytest, a
            # notebook, our CLI) has not parsed them, and the defaults are what we want.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.cfg.worker_count, per_worker_buffer_size=self.cfg.prefetch_batches
                ),
                worker_init_fn=_ignore_stop_signals,
            )
        return iter(it)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The batch of training step `state()["step"]`; advances the step and the counters, and
        raises RuntimeError when a dataset's skip rate passes data.max_skip_fraction."""
        if self._iter is None:
            self._iter = self._dataset(self._step)
        # A copy out of Grain's shared memory (≈ one batch of pixels, negligible beside a train
        # step) so that batches the caller keeps do not pin worker buffers.
        out = {k: np.array(v) for k, v in next(self._iter).items()}
        np.add.at(self._counters, out["dataset_id"], out.pop("stats"))
        self._step += 1
        self._check_skips()
        return out

    def _check_skips(self) -> None:
        attempted = self._counters[:, _C["attempted"]]
        skipped = self._counters[:, _C["skipped"]]
        for d, name in enumerate(self.dataset_names):
            if (
                attempted[d] >= self.cfg.skip_check_min_examples
                and skipped[d] > self.cfg.max_skip_fraction * attempted[d]
            ):
                reasons = {
                    r: int(self._counters[d, _C[f"skip_{r}"]]) for r in REASONS if self._counters[d, _C[f"skip_{r}"]]
                }
                raise RuntimeError(
                    f"data: dataset {name!r} skipped {skipped[d]} of {attempted[d]} examples "
                    f"({skipped[d] / attempted[d]:.1%}), more than data.max_skip_fraction="
                    f"{self.cfg.max_skip_fraction}; reasons {reasons}. Stopping: fix or drop the dataset "
                    f"(its first bad example per reason is in the log), or raise data.max_skip_fraction."
                )

    def counters(self) -> dict[str, dict[str, int]]:
        """Per dataset, this process's totals since step 0: rows, examples (packed), tokens (real),
        images, attempted, skipped (examples), truncated (documents cut to a window) and
        skip_<reason> (examples, or images dropped from a document, per reason in REASONS)."""
        return {
            name: {c: int(v) for c, v in zip(COUNTERS, self._counters[d])} for d, name in enumerate(self.dataset_names)
        }

    def state(self) -> dict:
        """JSON-able iterator state for the checkpoint: the next training step and the counters."""
        return {"step": self._step, "counters": self.counters()}

    def restore(self, state: dict) -> None:
        """Continues from a `state()`; counters of datasets no longer configured are dropped."""
        self.close()
        self._step = int(state["step"])
        self._counters[:] = 0
        for d, name in enumerate(self.dataset_names):
            for c, v in state.get("counters", {}).get(name, {}).items():
                if c in _C:
                    self._counters[d, _C[c]] = v

    def close(self) -> None:
        """Stops the Grain workers (a later `next()` starts them again from `state()["step"]`)."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "close"):
            it.close()


def pipeline(cfg: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1) -> Pipeline:
    """`Pipeline(cfg, process_index, process_count)`: see there."""
    return Pipeline(cfg, process_index, process_count)
