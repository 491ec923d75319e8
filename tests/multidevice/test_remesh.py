"""A checkpoint restores onto another mesh (other device count and layout) and the next step's loss
is the same as on the mesh that saved it — also one whose frozen weights are in the run's frozen
store (a frozen config without init_from: the store is written at the first save)."""

import os
import shutil

import jax
import pytest
from testlib import load_config, losses

from idefics_jax.train.loop import train

FREEZE = ("model.freeze_text_layers=True", "model.freeze_vision_layers=True", "model.freeze_lm_head=True")


def _run(workdir, steps: int, mesh: dict, *overrides: str):
    c = load_config("tiny", "train.eval_every=0", f"train.steps={steps}", "train.checkpoint_every=2", *overrides)
    c.eval_data = None
    c.train.log_every = 100
    c.mesh.update(mesh)
    n = mesh.get("data", 1) * mesh["fsdp"] * mesh.get("tensor", 1)
    train(c, str(workdir), devices=jax.devices()[:n])


@pytest.mark.parametrize(
    "first, second",
    [({"fsdp": 1}, {"fsdp": 2, "tensor": 2}), ({"fsdp": 2, "tensor": 2}, {"fsdp": 1})],
    ids=["1-to-4-devices", "4-to-1-device"],
)
def test_restore_onto_another_mesh_gives_the_same_next_loss(tmp_path, first, second):
    _run(tmp_path / "a", 3, first)  # checkpoints at 2 and 3
    os.makedirs(tmp_path / "b" / "checkpoints")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "2", tmp_path / "b" / "checkpoints" / "2")
    _run(tmp_path / "b", 3, second)  # restores step 2 onto the other mesh, then takes step 3
    same, other = losses(tmp_path / "a")[3], losses(tmp_path / "b")[3]
    assert abs(same - other) <= 1e-6, (same, other)


def test_restore_with_a_frozen_store_onto_another_mesh_gives_the_same_next_loss(tmp_path):
    _run(tmp_path / "a", 3, {"fsdp": 2, "tensor": 2}, *FREEZE)
    os.makedirs(tmp_path / "b" / "checkpoints")
    for name in ("2", "frozen"):  # the step, and the store it references
        shutil.copytree(tmp_path / "a" / "checkpoints" / name, tmp_path / "b" / "checkpoints" / name)
    _run(tmp_path / "b", 3, {"fsdp": 1}, *FREEZE)
    same, other = losses(tmp_path / "a")[3], losses(tmp_path / "b")[3]
    assert abs(same - other) <= 1e-6, (same, other)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2", "3", "frozen"]  # the store reused
