"""The bundled tiny dataset: every input format plus a small BPE tokenizer, generated in seconds.

    python -m idefics_jax.data.tiny OUT_DIR

writes under OUT_DIR

    tokenizer/                    HF tokenizer directory (AutoTokenizer loads it): byte-level BPE,
                                  <unk>=0 <s>=1 </s>=2, base vocab TINY_VOCAB_SIZE, then
                                  <fake_token_around_image>=TINY_VOCAB_SIZE, <image>=TINY_VOCAB_SIZE+1
    obelics/docs-0000{0,1}.parquet  OBELICS layout (texts/images list columns, metadata); shard 0 holds
                                  inline JPEG bytes, shard 1 paths relative to obelics/ (obelics/images/)
    docs_tar/docs-00000.tar       m4 WebDataset documents ({id}.{i}.text.txt / {id}.{i}.image.jpeg)
    pairs_tar/pairs-00000.tar     m4 WebDataset pairs ({id}.image.jpeg + {id}.text.txt)
    pairs_parquet/pairs-00000.parquet  pairs as parquet (image bytes, text)
    heldout/{docs,pairs}-00000.parquet  a held-out split (new documents and pairs) for evaluation

and, built separately by `eval_tasks(dir)` (so the training data above is unchanged by it), under
OUT_DIR/eval-v{_EVAL_VERSION}:

    coco/dataset_coco.json, coco/{train2014,val2014}/   a captioning task in COCO's Karpathy format
    vqav2/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json, v2_mscoco_*_annotations.json,
    vqav2/{train2014,val2014}/   a VQA task in VQAv2's format ("What colour is the shape?",
                                 "What shape is this?", ten identical human answers)
    fewshot/docs-00000.parquet   OBELICS-layout documents written in the few-shot prompt format
                                 (configs/tiny.py trains on them so that the tasks are learnable)

Every image is a coloured shape on a plain background and every caption / following sentence names
the colour and the shape, so a model trained on it can only lower its loss on those words by
looking at the image: the loss falling below the text-only floor is the sign that cross-attention
learns. Nothing here is committed: configs and tests call `ensure(dir)`, which builds the dataset
once (atomically, so parallel test processes do not collide) and returns the paths.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile

import ml_collections
from PIL import Image, ImageDraw

# Bumped whenever the generated content changes, so stale caches are rebuilt.
_VERSION = "2"
TINY_VOCAB_SIZE = 512  # base vocabulary; the two image tokens come right after it

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
BACKGROUNDS = {"grey": (128, 128, 128), "pink": (250, 190, 200), "brown": (120, 80, 40)}
SHAPES = ("circle", "square", "triangle", "cross")

_CAPTIONS = (
    "a {c} {s}",
    "a {c} {s} on a {b} background",
    "a picture of a {c} {s}",
    "this is a {c} {s}",
    "a small {c} {s} drawn on {b}",
)
_AFTER_IMAGE = (
    "The image above shows a {c} {s}.",
    "In this picture we see a {c} {s} on {b}.",
    "It is a {c} {s}.",
    "Look at the {c} {s}.",
)
_FILLER = (
    "Shapes and colours are simple things to learn.",
    "Our collection of drawings keeps growing every week.",
    "Each drawing was made by hand with a single brush.",
    "Visitors often ask which one is their favourite.",
    "The next section describes another drawing in detail.",
    "We hope you enjoy reading about these pictures.",
    "Some of the pictures are bright, others are dark.",
    "This page is part of a larger gallery of examples.",
)

N_DOCS_PARQUET = 60  # per parquet shard (two shards)
N_DOCS_TAR = 60
N_PAIRS = 200  # per pair format
N_HELDOUT = 40  # documents and pairs each, in the held-out split


def draw(rng: random.Random, size: tuple[int, int] | None = None) -> tuple[Image.Image, dict]:
    """Draws one coloured shape on a plain background.

    Args:
      rng: the random source (so that the dataset is a pure function of the seed).
      size: (width, height); random in [28, 56] per side when None.
    Returns:
      (RGB PIL image, {"c": colour name, "s": shape name, "b": background name}).
    """
    w, h = size or (rng.randint(28, 56), rng.randint(28, 56))
    c, s, b = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (w, h), BACKGROUNDS[b])
    d = ImageDraw.Draw(img)
    m = min(w, h)
    cx, cy, r = w / 2, h / 2, m * 0.35
    box = (cx - r, cy - r, cx + r, cy + r)
    if s == "circle":
        d.ellipse(box, fill=COLOURS[c])
    elif s == "square":
        d.rectangle(box, fill=COLOURS[c])
    elif s == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[c])
    else:
        t = max(2, int(r / 3))
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=COLOURS[c])
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=COLOURS[c])
    return img, {"c": c, "s": s, "b": b}


def jpeg(img: Image.Image) -> bytes:
    """Encodes an image as JPEG bytes (quality 90)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _document(rng: random.Random) -> list[tuple[str | None, bytes | None]]:
    """One web document: 1-3 images, each followed by a sentence naming its colour and shape,
    with filler paragraphs around. Returns (text, image) positions, exactly one non-None each."""
    items: list[tuple[str | None, bytes | None]] = [(rng.choice(_FILLER), None)]
    for _ in range(rng.randint(1, 3)):
        img, attrs = draw(rng)
        items.append((None, jpeg(img)))
        items.append((rng.choice(_AFTER_IMAGE).format(**attrs), None))
        if rng.random() < 0.5:
            items.append((" ".join(rng.sample(_FILLER, 2)), None))
    return items


def _pair(rng: random.Random) -> tuple[bytes, str]:
    img, attrs = draw(rng)
    return jpeg(img), rng.choice(_CAPTIONS).format(**attrs)


def _write_docs_parquet(path: str, docs, image_dir: str | None, first_id: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, images, metadata = [], [], []
    for k, doc in enumerate(docs):
        doc_id = first_id + k
        texts.append([t for t, _ in doc])
        row = []
        for i, (_, im) in enumerate(doc):
            if im is None or image_dir is None:
                row.append(im)
            else:  # store the image as a file and reference it relative to the dataset root
                name = f"images/{doc_id}_{i}.jpg"
                with open(os.path.join(image_dir, os.path.basename(name)), "wb") as f:
                    f.write(im)
                row.append(name)
        images.append(row)
        metadata.append(json.dumps({"document_url": f"https://example.com/doc/{doc_id}"}))
    img_type = pa.list_(pa.string() if image_dir else pa.binary())
    table = pa.table(
        {
            "texts": pa.array(texts, pa.list_(pa.string())),
            "images": pa.array(images, img_type),
            "metadata": pa.array(metadata, pa.string()),
        }
    )
    # Small row groups: the reader fetches one row group per random access.
    pq.write_table(table, path, row_group_size=16)


def _write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def _train_tokenizer(corpus: list[str], out_dir: str) -> None:
    """Trains a byte-level BPE of TINY_VOCAB_SIZE tokens on `corpus` and saves it as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],  # LLaMA's ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Like LLaMA's tokenizer: add_special_tokens=True prepends <s> (the processor passes False
    # and writes <s> itself, as transformers' IdeficsProcessor does).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if tok.get_vocab_size() != TINY_VOCAB_SIZE:
        raise RuntimeError(
            f"tiny tokenizer: trained {tok.get_vocab_size()} tokens, expected {TINY_VOCAB_SIZE}; "
            "the generated corpus is too small for that many merges"
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",  # as in HuggingFaceM4/idefics-9b: LLaMA has no pad token
        padding_side="left",
    )
    hf.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>"]})
    hf.save_pretrained(out_dir)


def generate(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Writes the whole tiny dataset into `out_dir` (created; must not hold an older one).

    Returns the same dict as `paths(out_dir)`.
    """
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    corpus: list[str] = []

    obelics = os.path.join(out_dir, "obelics")
    os.makedirs(os.path.join(obelics, "images"), exist_ok=True)
    for shard in range(2):
        docs = [_document(rng) for _ in range(N_DOCS_PARQUET)]
        corpus += [t for d in docs for t, _ in d if t]
        _write_docs_parquet(
            os.path.join(obelics, f"docs-{shard:05d}.parquet"),
            docs,
            os.path.join(obelics, "images") if shard == 1 else None,
            first_id=shard * N_DOCS_PARQUET,
        )

    members = []
    for k in range(N_DOCS_TAR):
        doc = _document(rng)
        for i, (t, im) in enumerate(doc):
            if t is not None:
                corpus.append(t)
                members.append((f"d{k:05d}.{i}.text.txt", t.encode()))
            else:
                members.append((f"d{k:05d}.{i}.image.jpeg", im))
    os.makedirs(os.path.join(out_dir, "docs_tar"), exist_ok=True)
    _write_tar(os.path.join(out_dir, "docs_tar", "docs-00000.tar"), members)

    members = []
    for k in range(N_PAIRS):
        im, cap = _pair(rng)
        corpus.append(cap)
        members += [(f"p{k:05d}.image.jpeg", im), (f"p{k:05d}.text.txt", cap.encode())]
    os.makedirs(os.path.join(out_dir, "pairs_tar"), exist_ok=True)
    _write_tar(os.path.join(out_dir, "pairs_tar", "pairs-00000.tar"), members)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [_pair(rng) for _ in range(N_PAIRS)]
    corpus += [c for _, c in pairs]
    os.makedirs(os.path.join(out_dir, "pairs_parquet"), exist_ok=True)
    pq.write_table(
        pa.table({"image": pa.array([p[0] for p in pairs], pa.binary()), "text": [p[1] for p in pairs]}),
        os.path.join(out_dir, "pairs_parquet", "pairs-00000.parquet"),
        row_group_size=16,
    )

    # Drawn after every training example, so the training split is unchanged by its existence.
    heldout = os.path.join(out_dir, "heldout")
    os.makedirs(heldout, exist_ok=True)
    _write_docs_parquet(
        os.path.join(heldout, "docs-00000.parquet"), [_document(rng) for _ in range(N_HELDOUT)], None, first_id=10**6
    )
    pairs = [_pair(rng) for _ in range(N_HELDOUT)]
    pq.write_table(
        pa.table({"image": pa.array([p[0] for p in pairs], pa.binary()), "text": [p[1] for p in pairs]}),
        os.path.join(heldout, "pairs-00000.parquet"),
        row_group_size=16,
    )

    # Every template with every word, so the BPE has enough material for its merges.
    corpus += [
        t.format(c=c, s=s, b=b) for t in _CAPTIONS + _AFTER_IMAGE for c in COLOURS for s in SHAPES for b in BACKGROUNDS
    ]
    corpus += list(_FILLER) * 20
    _train_tokenizer(corpus, os.path.join(out_dir, "tokenizer"))
    return paths(out_dir)


def paths(out_dir: str) -> dict[str, str]:
    """Paths of the tiny dataset's parts under `out_dir` (globs for the shards)."""
    return {
        "root": out_dir,
        "tokenizer": os.path.join(out_dir, "tokenizer"),
        "obelics": os.path.join(out_dir, "obelics", "*.parquet"),
        "docs_tar": os.path.join(out_dir, "docs_tar", "*.tar"),
        "pairs_tar": os.path.join(out_dir, "pairs_tar", "*.tar"),
        "pairs_parquet": os.path.join(out_dir, "pairs_parquet", "*.parquet"),
        "heldout_docs": os.path.join(out_dir, "heldout", "docs-*.parquet"),
        "heldout_pairs": os.path.join(out_dir, "heldout", "pairs-*.parquet"),
    }


def default_dir() -> str:
    """Where `ensure()` puts the dataset by default: $IDEFICS_JAX_CACHE/tiny-v{version}, else
    ~/.cache/idefics_jax/tiny-v{version}."""
    base = os.environ.get("IDEFICS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "idefics_jax"))
    return os.path.join(base, f"tiny-v{_VERSION}")


def ensure(out_dir: str | None = None) -> dict[str, str]:
    """Builds the tiny dataset in `out_dir` (default `default_dir()`) unless it is already there.

    Generation happens in a sibling temporary directory renamed into place, so concurrent callers
    (parallel test processes) never see a half-written dataset. Returns `paths(out_dir)`.
    """
    out_dir = os.path.abspath(out_dir or default_dir())
    marker = os.path.join(out_dir, f"COMPLETE-v{_VERSION}")
    if not os.path.exists(marker):
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
        try:
            generate(tmp)
            open(os.path.join(tmp, f"COMPLETE-v{_VERSION}"), "w").close()
            try:
                os.rename(tmp, out_dir)
            except OSError:
                # Another process won the race (or an old, incomplete dir is in the way).
                if not os.path.exists(marker):
                    shutil.rmtree(out_dir, ignore_errors=True)
                    os.rename(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths(out_dir)


_EVAL_VERSION = "1"
N_EVAL_TRAIN = 96  # images in each eval task's train split (demonstrations)
N_EVAL_TEST = 40  # images in each eval task's test split
N_FEWSHOT_DOCS = 400
_QUESTIONS = (("What colour is the shape?", "c"), ("What shape is this?", "s"))


def _eval_images(rng: random.Random, directory: str, subset: str, n: int, first_id: int) -> list[tuple[int, dict]]:
    """Draws `n` images into directory/subset/COCO_{subset}_{id:012d}.jpg; returns (id, attributes)."""
    os.makedirs(os.path.join(directory, subset), exist_ok=True)
    out = []
    for k in range(n):
        img, attrs = draw(rng)
        image_id = first_id + k
        with open(os.path.join(directory, subset, f"COCO_{subset}_{image_id:012d}.jpg"), "wb") as f:
            f.write(jpeg(img))
        out.append((image_id, attrs))
    return out


def _fewshot_document(rng: random.Random) -> list[tuple[str | None, bytes | None]]:
    """One document in the evaluation prompt format: 1-5 demonstrations of one task (captions or
    one of the two questions), each its image then "Caption: …\n" / "Question: … Answer: …\n"; one
    in four starts with two text-only demonstrations, as zero-shot prompts do."""
    question = rng.choice((None, *_QUESTIONS))

    def text(attrs: dict) -> str:
        if question is None:
            return f"Caption: {rng.choice(_CAPTIONS).format(**attrs)}\n"
        return f"Question: {question[0]} Answer: {attrs[question[1]]}\n"

    items: list[tuple[str | None, bytes | None]] = []
    if rng.random() < 0.25:
        items.append(("".join(text(draw(rng)[1]) for _ in range(2)), None))
    for _ in range(rng.randint(1, 5)):
        img, attrs = draw(rng)
        items += [(None, jpeg(img)), (text(attrs), None)]
    return items


def _write_eval_tasks(root: str, seed: int) -> None:
    rng = random.Random(seed)
    coco = os.path.join(root, "coco")
    images = []
    for subset, split, n, first in (("train2014", "train", N_EVAL_TRAIN, 1), ("val2014", "test", N_EVAL_TEST, 10**5)):
        for image_id, attrs in _eval_images(rng, coco, subset, n, first):
            captions = rng.sample(_CAPTIONS, 5)
            images.append(
                {
                    "filepath": subset,
                    "filename": f"COCO_{subset}_{image_id:012d}.jpg",
                    "cocoid": image_id,
                    "split": split,
                    "sentences": [{"raw": c.format(**attrs)} for c in captions],
                }
            )
    with open(os.path.join(coco, "dataset_coco.json"), "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)

    vqa = os.path.join(root, "vqav2")
    for subset, n, first in (("train2014", N_EVAL_TRAIN, 1), ("val2014", N_EVAL_TEST, 10**5)):
        questions, annotations = [], []
        for image_id, attrs in _eval_images(rng, vqa, subset, n, first):
            for q, (text, key) in enumerate(_QUESTIONS):
                qid = image_id * 10 + q
                questions.append({"image_id": image_id, "question": text, "question_id": qid})
                answers = [{"answer": attrs[key], "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]
                annotations.append(
                    {"question_id": qid, "image_id": image_id, "answers": answers, "multiple_choice_answer": attrs[key]}
                )
        with open(os.path.join(vqa, f"v2_OpenEnded_mscoco_{subset}_questions.json"), "w") as f:
            json.dump({"questions": questions, "data_subtype": subset}, f)
        with open(os.path.join(vqa, f"v2_mscoco_{subset}_annotations.json"), "w") as f:
            json.dump({"annotations": annotations, "data_subtype": subset}, f)

    os.makedirs(os.path.join(root, "fewshot"), exist_ok=True)
    docs = [_fewshot_document(rng) for _ in range(N_FEWSHOT_DOCS)]
    _write_docs_parquet(os.path.join(root, "fewshot", "docs-00000.parquet"), docs, None, first_id=2 * 10**6)


def eval_tasks(out_dir: str | None = None, seed: int = 1) -> dict[str, str]:
    """Builds (once, atomically, like `ensure`) the tiny evaluation tasks next to the tiny dataset in
    `out_dir` (default `default_dir()`). Returns {"coco": data dir, "vqav2": data dir, "fewshot":
    parquet glob, "tokenizer": the tiny tokenizer}."""
    p = ensure(out_dir)
    root = os.path.join(p["root"], f"eval-v{_EVAL_VERSION}")
    if not os.path.exists(os.path.join(root, "COMPLETE")):
        tmp = tempfile.mkdtemp(prefix=".eval-", dir=p["root"])
        try:
            _write_eval_tasks(tmp, seed)
            open(os.path.join(tmp, "COMPLETE"), "w").close()
            try:
                os.rename(tmp, root)
            except OSError:  # another process won the race
                if not os.path.exists(os.path.join(root, "COMPLETE")):
                    shutil.rmtree(root, ignore_errors=True)
                    os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "coco": os.path.join(root, "coco"),
        "vqav2": os.path.join(root, "vqav2"),
        "fewshot": os.path.join(root, "fewshot", "*.parquet"),
        "tokenizer": p["tokenizer"],
    }


def config(out_dir: str | None = None, split: str = "train") -> ml_collections.ConfigDict:
    """A complete `data` config over the tiny dataset (built by `ensure(out_dir)`): seq_len 64,
    3 images per sequence, 30-pixel images, global batch 8. split='train' mixes all four formats;
    split='heldout' reads the held-out documents and pairs (same tokenizer)."""
    from idefics_jax.data.pipeline import default_config

    p = ensure(out_dir)
    cfg = default_config()
    cfg.tokenizer_path = p["tokenizer"]
    if split == "train":
        datasets = {
            "docs_parquet": {"kind": "documents", "paths": p["obelics"], "weight": 0.4},
            "docs_tar": {"kind": "documents", "paths": p["docs_tar"], "weight": 0.2},
            "pairs_parquet": {"kind": "pairs", "paths": p["pairs_parquet"], "weight": 0.2},
            "pairs_tar": {"kind": "pairs", "paths": p["pairs_tar"], "weight": 0.2},
        }
    elif split == "heldout":
        datasets = {
            "docs_parquet": {"kind": "documents", "paths": p["heldout_docs"], "weight": 0.5},
            "pairs_parquet": {"kind": "pairs", "paths": p["heldout_pairs"], "weight": 0.5},
        }
    else:
        raise ValueError(f"tiny dataset split={split!r}; expected 'train' or 'heldout'")
    cfg.datasets = ml_collections.ConfigDict(datasets)
    cfg.seq_len = 64
    cfg.max_num_images = 3
    cfg.image_size = 30
    cfg.global_batch_size = 8
    cfg.worker_count = 0
    cfg.min_image_side = 8
    cfg.skip_check_min_examples = 50
    return cfg


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m idefics_jax.data.tiny OUT_DIR")
    for k, v in generate(sys.argv[1]).items():
        print(f"{k}: {v}")
