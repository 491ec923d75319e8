"""Helpers shared by test modules (a plain module, not conftest, so tests/multidevice — which has a
conftest of its own — can import it too)."""

import json
import os

from idefics_jax import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, *overrides: str):
    """`configs/<name>.py` through the loader the CLIs use, with "a.b=v" overrides."""
    return run_config.load(os.path.join(ROOT, "configs", f"{name}.py"), overrides)


def records(path) -> list[dict]:
    """The records of a metrics.jsonl."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses(workdir) -> dict[int, float]:
    """step → loss, the last record of each step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in records(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}
