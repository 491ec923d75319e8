"""Runs tests/multidevice (ordinary test functions on 8 fake CPU devices) in its own pytest process:
the fake device count must be set before JAX starts its backend, which this process has done."""

import os
import subprocess
import sys

from conftest import ROOT


def test_multidevice_suite(tmp_path):
    env = dict(os.environ, IDEFICS_TEST_DEVICES="8")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "multidevice")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        # A process killed by XLA prints its fatal line first and then every thread's traceback
        # (faulthandler), so stderr's head is kept beside the tails; the whole of both is on disk.
        log = tmp_path / "multidevice.log"
        log.write_text(f"rc {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        raise AssertionError(
            f"tests/multidevice exited with {proc.returncode} (full output: {log})\n--- stdout (tail)\n"
            f"{proc.stdout[-6000:]}\n--- stderr (head)\n{proc.stderr[:4000]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"
        )
