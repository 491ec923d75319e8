"""Runs tests/multidevice (ordinary test functions on 8 fake CPU devices) in its own pytest process:
the fake device count must be set before JAX starts its backend, which this process has done."""

import os
import subprocess
import sys

from conftest import ROOT


def test_multidevice_suite():
    env = dict(os.environ, IDEFICS_TEST_DEVICES="8")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "multidevice")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
