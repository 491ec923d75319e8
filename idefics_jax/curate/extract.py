"""Stage `extract`: WARC `response` records (or `.html` files) → interleaved web documents.

Parser: selectolax's Lexbor backend. It is a C HTML5 parser (the WHATWG tree-building algorithm,
so malformed pages get the tree a browser would build), an order of magnitude faster than
BeautifulSoup/lxml on web pages, and exposes text nodes and elements in DOM order, which is all the
extraction needs (resiliparse would also do; selectolax has wheels everywhere and no native deps).

Extraction follows OBELICS's DOM simplification, in one pass over the tree in page order:
  * removed with their subtree: comments, `config.extract.drop_tags` (scripts, styles, forms, nav,
    header/footer, iframes …), elements hidden by `style="display:none"` or `hidden`, ARIA roles
    of page furniture, and elements whose class/id has a boilerplate token (cookie banners, ads,
    comment threads, sidebars, OBELICS's `footer`/`site-info` css rules); `html`, `body`, `main`
    and `article` are never removed for their class (a theme's `<body class="has-sidebar">`);
  * inline tags (a, span, b, em …) are unwrapped: their text joins the surrounding paragraph;
  * a block tag (p, div, li, h1…, br …) ends a paragraph; whitespace is normalised; consecutive
    paragraphs form one text position separated by blank lines (OBELICS's merge of text nodes);
  * `<img>` (src, else data-src/lazy-src) becomes an image position with its absolute URL
    (page URL or `<base href>`), alt text kept in metadata; data: URIs and non-http(s) are dropped.

Bytes are decoded with the HTTP header's charset, else a `<meta charset>`, else UTF-8, else
cp1252 (never fails). Truncated WARC files and non-HTML records are skipped and counted.
"""

from __future__ import annotations

import codecs
import re
from urllib.parse import urldefrag, urljoin, urlsplit

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from idefics_jax.curate.config import ExtractConfig
from idefics_jax.curate.docs import FilesReader, image, set_nodes, shard_name

BLOCK_TAGS = frozenset(
    [
        "address",
        "article",
        "blockquote",
        "br",
        "dd",
        "div",
        "dl",
        "dt",
        "figcaption",
        "figure",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "li",
        "main",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "tr",
        "ul",
        "caption",
        "center",
        "details",
        "summary",
        "body",
        "html",
    ]
)
_FURNITURE_ROLES = frozenset(("navigation", "banner", "contentinfo", "complementary", "search", "dialog", "alert"))
_NEVER_BY_CLASS = frozenset(("html", "body", "main", "article"))
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.I)
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_\-:.]+)", re.I)
_TOKEN_SPLIT = re.compile(r"[\s_\-]+")


def decode_html(body: bytes, content_type: str = "") -> tuple[str, str]:
    """Page bytes → (text, encoding used). Declared charsets first (HTTP header, then `<meta>` in
    the first 4 KiB), then UTF-8, then cp1252 with replacement, which always succeeds."""
    declared = [m.group(1) for m in [_HEADER_CHARSET.search(content_type or "")] if m]
    declared += [m.group(1).decode("ascii", "ignore") for m in [_META_CHARSET.search(body[:4096])] if m]
    for enc in [*declared, "utf-8"]:
        try:
            codecs.lookup(enc)
            return body.decode(enc), enc.lower()
        except (LookupError, UnicodeDecodeError):
            continue
    return body.decode("cp1252", errors="replace"), "cp1252"


def _furniture(node, cfg: ExtractConfig) -> bool:
    attrs = node.attributes
    if node.tag in cfg.drop_tags or "hidden" in attrs:
        return True
    if attrs.get("aria-hidden") == "true" or (attrs.get("role") or "").lower() in _FURNITURE_ROLES:
        return True
    style = (attrs.get("style") or "").replace(" ", "").lower()
    if "display:none" in style or "visibility:hidden" in style:
        return True
    if node.tag in _NEVER_BY_CLASS:
        return False
    tokens = set(cfg.boilerplate_tokens)
    for key in ("class", "id"):
        value = (attrs.get(key) or "").lower()
        if value and (set(value.split()) & tokens or set(_TOKEN_SPLIT.split(value)) & tokens):
            return True
    return False


def _image_url(node, base: str) -> str | None:
    attrs = node.attributes
    src = next((attrs[k] for k in ("src", "data-src", "data-lazy-src") if attrs.get(k)), None)
    if not src or src.strip().startswith("data:"):
        return None
    url = urldefrag(urljoin(base, src.strip()))[0]
    return url if urlsplit(url).scheme in ("http", "https") else None


def extract_nodes(html: str, url: str, cfg: ExtractConfig) -> tuple[list, list]:
    """HTML → (texts, media) in page order (docs.set_nodes layout): texts has a str per text
    position and None per image; media one docs.image per image."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    base = url
    if (b := tree.css_first("base[href]")) is not None:
        base = urljoin(url, b.attributes.get("href") or "")
    root = tree.body or tree.root
    if root is None:
        return [], []
    texts, media, paragraphs, buf = [], [], [], []

    def end_paragraph():
        text = " ".join("".join(buf).split())
        buf.clear()
        if len(text) >= cfg.min_paragraph_chars:
            paragraphs.append(text)

    def end_text():
        end_paragraph()
        if paragraphs:
            texts.append("\n\n".join(paragraphs))
            paragraphs.clear()

    # Explicit stack (pages nest thousands deep): (node, True) enters it, (node, False) leaves a block.
    stack = [(root, True)]
    while stack:
        node, entering = stack.pop()
        if not entering:
            end_paragraph()
            continue
        tag = node.tag
        if tag == "-text":
            buf.append(node.text(deep=False) or "")
            continue
        if tag.startswith("-") or _furniture(node, cfg):
            continue  # comments, doctype, and removed elements
        if tag == "img":
            if (src := _image_url(node, base)) is not None:
                end_text()
                texts.append(None)
                media.append(image(src, " ".join((node.attributes.get("alt") or "").split())))
            continue
        if tag in BLOCK_TAGS:
            end_paragraph()
            stack.append((node, False))
        stack.extend((child, True) for child in reversed(list(node.iter(include_text=True))))
    end_text()
    return texts, media


class WebPageReader(FilesReader):
    """WARC files (`.warc`, `.warc.gz`; `response` records with an HTML payload) or `.html`
    files → one Document per page with the decoded HTML as `text` and url/date metadata. A
    truncated or corrupt file ends at the first unreadable record (counted as `truncated_files`)."""

    name = "🕷 web pages"

    def read_file(self, path: str):
        if path.endswith((".html", ".htm")):
            with open(path, "rb") as f:
                html, enc = decode_html(f.read())
            self.stat_update("pages")
            yield Document(
                text=html,
                id=path,
                metadata={"url": "file://" + path, "date": "", "shard": shard_name(path), "encoding": enc},
            )
            return
        from warcio.archiveiterator import ArchiveIterator

        shard = shard_name(path)
        with open(path, "rb") as f:
            try:
                for record in ArchiveIterator(f):
                    if record.rec_type != "response":
                        continue
                    ctype = record.http_headers.get_header("Content-Type", "") if record.http_headers else ""
                    if "html" not in ctype.lower():
                        self.stat_update("not_html")
                        continue
                    body = record.content_stream().read()
                    if getattr(record.raw_stream, "limit", 0) > 0:
                        # warcio hands out a record cut by the end of the file as it is; the bytes
                        # its Content-Length promised and did not deliver tell.
                        raise EOFError(f"record {record.rec_headers.get_header('WARC-Target-URI')} is cut short")
                    html, enc = decode_html(body, ctype)
                    headers = record.rec_headers
                    self.stat_update("pages")
                    meta = {
                        "url": headers.get_header("WARC-Target-URI"),
                        "date": headers.get_header("WARC-Date") or "",
                        "shard": shard,
                        "encoding": enc,
                    }
                    yield Document(
                        text=html, id=headers.get_header("WARC-Record-ID") or f"{path}#{record.offset}", metadata=meta
                    )
            except Exception as e:  # warcio raises several types on a cut or corrupt file
                self.stat_update("truncated_files")
                from datatrove.utils.logging import logger

                logger.warning(f"{path}: unreadable after this point ({type(e).__name__}: {e}); rest of file skipped")


class ExtractWebDocument(PipelineStep):
    """Decoded HTML → interleaved web document (module docstring). Pages with nothing left are
    dropped (`empty`)."""

    name = "🧹 extract"
    type = "🔻 - EXTRACTOR"

    def __init__(self, cfg: ExtractConfig):
        super().__init__()
        self.cfg = cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for doc in data or ():
            with self.track_time():
                try:
                    texts, media = extract_nodes(doc.text, doc.metadata["url"], self.cfg)
                except Exception:  # a parser failure on one page must not stop the crawl
                    self.stat_update("parse_error")
                    continue
            if not any(t is not None for t in texts) and not media:
                self.stat_update("empty")
                continue
            self.stat_update("documents")
            self.stat_update("images", value=len(media))
            yield set_nodes(doc, texts, media)
