"""The benchmark tasks: which files each reads (as its publisher distributes them), its prompt, how it
is decoded and scored.

Each task reads `DATA` (the `--data` directory) into a train split (where demonstrations come from)
and a test split (what is scored). Expected trees:

    coco         dataset_coco.json (Karpathy split: train+restval / test), images at <filepath>/<filename>
                 (train2014/, val2014/)
    flickr30k    dataset_flickr30k.json (Karpathy split: train / test), images in flickr30k-images/
    vqav2        v2_OpenEnded_mscoco_{train2014,val2014}_questions.json,
                 v2_mscoco_{train2014,val2014}_annotations.json, train2014/, val2014/ (COCO images)
    okvqa        OpenEnded_mscoco_{train2014,val2014}_questions.json,
                 mscoco_{train2014,val2014}_annotations.json, train2014/, val2014/
    textvqa      TextVQA_0.5.1_{train,val}.json, train_images/<image_id>.jpg
    vizwiz       train.json, val.json (VizWiz VQA annotations), train/, val/
    hateful_memes  train.jsonl, dev_seen.jsonl, img/ (the paths in the jsonl's "img")
    imagenet     train/<wnid>/*, val/<wnid>/* (folder per class), LOC_synset_mapping.txt
                 ("<wnid> <name>[, <other names>]" per line; the first name is the class name)

Every problem with these files (missing, malformed JSON, missing fields) is a `UserError` naming the
file and the problem.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable

from idefics_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Example:
    """One benchmark item.

    id: the publisher's id (question id, image id, meme id, file name).
    image: path of its image.
    text: the question (VQA) or the meme's text (Hateful Memes); "" otherwise.
    target: what a demonstration shows after its prompt: a caption, the most common answer, a class
      name, "yes"/"no".
    references: what a prediction is scored against: all captions / all human answers; () otherwise.
    label: class index (ImageNet), 1 = hateful (Hateful Memes); -1 otherwise.
    """

    id: str | int
    image: str
    text: str = ""
    target: str = ""
    references: tuple[str, ...] = ()
    label: int = -1


@dataclasses.dataclass(frozen=True)
class Split:
    """A task's data: `train` (demonstrations), `test` (scored), `classes` (candidate answers of the
    log-likelihood tasks, in label order; () for generation tasks)."""

    train: list[Example]
    test: list[Example]
    classes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Task:
    """How a task is read, prompted, decoded and scored.

    kind: 'caption' (generate, CIDEr), 'vqa' (generate, VQA accuracy), 'binary' (log-likelihood of
      two answers, ROC AUC), 'rank' (log-likelihood of every class name, length-normalised, top-1).
    prompt: (example, with its target?) → the text that follows the example's image.
    max_new_tokens: the generation budget (generation tasks).
    """

    name: str
    kind: str
    read: Callable[[str], Split]
    prompt: Callable[[Example, bool], str]
    max_new_tokens: int = 0
    metric: str = ""


def _caption_prompt(ex: Example, with_target: bool) -> str:
    return f"Caption: {ex.target}" if with_target else "Caption:"


def _vqa_prompt(ex: Example, with_target: bool) -> str:
    return f"Question: {ex.text} Answer: {ex.target}" if with_target else f"Question: {ex.text} Answer:"


def _meme_prompt(ex: Example, with_target: bool) -> str:
    head = f"is an image with: '{ex.text}' written on it. Is it hateful? Answer:"
    return f"{head} {ex.target}" if with_target else head


def _class_prompt(ex: Example, with_target: bool) -> str:
    return f"Output: {ex.target}" if with_target else "Output:"


# Readers -----------------------------------------------------------------------------------------


def _load_json(path: str, jsonl: bool = False):
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found")
    try:
        with open(path, encoding="utf-8") as f:
            if jsonl:
                return [json.loads(line) for line in f if line.strip()]
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: malformed JSON ({e})") from None


def _field(record, key: str, path: str, where: str):
    try:
        return record[key]
    except (KeyError, TypeError, IndexError):
        raise UserError(f"{path}: {where} has no {key!r} field") from None


def _karpathy(name: str, default_dir: str, train_splits: tuple[str, ...]) -> Callable[[str], Split]:
    def read(data: str) -> Split:
        path = os.path.join(data, f"dataset_{name}.json")
        images = _field(_load_json(path), "images", path, "the file")
        train, test = [], []
        for i, img in enumerate(images):
            where = f"images[{i}]"
            split = _field(img, "split", path, where)
            caps = tuple(_field(s, "raw", path, f"{where}.sentences") for s in _field(img, "sentences", path, where))
            if not caps:
                raise UserError(f"{path}: {where} has no sentences")
            ex = Example(
                id=img.get("cocoid", img.get("imgid", i)),
                image=os.path.join(data, img.get("filepath", default_dir), _field(img, "filename", path, where)),
                target=caps[0].strip(),
                references=caps,
            )
            if split in train_splits:
                train.append(ex)
            elif split == "test":
                test.append(ex)
        return Split(train, test)

    return read


def _most_common(answers: list[str]) -> str:
    return collections.Counter(answers).most_common(1)[0][0]


def _vqa_files(prefix_q: str, prefix_a: str) -> Callable[[str], Split]:
    """VQAv2 / OK-VQA: questions + annotations json per COCO subset; train2014 → train, val2014 → test."""

    def read_subset(data: str, subset: str) -> list[Example]:
        qpath = os.path.join(data, f"{prefix_q}_{subset}_questions.json")
        apath = os.path.join(data, f"{prefix_a}_{subset}_annotations.json")
        questions = _field(_load_json(qpath), "questions", qpath, "the file")
        annotations = _field(_load_json(apath), "annotations", apath, "the file")
        by_id = {}
        for i, a in enumerate(annotations):
            answers = [
                _field(x, "answer", apath, f"annotations[{i}].answers")
                for x in _field(a, "answers", apath, f"annotations[{i}]")
            ]
            if not answers:
                raise UserError(f"{apath}: annotations[{i}] has no answers")
            by_id[_field(a, "question_id", apath, f"annotations[{i}]")] = (a.get("multiple_choice_answer"), answers)
        out = []
        for i, q in enumerate(questions):
            qid = _field(q, "question_id", qpath, f"questions[{i}]")
            if qid not in by_id:
                raise UserError(f"{apath}: no annotation for question_id {qid} of {qpath}")
            best, answers = by_id[qid]
            image_id = _field(q, "image_id", qpath, f"questions[{i}]")
            out.append(
                Example(
                    id=qid,
                    image=os.path.join(data, subset, f"COCO_{subset}_{image_id:012d}.jpg"),
                    text=_field(q, "question", qpath, f"questions[{i}]"),
                    target=best or _most_common(answers),
                    references=tuple(answers),
                )
            )
        return out

    return lambda data: Split(read_subset(data, "train2014"), read_subset(data, "val2014"))


def _textvqa(data: str) -> Split:
    def read(split: str) -> list[Example]:
        path = os.path.join(data, f"TextVQA_0.5.1_{split}.json")
        out = []
        for i, r in enumerate(_field(_load_json(path), "data", path, "the file")):
            answers = list(_field(r, "answers", path, f"data[{i}]"))
            if not answers:
                raise UserError(f"{path}: data[{i}] has no answers")
            out.append(
                Example(
                    id=_field(r, "question_id", path, f"data[{i}]"),
                    image=os.path.join(data, "train_images", f"{_field(r, 'image_id', path, f'data[{i}]')}.jpg"),
                    text=_field(r, "question", path, f"data[{i}]"),
                    target=_most_common(answers),
                    references=tuple(answers),
                )
            )
        return out

    return Split(read("train"), read("val"))


def _vizwiz(data: str) -> Split:
    def read(split: str) -> list[Example]:
        path = os.path.join(data, f"{split}.json")
        records = _load_json(path)
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a list of questions")
        out = []
        for i, r in enumerate(records):
            answers = [_field(a, "answer", path, f"[{i}].answers") for a in _field(r, "answers", path, f"[{i}]")]
            if not answers:
                raise UserError(f"{path}: [{i}] has no answers")
            name = _field(r, "image", path, f"[{i}]")
            out.append(
                Example(
                    id=name,
                    image=os.path.join(data, split, name),
                    text=_field(r, "question", path, f"[{i}]"),
                    target=_most_common(answers),
                    references=tuple(answers),
                )
            )
        return out

    return Split(read("train"), read("val"))


def _hateful_memes(data: str) -> Split:
    def read(name: str) -> list[Example]:
        path = os.path.join(data, name)
        out = []
        for i, r in enumerate(_load_json(path, jsonl=True)):
            label = int(_field(r, "label", path, f"line {i + 1}"))
            out.append(
                Example(
                    id=_field(r, "id", path, f"line {i + 1}"),
                    image=os.path.join(data, _field(r, "img", path, f"line {i + 1}")),
                    text=_field(r, "text", path, f"line {i + 1}"),
                    target="yes" if label else "no",
                    label=label,
                )
            )
        return out

    return Split(read("train.jsonl"), read("dev_seen.jsonl"), classes=("no", "yes"))


def _imagenet(data: str) -> Split:
    path = os.path.join(data, "LOC_synset_mapping.txt")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found")
    names = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if line.strip():
                wnid, _, rest = line.strip().partition(" ")
                if not rest:
                    raise UserError(f"{path}: line {n + 1}: expected '<wnid> <class name>'")
                names[wnid] = rest.split(",")[0].strip()
    wnids = sorted(names)

    def read(split: str) -> list[Example]:
        root = os.path.join(data, split)
        if not os.path.isdir(root):
            raise UserError(f"{root}: not found (expected a folder per class)")
        out = []
        for d in sorted(os.listdir(root)):
            if d not in names:
                raise UserError(f"{root}/{d}: class folder not in {path}")
            label = wnids.index(d)
            out += [
                Example(id=f"{d}/{f}", image=os.path.join(root, d, f), target=names[d], label=label)
                for f in sorted(os.listdir(os.path.join(root, d)))
            ]
        return out

    return Split(read("train"), read("val"), classes=tuple(names[w] for w in wnids))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("coco", "caption", _karpathy("coco", "", ("train", "restval")), _caption_prompt, 20, "CIDEr"),
        Task(
            "flickr30k", "caption", _karpathy("flickr30k", "flickr30k-images", ("train",)), _caption_prompt, 20, "CIDEr"
        ),
        Task("vqav2", "vqa", _vqa_files("v2_OpenEnded_mscoco", "v2_mscoco"), _vqa_prompt, 5, "VQA accuracy"),
        Task("okvqa", "vqa", _vqa_files("OpenEnded_mscoco", "mscoco"), _vqa_prompt, 5, "VQA accuracy"),
        Task("textvqa", "vqa", _textvqa, _vqa_prompt, 10, "VQA accuracy"),
        Task("vizwiz", "vqa", _vizwiz, _vqa_prompt, 5, "VQA accuracy"),
        Task("hateful_memes", "binary", _hateful_memes, _meme_prompt, 0, "ROC AUC"),
        Task("imagenet", "rank", _imagenet, _class_prompt, 0, "top-1"),
    )
}


def get(name: str) -> Task:
    """The task called `name`; UserError listing the known ones otherwise."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]
