"""Faults an operator meets, each caused the way it happens in a real run, on configs/tiny.py.

Every row of the fault table in docs/faults.md is one test here (or names the test elsewhere):
kill -9, SIGTERM to the process group, torn and corrupt checkpoints, two runs on one workdir, disk
full, bad config values, a changed data order.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from testlib import ROOT, load_config, losses, random_checkpoint, records

import idefics_jax
from idefics_jax import ckpt_format as fmt
from idefics_jax import integrity
from idefics_jax.errors import UserError
from idefics_jax.train import checkpointer as checkpointer_lib
from idefics_jax.train.loop import train

STEPS = ["--config.train.steps=12", "--config.train.checkpoint_every=4", "--config.train.log_every=1"]
# The same run, but long enough that it is still running whatever the machine's load when the test
# acts on it (the learning-rate schedule does not depend on train.steps, so the losses are the same).
LONG = ["--config.train.steps=1000", *STEPS[1:]]


def cli(workdir, *overrides, wait=True, prefix=(), **popen):
    """Runs `python -m idefics_jax.train` on configs/tiny.py (no eval unless asked) in `workdir`, after
    the command words `prefix`; with `wait`, returns (exit code, stdout+stderr), else the Popen."""
    cmd = [*prefix, sys.executable, "-m", "idefics_jax.train", "--config", os.path.join(ROOT, "configs", "tiny.py")]
    no_eval = (
        [] if any(o.startswith("--config.train.eval_every=") for o in overrides) else ["--config.train.eval_every=0"]
    )
    cmd += ["--workdir", str(workdir), *no_eval, *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def ok(workdir, *overrides) -> str:
    rc, out = cli(workdir, *overrides)
    assert rc == 0, out[-3000:]
    return out


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_step(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    return max(losses(workdir), default=0) if os.path.exists(path) else 0


def one_line_error(rc: int, out: str) -> str:
    """The error line of a run that must fail as a user error: exit 1, no traceback."""
    assert rc == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """step → loss of the 12-step run nothing interrupts."""
    workdir = tmp_path_factory.mktemp("straight")
    out = ok(workdir, *STEPS)
    # Quiet start: our first line is the first line (no third-party notices before it).
    assert out.splitlines()[0].startswith("workdir: "), out[:2000]
    return losses(workdir)


FREEZE = ["--config.model.freeze_text_layers=True", "--config.model.freeze_vision_layers=True"]
FREEZE += ["--config.model.freeze_lm_head=True"]


@pytest.fixture(scope="module")
def init_from(tmp_path_factory) -> str:
    """A converted-style checkpoint of the tiny model (other weights than the run's own seed)."""
    path = tmp_path_factory.mktemp("init") / "ckpt"
    random_checkpoint(path, seed=1)
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted_frozen(tmp_path_factory, init_from):
    """(workdir, step → loss) of the 12-step run started from `init_from` with the LLaMA, the ViT and
    the base vocabulary frozen, nothing interrupting it: checkpoints 4, 8, 12 and the frozen store."""
    workdir = tmp_path_factory.mktemp("straight-frozen")
    ok(workdir, *STEPS, *FREEZE, f"--config.train.init_from={init_from}")
    return workdir, losses(workdir)


# Processes: kill -9, two runs, SIGTERM ---------------------------------------------------------------


def test_kill9_during_compile_then_rerun_takes_the_stale_lock_and_is_bit_identical(tmp_path, uninterrupted):
    proc = cli(tmp_path, *STEPS, wait=False)
    wait_for(lambda: os.path.exists(tmp_path / "run.lock"), "the workdir lock")
    proc.kill()  # started, locked, compiling: nothing logged or saved yet
    proc.communicate()
    assert not os.path.exists(tmp_path / "metrics.jsonl") or logged_step(tmp_path) < 12
    out = ok(tmp_path, *STEPS)
    assert "took over the stale workdir lock of host" in out
    assert losses(tmp_path) == uninterrupted


@pytest.mark.parametrize("frozen", [False, True], ids=["all-trainable", "frozen-from-init_from"])
def test_second_run_is_refused_then_kill9_of_the_holder_and_a_rerun_resumes_bit_identical(tmp_path, request, frozen):
    # frozen: the checkpoints hold the trainable half only; the rerun restores the frozen half from
    # the store the first save wrote.
    extra = [*FREEZE, f"--config.train.init_from={request.getfixturevalue('init_from')}"] if frozen else []
    uninterrupted = (
        request.getfixturevalue("uninterrupted_frozen")[1] if frozen else request.getfixturevalue("uninterrupted")
    )
    # The holder evaluates every other step: the kill lands in a step, an evaluation or a save.
    holder = cli(tmp_path, *LONG, *extra, "--config.train.eval_every=2", "--config.train.eval_steps=2", wait=False)
    wait_for(lambda: logged_step(tmp_path) >= 1, "the first run's first step")
    holder.send_signal(signal.SIGSTOP)  # held still while the second run tries, however slowly it starts
    t0 = time.time()
    line = one_line_error(*cli(tmp_path, *STEPS))
    assert time.time() - t0 < 120
    assert f"run.lock is held by another run (host {os.uname().nodename}, pid {holder.pid}" in line, line
    holder.send_signal(signal.SIGCONT)
    verified = tmp_path / "checkpoints" / "4" / "manifest.process_0.json"
    wait_for(lambda: logged_step(tmp_path) >= 6 and os.path.exists(verified), "step 6 and a verified checkpoint 4")
    holder.kill()
    holder.communicate()
    assert logged_step(tmp_path) < 12
    out = ok(tmp_path, *STEPS, *extra)
    assert f"took over the stale workdir lock of host {os.uname().nodename}, pid {holder.pid}" in out
    assert "resumed from checkpoint step" in out
    assert losses(tmp_path) == uninterrupted  # exact float equality, every step
    assert (fmt.frozen_ref(tmp_path / "checkpoints", 12) is not None) == frozen


def test_sigterm_to_the_process_group_with_grain_workers_saves_then_resume_is_bit_identical(tmp_path, uninterrupted):
    # As SLURM stops a job step: SIGTERM to every process of the group, the data workers included.
    workers = "--config.data.worker_count=2"
    proc = cli(tmp_path, *LONG, workers, wait=False, start_new_session=True)
    wait_for(lambda: logged_step(tmp_path) >= 5, "step 5")
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = logged_step(tmp_path)
    assert stopped < 12
    assert f"received signal {int(signal.SIGTERM)}: saved checkpoint at step {stopped}" in out
    out = ok(tmp_path, *STEPS, workers)
    assert f"resumed from checkpoint step {stopped}" in out
    assert losses(tmp_path) == uninterrupted


# Checkpoints on disk: torn, corrupt, verify ---------------------------------------------------------


def tiny(steps: int):
    c = load_config("tiny")
    c.eval_data = None
    c.train.eval_every = 0
    c.train.steps, c.train.checkpoint_every, c.train.log_every = steps, 4, 100
    return c


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A workdir with checkpoints 4 and 8 of an 8-step run, and that run's losses."""
    workdir = tmp_path_factory.mktemp("two")
    train(tiny(8), str(workdir))
    return workdir, losses(workdir)


def copy_of(two_checkpoints, tmp_path):
    workdir, straight = two_checkpoints
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    return tmp_path / "checkpoints", straight


def largest_file(directory) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def flip_bytes(step_dir):
    path = largest_file(step_dir / "params")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(400)
        f.seek(-len(chunk), 1)
        f.write(bytes(b ^ 0xFF for b in chunk))


def truncate_metadata(step_dir):
    path = step_dir / "params" / "_METADATA"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def delete_a_file(step_dir):
    os.remove(largest_file(step_dir / "opt_state"))


@pytest.mark.parametrize("damage", [flip_bytes, truncate_metadata, delete_a_file])
def test_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
    tmp_path, two_checkpoints, damage
):
    ckpts, straight = copy_of(two_checkpoints, tmp_path)
    damage(ckpts / "8")
    step, said = restorable(tmp_path)
    assert step == 4
    assert "checkpoint step 8 failed verification" in said[0] and "set aside as" in said[0]
    assert [d for d in os.listdir(ckpts) if d.startswith("corrupt-8-")]
    train(tiny(8), str(tmp_path))
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")][-4:] == [5, 6, 7, 8]
    assert losses(tmp_path) == straight  # steps 5..8 again, equal to the run that was never damaged


def restorable(workdir) -> tuple[int | None, list[str]]:
    said = []
    checkpointer = checkpointer_lib.Checkpointer(str(workdir), tiny(8).train)
    try:
        return checkpointer.restorable_step(said.append), said
    finally:
        checkpointer.close()


def test_a_step_killed_between_commit_and_manifest_is_passed_over_or_adopted(tmp_path, two_checkpoints):
    ckpts, _ = copy_of(two_checkpoints, tmp_path)
    os.remove(ckpts / "8" / "manifest.process_0.json")
    step, said = restorable(tmp_path)
    assert step == 4 and "step 8 was committed but its manifest was never written" in said[0], said
    assert [d for d in os.listdir(ckpts) if d.startswith("unverified-8-")]
    # With no older step that verifies, the newest committed one is used, saying so.
    os.remove(ckpts / "4" / "manifest.process_0.json")
    step, said = restorable(tmp_path)
    assert step == 4 and "using it unverified" in said[0], said
    assert restorable(tmp_path) == (4, [])  # its manifest now written


def test_all_checkpoints_corrupt_refuses_to_start_in_one_line_also_on_the_next_try(tmp_path, two_checkpoints):
    ckpts, _ = copy_of(two_checkpoints, tmp_path)
    flip_bytes(ckpts / "4")
    delete_a_file(ckpts / "8")
    rc, out = cli(tmp_path, "--config.train.steps=8")
    line = one_line_error(rc, out)
    assert line.startswith("train: error: no checkpoint in ") and "verifies" in line, line
    assert "failed verification" in out  # which file, before the refusal
    assert sorted(d.split("-")[1] for d in os.listdir(ckpts) if d.startswith("corrupt-")) == ["4", "8"]
    # Set aside, the checkpoints are out of sight: the next start must still not begin from scratch.
    line = one_line_error(*cli(tmp_path, "--config.train.steps=8"))
    assert "no checkpoint in " in line and "Refusing to start from scratch" in line


def test_verify_only_prints_a_table_and_fails_when_the_newest_is_bad(tmp_path, two_checkpoints):
    ckpts, _ = copy_of(two_checkpoints, tmp_path)
    flip_bytes(ckpts / "8")
    rc, out = cli(tmp_path, "--verify_only")
    assert rc == 1, out
    rows = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert "verified" in rows["4"] and "CORRUPT" in rows["8"] and "sha256" in rows["8"], out
    assert os.path.isdir(ckpts / "8")  # reads only


def test_torn_checkpoint_is_ignored(tmp_path, two_checkpoints):
    ckpts, _ = copy_of(two_checkpoints, tmp_path)
    # A save cut short (kill -9 during the write): no Orbax commit marker and metadata ...
    os.remove(ckpts / "8" / "_CHECKPOINT_METADATA")
    os.remove(ckpts / "8" / "commit_success.txt")
    # ... and an Orbax temporary directory left behind.
    shutil.copytree(ckpts / "4", ckpts / "12.orbax-checkpoint-tmp-1700000000")
    summary = train(tiny(9), str(tmp_path))
    recs = records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs][-5:] == [5, 6, 7, 8, 9]  # resumed from 4
    assert summary["checkpoints"] == [4, 8, 9]
    assert any(d.startswith("torn-8-") for d in os.listdir(ckpts))


# The frozen store ------------------------------------------------------------------------------------


def test_checkpoints_of_a_run_from_init_from_hold_no_frozen_weights(uninterrupted_frozen, init_from):
    workdir, _ = uninterrupted_frozen
    ckpts = workdir / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["12", "4", "8", "frozen"]  # one store, written once
    store = ckpts / fmt.FROZEN_DIR
    frozen_paths = set(fmt._item_metadata(str(store), fmt.FROZEN_STEP))
    init = dict(fmt.iter_params(init_from, 0, sorted(frozen_paths)))
    for step in (4, 8, 12):
        own = set(fmt._item_metadata(str(ckpts), step))
        assert own and not own & frozen_paths, sorted(own & frozen_paths)[:3]
        assert own | frozen_paths == set(fmt.params_metadata(init_from, 0))  # between them, every parameter
        assert fmt.frozen_ref(ckpts, step)["fingerprint"] == integrity.fingerprint(str(store / "0"))
    for path, value in fmt.iter_params(ckpts, 12, sorted(frozen_paths)):  # through the step's reference
        np.testing.assert_array_equal(value, init[path], err_msg=str(path))


def test_deleted_frozen_store_is_refused_in_one_line_naming_it(tmp_path, uninterrupted_frozen, init_from):
    shutil.copytree(uninterrupted_frozen[0], tmp_path, dirs_exist_ok=True)
    store = tmp_path / "checkpoints" / "frozen"
    shutil.rmtree(store)
    line = one_line_error(*cli(tmp_path, *STEPS, *FREEZE, f"--config.train.init_from={init_from}"))
    assert line.startswith(f"train: error: {store}: missing; it holds the frozen weights of "), line
    assert sorted(d for d in os.listdir(tmp_path / "checkpoints")) == ["12", "4", "8"]  # nothing set aside
    with pytest.raises(fmt.CheckpointNotFound, match=f"{store}: missing"):
        idefics_jax.load(tmp_path / "checkpoints")
    report, newest_ok = checkpointer_lib.verify_report(str(tmp_path))
    assert not newest_ok and f"UNUSABLE: {store}: missing" in report, report


def test_frozen_store_with_other_or_corrupt_content_is_refused_naming_it(tmp_path, uninterrupted_frozen):
    shutil.copytree(uninterrupted_frozen[0], tmp_path, dirs_exist_ok=True)
    store = tmp_path / "checkpoints" / "frozen" / "0"
    flip_bytes(store)
    with pytest.raises(UserError, match=f"{store} .the frozen weights of .* failed verification: .*sha256"):
        restorable(tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "4", "8", "frozen"]  # nothing set aside
    integrity.write_manifest(str(store))  # now a consistent store, but not the one the steps were saved with
    with pytest.raises(UserError, match=f"{store}: holds other weights than the frozen weights of .* step 12"):
        restorable(tmp_path)


# Disk full ----------------------------------------------------------------------------------------------


def test_no_space_for_the_next_checkpoint_stops_before_writing(tmp_path, two_checkpoints, monkeypatch):
    copy_of(two_checkpoints, tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(
        checkpointer_lib.shutil, "disk_usage", lambda p: real(p)._replace(free=1000)
    )  # as if the disk had filled up since the last save
    with pytest.raises(checkpointer_lib.CheckpointSaveError) as e:
        train(tiny(12), str(tmp_path))
    message = str(e.value)
    assert message.startswith(f"saving checkpoint step 12 to {tmp_path / 'checkpoints'}: not enough space"), message
    assert "0.0 MB free there" in message and "the last complete checkpoint is step 8 (verified)" in message


# Every file the run writes stops growing at 64 KB (EFBIG), as writes fail on a full disk.
LIMIT_FILE_SIZE = ("bash", "-c", 'ulimit -f 64 && exec "$@"', "bash")


def test_failed_write_during_an_async_save_exits_1_in_one_line_then_a_rerun_resumes(tmp_path, two_checkpoints):
    copy_of(two_checkpoints, tmp_path)
    steps = ["--config.train.steps=12", "--config.train.log_every=1"]
    proc = cli(tmp_path, *steps, wait=False, prefix=LIMIT_FILE_SIZE)
    out, _ = proc.communicate(timeout=600)
    line = one_line_error(proc.returncode, out)
    assert line.startswith(f"train: error: saving checkpoint step 12 to {tmp_path / 'checkpoints'}: failed"), line
    assert "free there" in line and "the last complete checkpoint is step 8" in line, line
    failed = losses(tmp_path)  # steps 9..12 were trained, their checkpoint was not written
    out = ok(tmp_path, *steps)
    assert "resumed from checkpoint step 8" in out
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")][-8:] == [9, 10, 11, 12] * 2
    assert losses(tmp_path) == failed
    assert any(d == "12" for d in os.listdir(tmp_path / "checkpoints"))


# Config and data order ------------------------------------------------------------------------------


def test_bad_config_values_are_all_reported_at_once_before_compiling(tmp_path):
    bad = ["--config.train.optimizer.lr=-1", "--config.train.optimizer.b2=1.0", "--config.data.seq_len=0"]
    line = one_line_error(*cli(tmp_path, *bad))
    for field in ("train.optimizer.lr=-1", "train.optimizer.b2=1.0", "data.seq_len=0"):
        assert field in line, line
    assert not os.path.exists(tmp_path / "checkpoints")


def test_a_mesh_the_devices_cannot_hold_says_how_to_check_it_without_them(tmp_path):
    line = one_line_error(*cli(tmp_path, "--config.mesh.fsdp=8"))
    assert "needs 8 devices, 1 found" in line and "python -m idefics_jax.plan --config" in line, line
