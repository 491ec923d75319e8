"""Every threshold of the curation pipeline, in one place, with OBELICS's values as defaults.

The defaults are those of huggingface/OBELICS `config_filter_web_documents.yaml` (node level =
one paragraph, document level = all the text of a document) and of the OBELICS paper (image URLs
seen more than 10 times dropped). A `--config FILE.json` overrides any subset:

    {"filter": {"stopword_ratio_doc_min": 0.3}, "dedup": {"minhash_threshold": 0.8}}

Unknown sections or fields, and values of the wrong type or out of range, are a `UserError` that
names the field (`filter.stopword_ratio_doc_min`).
"""

from __future__ import annotations

import dataclasses
import json
import os

from idefics_jax.errors import UserError


@dataclasses.dataclass
class ExtractConfig:
    """HTML → web document. `drop_tags`: elements removed with their subtree (OBELICS's
    `strip_tags` plus page furniture). `boilerplate_tokens`: an element whose class or id contains
    one of these tokens (split on space, '-' and '_') is removed with its subtree (OBELICS's
    `css_rules` remove `footer` and `site-info`; cookie banners, ads and comment threads are the
    same kind of furniture). `min_paragraph_chars`: shorter text runs between blocks are dropped
    (lone bullets, '|' separators)."""

    drop_tags: tuple = (
        "script", "style", "noscript", "iframe", "svg", "canvas", "form", "nav", "footer", "header",
        "aside", "button", "input", "select", "textarea", "template", "object", "embed", "video",
        "audio", "map", "dialog", "menu",
    )  # fmt: skip
    boilerplate_tokens: tuple = (
        "cookie", "cookies", "consent", "gdpr", "banner", "ad", "ads", "advert", "advertisement",
        "sponsored", "promo", "sidebar", "comment", "comments", "footer", "site-info", "nav", "navbar",
        "menu", "breadcrumb", "breadcrumbs", "share", "social", "newsletter", "subscribe", "popup",
        "modal", "related", "skip-link",
    )  # fmt: skip
    min_paragraph_chars: int = 2


@dataclasses.dataclass
class ImagesConfig:
    """Image resolution and filters (OBELICS: jpg/jpeg/png/webp, sides 150–20,000 px, aspect
    ratio ≤ 2). `formats` are PIL's format names, lower case."""

    formats: tuple = ("jpeg", "png", "webp")
    min_side: int = 150
    max_side: int = 20_000
    max_aspect_ratio: float = 2.0


@dataclasses.dataclass
class FilterConfig:
    """Text filters; `*_node_*` apply to each paragraph (a failing paragraph is removed),
    `*_doc_*` to the whole text of a document (a failing document is removed). A measure's
    definition is in filters.py. `lid_model` (fastText lid.176.bin), `kenlm_model` (+
    `sentencepiece_model`), `common_words_path`, `flagged_words_path` and `url_blocklist_path` (one entry a line) are files the user brings;
    empty = that filter is off (the report says so)."""

    words_node_min: int = 4
    words_node_max: int = 1_000
    char_rep_len_node: int = 10
    char_rep_node_max: float = 0.1
    word_rep_len_node: int = 5
    word_rep_node_max: float = 0.1
    special_char_node_max: float = 0.3
    stopword_node_min: float = 0.3
    flagged_node_max: float = 0.01
    punctuation_node_min: float = 0.001
    punctuation_node_min_words: int = 12  # shorter paragraphs are not checked for punctuation
    common_word_node_min: float = 0.8
    lang_node_min: float = 0.0  # OBELICS: off at node level
    perplexity_node_max: float = 0.0  # OBELICS: off at node level (0 = off)
    images_doc_min: int = 1
    images_doc_max: int = 30
    words_doc_min: int = 10
    words_doc_max: int = 2_000
    char_rep_len_doc: int = 10
    char_rep_doc_max: float = 0.1
    word_rep_len_doc: int = 5
    word_rep_doc_max: float = 0.2
    special_char_doc_max: float = 0.275
    stopword_doc_min: float = 0.35
    flagged_doc_max: float = 0.01
    punctuation_doc_min: float = 0.03
    common_word_doc_min: float = 0.9
    lang: str = "en"
    lang_doc_min: float = 0.8
    perplexity_doc_max: float = 1500.0
    lid_model: str = ""
    kenlm_model: str = ""
    sentencepiece_model: str = ""
    common_words_path: str = ""
    flagged_words_path: str = ""  # empty = filters.FLAGGED_EN, a short built-in list
    url_blocklist_path: str = ""
    examples_per_filter: int = 3  # removed texts kept per filter and task for the report


@dataclasses.dataclass
class DedupConfig:
    """Deduplication. `max_image_url_count`: an image URL used by more documents than this is
    dropped from all of them (OBELICS: 10; logos, buttons). MinHash over word `shingle`-grams with
    `num_perm` permutations, LSH at Jaccard `minhash_threshold` (not in OBELICS). `partitions`:
    hash partitions of the dedup keys, one decision task each (memory per task ∝ corpus/partitions;
    the output does not depend on it)."""

    max_image_url_count: int = 10
    minhash_threshold: float = 0.8
    num_perm: int = 128
    shingle: int = 5
    seed: int = 1
    partitions: int = 16


@dataclasses.dataclass
class WriteConfig:
    """Final parquet: rows per row group (data.formats reads one row group per access)."""

    row_group_size: int = 16


@dataclasses.dataclass
class CurateConfig:
    extract: ExtractConfig = dataclasses.field(default_factory=ExtractConfig)
    images: ImagesConfig = dataclasses.field(default_factory=ImagesConfig)
    filter: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    write: WriteConfig = dataclasses.field(default_factory=WriteConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Float fields that are not ratios in [0, 1]; every number must be ≥ 0.
_NOT_RATIOS = ("perplexity_node_max", "perplexity_doc_max", "max_aspect_ratio")


def _check(section: str, name: str, default, value):
    where = f"{section}.{name}"
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(f"curate config {where}={value!r}: expected a list of strings")
        return tuple(value)
    if isinstance(default, (bool, str)):
        if type(value) is not type(default):
            raise UserError(f"curate config {where}={value!r}: expected a {type(default).__name__}")
        if isinstance(default, str) and value and name.endswith(("_model", "_path")) and not os.path.isfile(value):
            raise UserError(f"curate config {where}={value!r}: no such file")
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(default, int) and value != int(value))
    ):
        raise UserError(f"curate config {where}={value!r}: expected a {type(default).__name__}")
    if value < (1 if name == "partitions" else 0):  # partitions: at least one decision task
        raise UserError(f"curate config {where}={value!r}: expected ≥ {1 if name == 'partitions' else 0}")
    if isinstance(default, float) and name not in _NOT_RATIOS and value > 1:
        raise UserError(f"curate config {where}={value!r}: expected a ratio in [0, 1]")
    return type(default)(value)


def load(path: str | None = None, overrides: dict | None = None) -> CurateConfig:
    """The defaults, updated from the JSON file `path` and then `overrides` ({section: {field: v}})."""
    cfg = CurateConfig()
    updates: list[dict] = []
    if path:
        try:
            with open(path) as f:
                updates.append(json.load(f))
        except OSError as e:
            raise UserError(f"curate config {path}: cannot read ({e.strerror})") from e
        except json.JSONDecodeError as e:
            raise UserError(f"curate config {path}: not JSON ({e})") from e
    if overrides:
        updates.append(overrides)
    for update in updates:
        if not isinstance(update, dict):
            raise UserError("curate config: expected a JSON object of sections")
        for section, fields in update.items():
            if section not in {f.name for f in dataclasses.fields(cfg)}:
                raise UserError(
                    f"curate config section {section!r}: expected one of extract, images, filter, dedup, write"
                )
            sub = getattr(cfg, section)
            if not isinstance(fields, dict):
                raise UserError(f"curate config {section}: expected an object of fields")
            known = {f.name for f in dataclasses.fields(sub)}
            for name, value in fields.items():
                if name not in known:
                    raise UserError(
                        f"curate config {section}.{name}: unknown field (known: {', '.join(sorted(known))})"
                    )
                setattr(sub, name, _check(section, name, getattr(sub, name), value))
    if cfg.dedup.num_perm < 16 or cfg.dedup.shingle < 1:
        raise UserError("curate config dedup.num_perm must be ≥ 16 and dedup.shingle ≥ 1")
    if cfg.images.min_side > cfg.images.max_side:
        raise UserError("curate config images.min_side > images.max_side")
    return cfg


def from_dict(d: dict) -> CurateConfig:
    """The config saved by `CurateConfig.to_dict` (a stage's copy in its output directory)."""
    return load(overrides=d)
