"""Stage `filter`: OBELICS's node- and document-level text filters (thresholds in config.FilterConfig).

Measures (OBELICS's definitions, huggingface/OBELICS `filtering_utils.py`):
  * words: the text lower-cased, split on whitespace, each word stripped of special characters at
    both ends, empty ones dropped;
  * character repetition (n = `char_rep_len_*`): over the character n-grams, the counts of the
    k most frequent, k = min(⌊√(distinct n-grams)⌋, n-grams seen more than once), over all counts;
  * word repetition (n = `word_rep_len_*`): the share of word n-grams (counted with multiplicity)
    that occur more than once;
  * special characters: share of characters that are punctuation, symbols or digits (Unicode
    categories P*, S*, N*) — whitespace excluded;
  * stopwords / flagged words / common words: share of words in the list (English stopwords built
    in; a short built-in flagged list, or the user's file; common words only from the user's file);
  * punctuation: sentence punctuation marks (. ! ? … and their CJK forms) per word; paragraphs of
    fewer than `punctuation_node_min_words` words are not checked;
  * language: fastText's probability of `lang` (`lid_model`, e.g. lid.176.bin);
  * perplexity: KenLM's perplexity of the text, tokenised with `sentencepiece_model` when given.

A paragraph failing a node-level check is removed (counted `node_<check>`, first failing check
only); then a document failing a doc-level check is removed (`doc_<check>`). The first few removed
texts per check are saved for the report (`DIR/filtered/_removed/<task>.json`).
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import unicodedata
from urllib.parse import urlsplit

from datatrove.pipeline.base import PipelineStep

from idefics_jax.curate.config import FilterConfig
from idefics_jax.curate.docs import set_nodes
from idefics_jax.errors import UserError

STOPWORDS_EN = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "herself",
        "him",
        "himself",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "me",
        "more",
        "most",
        "my",
        "myself",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "ourselves",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "also",
        "may",
        "might",
        "must",
        "shall",
        "one",
    ]
)
# A deliberately short default; pass a real list (one word per line) as filter.flagged_words_path.
FLAGGED_EN = frozenset(
    ["porn", "porno", "xxx", "sex", "sexy", "nude", "nudes", "naked", "hentai", "milf", "camgirl", "escort", "fetish"]
)
_SENTENCE_PUNCTUATION = frozenset(".!?…。！？")


_ASCII_SPECIALS = "".join(chr(c) for c in range(128) if unicodedata.category(chr(c))[0] in "PSN")


def _special(c: str) -> bool:
    return unicodedata.category(c)[0] in "PSN"


@functools.cache
def _drop_specials() -> dict:
    """str.translate table deleting every special character up to U+1FFFF (emoji included)."""
    return dict.fromkeys(c for c in range(0x20000) if _special(chr(c)))


def _strip_special(w: str) -> str:
    # ASCII ends are stripped in C; a non-ASCII end (rare: “quotes”, emoji) is checked by category.
    w = w.strip(_ASCII_SPECIALS)
    while w and not w[0].isascii() and _special(w[0]):
        w = w[1:].strip(_ASCII_SPECIALS)
    while w and not w[-1].isascii() and _special(w[-1]):
        w = w[:-1].strip(_ASCII_SPECIALS)
    return w


def words(text: str) -> list[str]:
    return [w for w in map(_strip_special, text.lower().split()) if w]


def char_repetition(text: str, n: int) -> float:
    counts = sorted(collections.Counter(text[i : i + n] for i in range(len(text) - n + 1)).values(), reverse=True)
    if not counts:
        return 0.0
    k = min(int(math.sqrt(len(counts))), sum(c > 1 for c in counts))
    return sum(counts[:k]) / sum(counts)


def word_repetition(ws: list[str], n: int) -> float:
    counts = collections.Counter(" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)).values()
    total = sum(counts)
    return sum(c for c in counts if c > 1) / total if total else 0.0


def special_ratio(text: str) -> float:
    chars = "".join(text.split())
    return (len(chars) - len(chars.translate(_drop_specials()))) / len(chars) if chars else 0.0


def share(ws: list[str], vocabulary) -> float:
    return sum(w in vocabulary for w in ws) / len(ws) if ws else 0.0


def punctuation_ratio(text: str, ws: list[str]) -> float:
    return sum(c in _SENTENCE_PUNCTUATION for c in text) / len(ws) if ws else 0.0


def _word_list(path: str) -> frozenset:
    with open(path, encoding="utf-8") as f:
        return frozenset(w.strip().lower() for w in f if w.strip())


class Models:
    """The user's fastText language-id and KenLM models, loaded once per task."""

    def __init__(self, cfg: FilterConfig):
        self.lid = self.lm = self.sp = None
        if cfg.lid_model:
            try:
                import fasttext
            except ImportError as e:
                raise UserError(
                    "filter.lid_model is set but fasttext is not installed (pip install fasttext-numpy2-wheel)"
                ) from e
            self.lid = fasttext.load_model(cfg.lid_model)
        if cfg.kenlm_model:
            try:
                import kenlm
            except ImportError as e:
                raise UserError("filter.kenlm_model is set but kenlm is not installed (pip install kenlm)") from e
            self.lm = kenlm.Model(cfg.kenlm_model)
            if cfg.sentencepiece_model:
                import sentencepiece

                self.sp = sentencepiece.SentencePieceProcessor(model_file=cfg.sentencepiece_model)
        self.lang = cfg.lang

    def lang_score(self, text: str) -> float:
        labels, probs = self.lid.predict(" ".join(text.split()), k=-1)
        return dict(zip(labels, probs)).get(f"__label__{self.lang}", 0.0)

    def perplexity(self, text: str) -> float:
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if self.sp is not None:
            lines = [" ".join(self.sp.encode_as_pieces(ln)) for ln in lines]
        log10, n = 0.0, 0
        for ln in lines:
            log10 += self.lm.score(ln)
            n += len(ln.split()) + 1
        return 10.0 ** (-log10 / max(n, 1))


def checks(cfg: FilterConfig, level: str, models: Models, vocab: dict) -> list[tuple[str, object]]:
    """The (name, fails(text, words) → bool) checks of `level` ("node" or "doc") that are on."""
    v = lambda field: getattr(cfg, field.format(level=level))
    out = [
        ("words_min", lambda t, w: len(w) < v("words_{level}_min")),
        ("words_max", lambda t, w: len(w) > v("words_{level}_max")),
        ("char_repetition", lambda t, w: char_repetition(t, v("char_rep_len_{level}")) > v("char_rep_{level}_max")),
        ("word_repetition", lambda t, w: word_repetition(w, v("word_rep_len_{level}")) > v("word_rep_{level}_max")),
        ("special_characters", lambda t, w: special_ratio(t) > v("special_char_{level}_max")),
        ("stopwords", lambda t, w: share(w, STOPWORDS_EN) < v("stopword_{level}_min")),
        ("flagged_words", lambda t, w: share(w, vocab["flagged"]) > v("flagged_{level}_max")),
        (
            "punctuation",
            lambda t, w: (
                (level == "doc" or len(w) >= cfg.punctuation_node_min_words)
                and punctuation_ratio(t, w) < v("punctuation_{level}_min")
            ),
        ),
    ]
    if vocab.get("common"):
        out.append(("common_words", lambda t, w: share(w, vocab["common"]) < v("common_word_{level}_min")))
    if models.lid is not None and v("lang_{level}_min") > 0:
        out.append(("language", lambda t, w: models.lang_score(t) < v("lang_{level}_min")))
    if models.lm is not None and v("perplexity_{level}_max") > 0:
        out.append(("perplexity", lambda t, w: models.perplexity(t) > v("perplexity_{level}_max")))
    return out


def models_off(cfg: FilterConfig) -> list[str]:
    """The optional filters that are off for lack of a user file (said in logs and the report)."""
    return [
        name
        for name, path in (
            ("language id (filter.lid_model)", cfg.lid_model),
            ("perplexity (filter.kenlm_model)", cfg.kenlm_model),
            ("common words (filter.common_words_path)", cfg.common_words_path),
            ("url blocklist (filter.url_blocklist_path)", cfg.url_blocklist_path),
        )
        if not path
    ]


class TextFilters(PipelineStep):
    """Node- then document-level filters (module docstring), and OBELICS's 1–30 images per document."""

    name = "🔍 text filters"
    type = "🔻 - FILTER"

    def __init__(self, cfg: FilterConfig, removed_dir: str):
        super().__init__()
        self.cfg, self.removed_dir = cfg, removed_dir

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datatrove.utils.logging import logger

        cfg = self.cfg
        if off := models_off(cfg):
            logger.info("filters off (no file given): " + ", ".join(off))
        models = Models(cfg)
        vocab = {"flagged": _word_list(cfg.flagged_words_path) if cfg.flagged_words_path else FLAGGED_EN}
        if cfg.common_words_path:
            vocab["common"] = _word_list(cfg.common_words_path)
        blocked = _word_list(cfg.url_blocklist_path) if cfg.url_blocklist_path else frozenset()
        node_checks, doc_checks = checks(cfg, "node", models, vocab), checks(cfg, "doc", models, vocab)
        removed = collections.defaultdict(list)

        def remove(kind: str, text: str):
            self.stat_update(kind)
            if len(removed[kind]) < cfg.examples_per_filter:
                removed[kind].append(text[:500])

        for doc in data or ():
            with self.track_time():
                self.stat_update("documents_in")
                host = (urlsplit(doc.metadata.get("url") or "").hostname or "").lower()
                if blocked and any(host == b or host.endswith("." + b) for b in blocked):
                    remove("doc_url_blocklist", host)
                    continue
                texts = []
                for t in doc.metadata["texts"]:
                    if t is None:
                        texts.append(None)
                        continue
                    kept = []
                    for p in t.split("\n\n"):
                        ws = words(p)
                        failed = next((name for name, fails in node_checks if fails(p, ws)), None)
                        if failed:
                            remove(f"node_{failed}", p)
                        else:
                            kept.append(p)
                    texts.append("\n\n".join(kept))
                set_nodes(doc, texts, doc.media)
                n_images = len(doc.media)
                if not cfg.images_doc_min <= n_images <= cfg.images_doc_max:
                    remove("doc_images_min" if n_images < cfg.images_doc_min else "doc_images_max", doc.text)
                    continue
                ws = words(doc.text)
                failed = next((name for name, fails in doc_checks if fails(doc.text, ws)), None)
                if failed:
                    remove(f"doc_{failed}", doc.text)
                    continue
                self.stat_update("documents_kept")
            yield doc
        os.makedirs(self.removed_dir, exist_ok=True)
        tmp = os.path.join(self.removed_dir, f".{rank:05d}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(removed, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(self.removed_dir, f"{rank:05d}.json"))
