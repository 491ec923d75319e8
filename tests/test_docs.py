"""The docs stay true to the tree: README.md and docs/*.md link only to files (and headings) that
exist, README stays a front door (≤ 200 lines), and every flag a command line in them shows for
`python -m idefics_jax.train`, `python -m idefics_jax.plan` or `tools/convert_weights.py` is one
that CLI's `--help` lists (each CLI's help is run once, in a subprocess); `--config.a.b=v`
overrides must name fields of the config file the command uses."""

from __future__ import annotations

import functools
import glob
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
PAGES = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
MAX_README_LINES = 200

FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`]+)`")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)((?:\.[\w-]+)*)(?:=([^\s\]\"'`]*))?")
# The CLIs whose flags are checked, as they appear in a command line (convert: a subcommand follows).
CLIS = {
    "train": re.compile(r"python -m idefics_jax\.train\b"),
    "plan": re.compile(r"python -m idefics_jax\.plan\b"),
    "convert": re.compile(r"python tools/convert_weights\.py\b"),
}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def _anchors(path: str) -> set[str]:
    prose = FENCE.sub("", _read(path))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", prose, re.M)}


def test_readme_is_a_front_door():
    lines = _read(README).count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; at most {MAX_README_LINES} (move detail to docs/)"


def test_every_docs_page_is_linked_from_readme():
    linked = {os.path.normpath(os.path.join(ROOT, t.split("#")[0])) for t in LINK.findall(FENCE.sub("", _read(README)))}
    missing = [_rel(p) for p in PAGES[1:] if os.path.normpath(p) not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_relative_links_resolve():
    bad = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", _read(page))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(dest):
                bad.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
                bad.append(f"{_rel(page)}: {target} (no heading #{anchor} in {_rel(dest)})")
    assert not bad, "broken links:\n" + "\n".join(bad)


def _command_lines(text: str) -> list[str]:
    """Command lines in fenced blocks (backslash continuations joined) and in inline code spans."""
    out = []
    for block in FENCE.findall(text):
        body = re.sub(r"\\\n", " ", block)
        out += body.splitlines()[1:-1]
    out += [" ".join(span.split()) for span in INLINE.findall(FENCE.sub("", text))]
    return out


def _invocations() -> list[tuple[str, str, str]]:
    """(page, cli, the command from the CLI's name to the end of the command) for every checked CLI."""
    found = []
    for page in PAGES:
        for line in _command_lines(_read(page)):
            for cli, pattern in CLIS.items():
                for m in pattern.finditer(line):
                    command = re.split(r"\s#\s|\s&&\s|;", line[m.start() :])[0]
                    found.append((_rel(page), cli, command))
    return found


def _help_flags(argv: list[str]) -> set[str]:
    proc = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    text = proc.stdout + proc.stderr
    # absl's --help exits 1 after printing; argparse's exits 0.
    assert proc.returncode in (0, 1) and "--help" in text, f"{argv} --help failed:\n{text[-3000:]}"
    flags = set(re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", text))
    for name in re.findall(r"--\[no\]([\w-]+)", text):  # absl booleans: --x and --nox
        flags |= {name, "no" + name}
    return flags


@functools.cache
def _cli_flags(cli: str, sub: str = "") -> frozenset[str]:
    argv = {
        "train": ["-m", "idefics_jax.train"],
        "plan": ["-m", "idefics_jax.plan"],
        "convert": ["tools/convert_weights.py", *([sub] if sub else [])],
    }[cli]
    return frozenset(_help_flags(argv))


def test_docs_show_the_checked_clis():
    clis = {cli for _, cli, _ in _invocations()}
    assert clis == set(CLIS), f"expected command lines for every checked CLI in the docs, found {sorted(clis)}"


def test_flags_shown_exist_in_the_cli_help():
    bad = []
    for page, cli, command in _invocations():
        sub = ""
        if cli == "convert":
            words = command.split()
            sub = words[2] if len(words) > 2 and not words[2].startswith("-") else ""
        known = _cli_flags(cli, sub)
        for m in FLAG.finditer(command):
            name = m.group(1)
            if name not in known:
                bad.append(f"{page}: `{command}`: --{name} is not in `{cli} {sub} --help`".replace("  ", " "))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("cli", ["train", "plan"])
def test_config_overrides_shown_name_config_fields(cli):
    from idefics_jax import run_config

    bad, checked = [], 0
    for page, found_cli, command in _invocations():
        if found_cli != cli:
            continue
        config = re.search(r"--config[ =]([\w./-]+\.py)", command)
        overrides = [
            f"{m.group(2)[1:]}={m.group(3) or ''}"
            for m in FLAG.finditer(command)
            if m.group(1) == "config" and m.group(2)
        ]
        if not config or not overrides or not os.path.exists(os.path.join(ROOT, config.group(1))):
            continue
        checked += 1
        try:
            run_config.load(os.path.join(ROOT, config.group(1)), overrides)
        except run_config.ConfigError as e:
            bad.append(f"{page}: `{command}`: {e}")
    assert checked, f"no {cli} command line with --config.a.b=v overrides was found to check"
    assert not bad, "\n".join(bad)
