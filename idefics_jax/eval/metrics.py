"""The official metrics of the few-shot benchmarks.

- `vqa_accuracy(prediction, answers)`: the VQA challenge's accuracy for one question, as the official
  evaluation computes it (GT-Vision-Lab / Cloud-CV `vqaEval.py`, the version OpenFlamingo ships):
  answers and prediction have newlines/tabs turned into spaces and are stripped; only when the human
  answers disagree (more than one distinct string) are they and the prediction normalised
  (punctuation, number words → digits, articles dropped, contractions restored). The score is
  min(1, matches / 3) over each of the ten leave-one-out subsets of the human answers, averaged.
  (When all humans gave the same string nothing is normalised: "two" does not match ten "2"s —
  that is the official behaviour, kept on purpose.)
- `cider(predictions, references)`: CIDEr-D from `pycocoevalcap` (its `Cider` scorer on captions
  tokenized by its `PTBTokenizer`, which runs Stanford CoreNLP in Java), ×100 as papers report.
- `roc_auc(scores, labels)`: area under the ROC curve (ties count one half), for Hateful Memes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from idefics_jax.errors import UserError

# The official evaluation's tables (vqaEval.py), with ASCII apostrophes as in the Cloud-CV version.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern: "(?!<=\d)" is a (harmless) typo for a look-behind; kept so results are identical.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # Punctuation next to a space (or any "1,000"-style number in the answer) is deleted,
        # otherwise it becomes a space ("black-white" → "black white").
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official answer normalisation: punctuation, then lower case, number words → digits,
    articles dropped, contractions restored ("a Dog." → "dog", "two" → "2", "dont" → "don't")."""
    return _digits_articles(_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against the human answers (ten in VQAv2), in [0, 1].

    Mean over the leave-one-out subsets of `answers` of min(1, matches in the subset / 3); the
    normalisation is applied as the official evaluation applies it (see the module docstring).
    """
    if not answers:
        raise ValueError("vqa_accuracy: no reference answers")
    gts = [_clean(a) for a in answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    # Leave-one-out by position: "other answers" are all but this one (equal strings stay in).
    matches = sum(g == pred for g in gts)
    return float(np.mean([min(1.0, (matches - (g == pred)) / 3.0) for g in gts]))


def cider_unavailable() -> str | None:
    """Why `cider` cannot run on this machine (pycocoevalcap not installed, or no `java` on PATH for
    its PTB tokenizer), as one sentence; None when it can."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "CIDEr needs pycocoevalcap: pip install 'idefics-jax[eval]' (and Java on PATH)"
    if shutil.which("java") is None:
        return "CIDEr's PTB tokenizer runs Java: install a JRE (e.g. apt-get install default-jre)"
    return None


def cider(predictions: Mapping, references: Mapping) -> float:
    """CIDEr-D ×100 of one caption per id against its reference captions, through pycocoevalcap.

    Args:
      predictions: id → generated caption.
      references: id → list of reference captions (the same ids).
    Both are tokenized by pycocoevalcap's PTBTokenizer (Java); the document frequencies are those
    of the references given, as in the COCO caption evaluation.
    """
    reason = cider_unavailable()
    if reason is not None:
        raise UserError(reason)
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(predictions) != set(references):
        raise ValueError("cider: predictions and references must have the same ids")
    if not predictions:
        raise ValueError("cider: no captions")
    tok = PTBTokenizer()
    with _stderr_shown_only_on_failure():
        gts = tok.tokenize({k: [{"caption": c} for c in references[k]] for k in references})
        res = tok.tokenize({k: [{"caption": predictions[k]}] for k in predictions})
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)


@contextlib.contextmanager
def _stderr_shown_only_on_failure() -> Iterator[None]:
    """Holds back what is written to file descriptor 2 (CoreNLP, a Java child process, prints "PTBTokenizer
    tokenized N tokens at ..." there on every call) and writes it out only if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve ×100: the probability that a random positive scores above a random
    negative, ties counting one half (the Mann-Whitney statistic; equals sklearn's roc_auc_score)."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        raise ValueError("roc_auc: needs at least one positive and one negative example")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return 100.0 * float((greater + 0.5 * ties) / (len(pos) * len(neg)))
