"""The rules table and the mesh (the multi-device layout tests are in tests/multidevice)."""

import pytest
from jax.sharding import PartitionSpec as P

from idefics_jax import sharding


def test_rules_drop_axes_that_do_not_divide():
    class FakeMesh:
        shape = {"data": 1, "fsdp": 64, "tensor": 8}  # noqa: RUF012

    # 257 ViT positions cannot split 64 ways: replicate that dimension, keep the other.
    assert sharding.logical_to_spec((None, "vision_embed"), None, (257, 1280), FakeMesh()) == P(None, "fsdp")
    assert sharding.logical_to_spec(("vision_embed", None), None, (257, 1280), FakeMesh()) == P(None, None)
    assert sharding.logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)


def test_make_mesh_errors_name_the_problem():
    import jax

    with pytest.raises(ValueError, match="do not factor"):
        sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 3}, devices=jax.devices() * 1)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
    with pytest.raises(ValueError, match="mesh.tensor=0"):
        sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 0})
    assert dict(sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
