"""A synthetic crawl for tests and benchmarks: realistic pages packed in WARC files, and an
img2dataset-style image store.

`build(out_dir, articles=6)` writes
  * `warc/crawl-00000.warc.gz` …: article pages (navigation, cookie banner, header, ads, a comments
    section, footer around an article with inline images, a site logo, an author paragraph repeated
    across the domain), plus one each of: a page whose images are broken (missing from the store,
    corrupt, 10×10, 3:1), a near-duplicate repost of article 0 on another domain, a recrawl of
    article 1 (same URL, later date, one more sentence), a page with article 2's images, a
    boilerplate-only page, a French page, a page with 40 images, a cp1252 page declared by
    `<meta charset>`, malformed HTML, and a non-HTML (PDF) record;
    with `truncated=True` one more WARC file cut in the middle of its second record;
  * `images/00000.tar`: the images as img2dataset writes them ({key}.jpg, {key}.json with the url),
    and with `truncated=True` a corrupt `00001.tar`.
Returns paths and `facts`: the marker sentences and URLs tests assert on. Texts are made of
English stopwords and made-up words, so they pass OBELICS's filters without repeating n-grams.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import uuid

from PIL import Image

_STOP = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "from",
    "have",
    "or",
    "by",
]
_FRENCH = [
    "le",
    "la",
    "les",
    "de",
    "des",
    "et",
    "un",
    "une",
    "est",
    "dans",
    "pour",
    "sur",
    "avec",
    "qui",
    "que",
    "pas",
    "plus",
]
_SYL = ["ka", "lo", "mi", "ne", "ru", "ta", "ve", "zo", "pa", "si", "do", "fe", "gu", "ha", "ji", "bo", "ce"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(3, 4)))


def sentence(rng: random.Random, stop=_STOP, n: int = 12) -> str:
    """About half stopwords, half made-up words, so stopword and repetition filters pass."""
    ws = [rng.choice(stop) if i % 2 else _word(rng) for i in range(n)]
    return " ".join(ws).capitalize() + "."


def paragraph(rng: random.Random, stop=_STOP, sentences: int = 3) -> str:
    return " ".join(sentence(rng, stop) for _ in range(sentences))


def jpeg(rng: random.Random, size=(200, 160), fmt="JPEG") -> bytes:
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


_FURNITURE_HEAD = """<nav class="main-nav"><a href="/">Home</a> | <a href="/about">About us</a> | <a href="/contact">Contact</a></nav>
<div class="cookie-banner">We use cookies to improve your experience. Accept all cookies?</div>
<header><h2>The Daily Site</h2></header>"""
_FURNITURE_TAIL = """<div class="ad-slot"><img src="/ads/banner.jpg" alt="ad"> Buy now and save big on everything</div>
<section id="comments"><h3>Comments</h3><p>Great post, thanks for sharing this with us all!</p></section>
<footer>Copyright 2024 The Daily Site. All rights reserved.</footer>"""
FURNITURE_TEXTS = ("About us", "cookies", "The Daily Site", "Buy now", "Great post", "Copyright 2024")


def _page(title: str, body: str, charset: str = "utf-8") -> str:
    return (
        f'<!DOCTYPE html><html><head><meta charset="{charset}"><title>{title}</title>'
        f"<script>var tracking = 'x';</script><style>p {{color: red}}</style></head>"
        f'<body class="has-sidebar">{_FURNITURE_HEAD}<article><h1>{title}</h1>{body}</article>'
        f"<!-- comment: do not extract -->{_FURNITURE_TAIL}</body></html>"
    )


def _site_menu(kib: int) -> str:
    """About `kib` KiB of site menu (nested lists of links), the bulk of a real page's markup."""
    items, size, k = [], 0, 0
    while size < kib * 1024:
        item = f'<li class="menu-item"><a href="/section/{k}/">Section {k}</a><ul><li><a href="/section/{k}/a">Sub {k}</a></li></ul></li>'
        items.append(item)
        size += len(item)
        k += 1
    return f'<div class="site-menu"><ul>{"".join(items)}</ul></div>'


def build(
    out_dir: str, articles: int = 6, seed: int = 0, truncated: bool = True, warc_files: int = 2, page_kib: int = 0
) -> dict:
    """Writes the crawl under `out_dir` (module docstring); returns {warc, images, facts}.
    `page_kib` > 0 pads each article page with that much site menu (real pages average tens of
    KiB of HTML, most of it markup the extraction discards; benchmarks use it)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    rng = random.Random(seed)
    images: dict[str, bytes] = {}
    pages: list[tuple[str, bytes, str, str]] = []  # (url, body, content type, date)
    facts: dict = {"articles": {}, "author": paragraph(rng, sentences=2)}

    def img(url: str, data: bytes | None = None) -> str:
        images[url] = data if data is not None else jpeg(rng)
        return url

    logo = img("https://news.example.com/static/logo.jpg")
    img("https://news.example.com/ads/banner.jpg")  # in the store, but inside an ad: never extracted
    for i in range(articles):
        paras = [f"Marker article {i} begins here. " + paragraph(rng) for _ in range(3)]
        urls = [img(f"https://cdn.example.com/a{i}/{k}.jpg") for k in range(2)]
        caption = paragraph(rng, sentences=1)
        body = (
            f'<p><img src="/static/logo.jpg" alt="logo">{paras[0]}</p><figure><img src="{urls[0]}" alt="first {i}">'
            f'<figcaption>{caption}</figcaption></figure><p>{paras[1]}</p><img data-src="{urls[1]}">'
            f"<p>{paras[2]}</p><p>{facts['author']}</p>"
        )
        url = f"https://news.example.com/2024/article-{i}.html"
        html = (
            _page(f"Article {i}", body).replace("<article>", _site_menu(page_kib) + "<article>", 1)
            if page_kib
            else _page(f"Article {i}", body)
        )
        pages.append((url, html.encode(), "text/html; charset=utf-8", "2024-01-01T00:00:00Z"))
        facts["articles"][url] = {"paragraphs": paras, "caption": caption, "images": urls, "logo": logo}
    a0, a1, a2 = list(facts["articles"])[:3]
    # near-duplicate repost of article 0 on another domain: same text but one sentence, own images
    a = facts["articles"][a0]
    repost = list(a["paragraphs"])
    repost[1] = repost[1].replace("Marker article 0", "Reposted article 0")
    urls = [img(f"https://blog.example.org/r/{k}.jpg") for k in range(2)]
    body = (
        f'<p>{repost[0]}</p><img src="{urls[0]}"><p>{a["caption"]}</p><p>{repost[1]}</p><img src="{urls[1]}">'
        f"<p>{repost[2]}</p><p>{facts['author']}</p>"
    )
    facts["repost"] = "https://blog.example.org/repost.html"
    pages.append((facts["repost"], _page("Repost", body).encode(), "text/html", "2024-01-02T00:00:00Z"))
    # recrawl of article 1: same URL, later date, one more sentence
    facts["recrawl_marker"] = "Updated on the second crawl " + sentence(rng)
    body = "".join(f"<p>{p}</p>" for p in facts["articles"][a1]["paragraphs"])
    body += f'<img src="{facts["articles"][a1]["images"][0]}"><p>{facts["recrawl_marker"]}</p>'
    pages.append((a1, _page("Article 1", body).encode(), "text/html", "2024-03-01T00:00:00Z"))
    # another page with exactly article 2's images
    facts["same_images"] = "https://other.example.net/gallery.html"
    body = "".join(f'<p>{paragraph(rng)}</p><img src="{u}">' for u in facts["articles"][a2]["images"])
    pages.append((facts["same_images"], _page("Gallery", body).encode(), "text/html", "2024-01-01T00:00:00Z"))
    # broken images: missing, corrupt, tiny, 4:1; one good image keeps the page
    facts["broken"] = "https://news.example.com/broken.html"
    good = img("https://cdn.example.com/broken/good.jpg")
    img("https://cdn.example.com/broken/corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    img("https://cdn.example.com/broken/tiny.png", jpeg(rng, (10, 10), "PNG"))
    img("https://cdn.example.com/broken/wide.jpg", jpeg(rng, (600, 200)))
    body = (
        "".join(
            f'<p>{paragraph(rng)}</p><img src="https://cdn.example.com/broken/{n}">'
            for n in ("missing.jpg", "corrupt.jpg", "tiny.png", "wide.jpg")
        )
        + f'<img src="{good}"><p>{paragraph(rng)}</p>'
    )
    facts["broken_marker"] = body[3:40]
    pages.append((facts["broken"], _page("Broken images", body).encode(), "text/html", "2024-01-01T00:00:00Z"))
    # boilerplate only
    pages.append(("https://news.example.com/empty.html", _page("", "").encode(), "text/html", "2024-01-01T00:00:00Z"))
    # French
    facts["french"] = "https://fr.example.fr/article.html"
    body = "".join(
        f'<p>{paragraph(rng, _FRENCH)}</p><img src="{img(f"https://fr.example.fr/{k}.jpg")}">' for k in range(2)
    )
    pages.append((facts["french"], _page("Article", body, "utf-8").encode(), "text/html", "2024-01-01T00:00:00Z"))
    # 40 images
    facts["many_images"] = "https://news.example.com/gallery-40.html"
    body = f"<p>{paragraph(rng)}</p>" + "".join(
        f'<img src="{img(f"https://cdn.example.com/g/{k}.jpg")}">' for k in range(40)
    )
    pages.append((facts["many_images"], _page("Gallery", body).encode(), "text/html", "2024-01-01T00:00:00Z"))
    # cp1252 declared by <meta charset>
    facts["cp1252"] = "https://news.example.com/cafe.html"
    facts["cp1252_text"] = "Le café naïve is " + sentence(rng)
    body = f'<p>{facts["cp1252_text"]} {paragraph(rng)}</p><img src="{img("https://cdn.example.com/cafe.jpg")}"><p>{paragraph(rng)}</p>'
    pages.append(
        (facts["cp1252"], _page("Café", body, "windows-1252").encode("cp1252"), "text/html", "2024-01-01T00:00:00Z")
    )
    # malformed HTML: unclosed tags, stray end tags, no </body></html>
    facts["malformed"] = "https://news.example.com/malformed.html"
    facts["malformed_text"] = "Malformed page text " + sentence(rng)
    html = (
        f"<html><body><div><p>{facts['malformed_text']} {paragraph(rng)}<p><b>{paragraph(rng)}</div></span>"
        f'<img src="{img("https://cdn.example.com/malformed.jpg")}"><p>{paragraph(rng)}<table><tr><td>'
    )
    pages.append((facts["malformed"], html.encode(), "text/html", "2024-01-01T00:00:00Z"))
    # a PDF
    pages.append(("https://news.example.com/file.pdf", b"%PDF-1.4 binary", "application/pdf", "2024-01-01T00:00:00Z"))

    # a WARC file cut inside its second record: the first page survives
    facts["truncated_survivor"] = "https://news.example.com/before-the-cut.html"
    cut_pages = [
        (
            facts["truncated_survivor"],
            _page(
                "Before",
                f'<p>{paragraph(rng)}</p><img src="{img("https://cdn.example.com/cut.jpg")}"><p>{paragraph(rng)}</p>',
            ).encode(),
        ),
        (
            "https://news.example.com/cut-in-half.html",
            _page("Cut", "".join(f"<p>{paragraph(rng)}</p>" for _ in range(40))).encode(),
        ),
    ]

    warc_dir, img_dir = os.path.join(out_dir, "warc"), os.path.join(out_dir, "images")
    os.makedirs(warc_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)

    def write_warc(path, records):
        with open(path, "wb") as f:
            writer = WARCWriter(f, gzip=True)
            for url, body, ctype, date in records:
                headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
                rid = f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128))}>"
                record = writer.create_warc_record(
                    url, "response", payload=io.BytesIO(body), http_headers=headers,
                    warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": rid},
                )  # fmt: skip
                writer.write_record(record)

    for w in range(warc_files):
        write_warc(os.path.join(warc_dir, f"crawl-{w:05d}.warc.gz"), pages[w::warc_files])
    if truncated:
        path = os.path.join(warc_dir, "crawl-99999-truncated.warc.gz")
        write_warc(path, [(u, b, "text/html", "2024-01-01T00:00:00Z") for u, b in cut_pages])
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) * 3 // 4])
    with tarfile.open(os.path.join(img_dir, "00000.tar"), "w") as tar:
        for k, (url, data) in enumerate(sorted(images.items())):
            for name, payload in ((f"{k:09d}.jpg", data), (f"{k:09d}.json", json.dumps({"url": url}).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
    if truncated:
        with open(os.path.join(img_dir, "00001.tar"), "wb") as f:
            f.write(b"this is not a tar file" * 50)
    return {"warc": os.path.join(warc_dir, "*.warc.gz"), "images": os.path.join(img_dir, "*.tar"), "facts": facts}
