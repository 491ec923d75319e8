"""The benchmarks run, at toy sizes, and what they print holds together.

They print figures and assert nothing themselves, so a benchmark broken by a change elsewhere
(a helper's signature, a renamed kernel) would otherwise surface only when someone measures. These
check their output, not their timings: every kernel's error against the float32 reference, the
same first-step loss on both sides of the train-step comparison (and across the interleaved
variants), and a profile that finds the attention code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_attention_benchmark_kernels_match_the_reference():
    out = _run("attention.py", "--batch", "2", "--seq", "80", "--heads", "2", "--head-dim", "8", "--reps", "1")
    rows = re.findall(r"^(causal|packed|cross)\s+(xla|blockwise|cudnn)\s+[\d.]+\s+(.*)$", out, re.M)
    assert {(m, k) for m, k, _ in rows} == {
        (m, k) for m in ("causal", "packed", "cross") for k in ("xla", "blockwise", "cudnn")
    }
    for mask, kernel, errors in rows:
        assert max(float(e) for e in errors.split()) < 1e-6, (mask, kernel, errors)


def test_train_step_benchmark_runs_both_sides_on_the_same_weights():
    out = _run(
        "train_step.py", "--hidden", "64", "--seq", "80", "--layers", "4", "--steps", "1", "--attention", "blockwise"
    )
    ours = re.search(r"idefics_jax step \[blockwise\]: .* first-step loss ([\d.]+)", out)
    theirs = re.search(r"HF \+ torch AdamW: .* first-step loss ([\d.]+)", out)
    assert ours and theirs, out
    assert ours.group(1) == theirs.group(1)
    assert re.search(r"speed-up \[blockwise\] \(ours / HF tokens/s\): train [\d.]+x, forward only", out), out


def test_profile_benchmark_charges_the_attention_kernel():
    out = _run(
        "profile_step.py", "--hidden", "64", "--seq", "80", "--layers", "4", "--steps", "1", "--attention", "blockwise"
    )
    table = dict(re.findall(r"^\| ([a-z/ ]+) \| (\d+) \| \d+% \|$", out, re.M))
    assert {"attention", "matmul", "elementwise"} <= set(table), out
    assert int(table["attention"]) > 0


def test_interleaved_benchmark_times_every_variant_of_one_function():
    out = _run(
        "interleaved.py", "--hidden", "64", "--seq", "80", "--layers", "4", "--steps", "2", "--scan-unroll", "1,4"
    )
    rows = re.findall(r"^scan_unroll (\d+): median \d+ ms, .* first-step loss ([\d.]+); steps", out, re.M)
    assert [u for u, _ in rows] == ["1", "4"], out
    assert rows[0][1] == rows[1][1], out
