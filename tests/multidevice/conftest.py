"""Multi-device tests: ordinary test functions on fake CPU devices.

The device count must be fixed before JAX creates its CPU backend, so these tests run in their own
pytest invocation (tests/test_multidevice.py starts it as part of the main suite; to run them alone:
`IDEFICS_TEST_DEVICES=8 python -m pytest tests/multidevice`).
"""

import os

from idefics_jax.distributed import fake_cpu_env

DEVICES = int(os.environ.get("IDEFICS_TEST_DEVICES", "8"))
os.environ.update(fake_cpu_env(os.environ, DEVICES))

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def fake_devices():
    assert jax.device_count() == DEVICES, (
        f"{jax.device_count()} devices: the backend started before XLA_FLAGS was set; run this directory "
        "in its own pytest invocation"
    )
