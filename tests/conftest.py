"""Test-wide setup: single CPU device, float32 matmuls at full precision, configs loadable by path."""

import importlib.util
import os

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
    """`configs/<name>.py`'s get_config()."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture
def repo_root():
    return ROOT
