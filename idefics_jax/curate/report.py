"""`report`: what each stage read, kept and removed, from datatrove's per-task stats.

Counters are summed over DIR/logs/<stage>/stats/<task>.json (one file per completed task, so a
resumed run's numbers are whole). The table goes to stdout and DIR/report.txt, a bar chart of the
removals to DIR/report.png, with examples of removed text from DIR/filtered/_removed/.
"""

from __future__ import annotations

import collections
import glob
import json
import os

from idefics_jax.errors import UserError

# datatrove executors (stages.build names) in pipeline order.
EXECUTORS = (
    "extract",
    "image_index",
    "images",
    "filter",
    "dedup_signatures",
    "dedup_buckets",
    "dedup_image_sets",
    "dedup_decide",
    "write",
)
# Counters that are removals (the chart and the "removed" column).
_REMOVAL_PREFIXES = (
    "node_",
    "doc_",
    "image_",
    "removed_",
    "dup_",
    "near_",
    "paragraph",
    "not_html",
    "truncated",
    "empty",
    "parse_error",
    "store_corrupt",
)


def load(out: str) -> dict[str, dict[str, dict[str, int]]]:
    """{executor: {step name: {counter: total}}} over the completed tasks."""
    result = {}
    for name in EXECUTORS:
        steps: dict[str, collections.Counter] = {}
        for path in sorted(glob.glob(os.path.join(out, "logs", name, "stats", "*.json"))):
            with open(path) as f:
                for step in json.load(f):
                    c = steps.setdefault(step["name"], collections.Counter())
                    for label, value in step["stats"].items():
                        c[label] += value["total"] if isinstance(value, dict) else value
        if steps:
            result[name] = {k: dict(v) for k, v in steps.items()}
    return result


def _count(stats: dict, executor: str, counter: str) -> int:
    return sum(c.get(counter, 0) for c in stats.get(executor, {}).values())


def summary(out: str) -> str:
    """A few lines: documents after each stage and the kept fraction."""
    s = load(out)
    pages = _count(s, "extract", "pages")
    rows = [
        (label, _count(s, executor, counter))
        for label, executor, counter in (
            ("pages read", "extract", "pages"),
            ("web documents extracted", "extract", "documents_written"),
            ("with images resolved", "images", "documents_written"),
            ("after text filters", "filter", "documents_written"),
            ("after dedup (written)", "write", "documents_written"),
            ("images written", "write", "images_written"),
        )
        if executor in s  # stages that have not run are left out
    ]
    lines = [f"  {k:<26} {v:>10,}" for k, v in rows]
    if pages and "write" in s:
        lines.append(f"  {'kept fraction of pages':<26} {_count(s, 'write', 'documents_written') / pages:>10.1%}")
    return "curation summary (" + out + ")\n" + "\n".join(lines)


def removed_examples(out: str) -> dict[str, list[str]]:
    examples: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(out, "filtered", "_removed", "*.json"))):
        with open(path) as f:
            for kind, texts in json.load(f).items():
                examples[kind] += texts
    return dict(examples)


def main(out: str, png: bool = True) -> str:
    """Prints the report of DIR, writes DIR/report.txt (and DIR/report.png); returns the text."""
    stats = load(out)
    if not stats:
        raise UserError(f"{out}: no stage has completed a task (no {out}/logs/<stage>/stats/*.json)")
    lines = [summary(out), "", f"{'stage':<17} {'step':<22} {'counter':<32} {'value':>10}"]
    removals = {}
    for executor, steps in stats.items():
        for step, counters in steps.items():
            for counter, value in sorted(counters.items()):
                lines.append(f"{executor:<17} {step.split(': ', 1)[-1]:<22} {counter:<32} {value:>10,}")
                if counter.startswith(_REMOVAL_PREFIXES) and counter != "image_kept":
                    removals[f"{executor}: {counter}"] = removals.get(f"{executor}: {counter}", 0) + value
    with open(os.path.join(out, "config.json")) as f:
        from idefics_jax.curate.config import from_dict
        from idefics_jax.curate.filters import models_off

        if off := models_off(from_dict(json.load(f)).filter):
            lines += ["", "filters off (no file given): " + ", ".join(off)]
    if examples := removed_examples(out):
        lines += ["", "examples of removed text:"]
        for kind in sorted(examples):
            for text in examples[kind][:3]:
                lines.append(f"  {kind:<26} {' '.join(text.split())[:100]!r}")
    text = "\n".join(lines)
    with open(os.path.join(out, "report.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    if png and removals:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = sorted(removals, key=removals.get)
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(names) + 1.2))
        ax.barh(names, [removals[n] for n in names])
        ax.set_xlabel("removed (documents, paragraphs or images)")
        ax.set_title("curation: removals by filter")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "report.png"), dpi=100)
        plt.close(fig)
    return text
