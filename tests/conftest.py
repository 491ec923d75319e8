"""Test-wide setup: single CPU device, float32 matmuls at full precision, configs loadable by path."""

import os

import jax
import pytest
from testlib import ROOT, load_config  # noqa: F401  (re-exported: tests import them from conftest)

jax.config.update("jax_default_matmul_precision", "highest")

# Compiled programs are cached on disk across tests and the subprocesses they start (trainer runs
# recompile the same step many times); set before any compilation.
CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "idefics_jax", "jax-test-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# tests/multidevice needs its own process (the fake device count is fixed at backend start):
# tests/test_multidevice.py runs it; `IDEFICS_TEST_DEVICES=8 python -m pytest tests/multidevice` alone.
collect_ignore = [] if os.environ.get("IDEFICS_TEST_DEVICES") else ["multidevice"]


@pytest.fixture
def repo_root():
    return ROOT
