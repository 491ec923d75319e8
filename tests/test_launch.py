"""launch/local.py: N trainer processes on this host (fake CPU devices, gloo) train exactly like one
process over the same devices, and their checkpoint resumes in a single-process run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from idefics_jax.distributed import fake_cpu_env

LOCAL = os.path.join(ROOT, "launch", "local.py")
TRAIN = [
    "--config",
    os.path.join(ROOT, "configs", "tiny.py"),
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    "--config.train.checkpoint_every=2",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
]


def losses(workdir) -> dict[int, float]:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def one_process(workdir, steps: int) -> str:
    """The trainer as one process over 4 fake devices (the same mesh: fsdp 2 × tensor 2)."""
    env = fake_cpu_env(os.environ, 4)
    proc = subprocess.run(
        [sys.executable, "-m", "idefics_jax.train", *TRAIN, f"--config.train.steps={steps}", "--workdir", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # An abort's own message comes before the thread dump that fills the tail: keep absl's fatal lines.
    fatal = "\n".join(line for line in proc.stderr.splitlines() if re.match(r"[FE]\d{4} ", line))
    assert proc.returncode == 0, fatal + "\n" + proc.stderr[-3000:]
    return proc.stderr


def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tmp_path):
    two = tmp_path / "two"
    proc = subprocess.run(
        [
            sys.executable,
            LOCAL,
            "-n",
            "2",
            "--devices-per-process",
            "2",
            "--",
            *TRAIN,
            "--config.train.steps=4",
            "--workdir",
            str(two),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # Both processes ran and met in jax.distributed; only process 0 wrote metrics and printed steps.
    assert "[1] " in proc.stderr and "done: step 4" in proc.stderr
    assert "[1] step" not in proc.stderr
    assert sorted(int(d) for d in os.listdir(two / "checkpoints") if d.isdigit()) == [2, 4]

    one = tmp_path / "one"
    one_process(one, 6)
    reference = losses(one)
    assert losses(two) == {s: reference[s] for s in (1, 2, 3, 4)}  # exact, every step

    # The two-process checkpoint (step 4) resumes in one process and continues like the reference.
    log = one_process(two, 6)
    assert "resumed from checkpoint step 4" in log
    resumed = losses(two)
    assert (resumed[5], resumed[6]) == (reference[5], reference[6])


def test_a_failing_process_fails_the_launch():
    proc = subprocess.run(
        [sys.executable, LOCAL, "-n", "2", "--", "--config", "/nonexistent/config.py"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "nonexistent" in proc.stderr


def test_process_environment():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        import local
    finally:
        sys.path.pop(0)
    env = local.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"}, 1, 3, 2, 1234)
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]
    assert (env["JAX_PLATFORMS"], env["NPROC"]) == ("cpu", "8")
    assert local.process_env({"NPROC": "3"}, 0, 1, 2, 1234)["NPROC"] == "3"
    assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == (
        "127.0.0.1:1234",
        "3",
        "1",
    )
    with pytest.raises(SystemExit):
        local.main(["-n", "0", "--", "x"])


def test_cluster_runtime_flags_are_known_to_xla():
    # An unknown flag in XLA_FLAGS aborts the process: check launch/slurm/env.sh's against this XLA.
    proc = subprocess.run(
        ["bash", "-c", "source launch/slurm/env.sh && exec \"$0\" -c 'import jax; jax.devices()'", sys.executable],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_gpu_no_such_flag=1"),
    )
    assert bad.returncode != 0


def test_sagemaker_entry_point_command():
    sys.path.insert(0, os.path.join(ROOT, "launch", "sagemaker"))
    try:
        import entry
    finally:
        sys.path.pop(0)
    cmd = entry.command(
        ["--config", "configs/9b.py", "--config.train.steps", "10"],
        {"SM_CHANNEL_DATA": "/data", "SM_CHANNEL_INIT": "/init"},
    )
    assert cmd[:4] == ["bash", "-c", 'source launch/slurm/env.sh && exec "$@"', "entry"]
    train = cmd[4:]
    assert train[1:5] == ["-m", "idefics_jax.train", "--config", "configs/9b.py"]
    assert "--config.train.init_from=/init" in train and "--config.data.tokenizer_path=/data/tokenizer" in train
    assert train[-2:] == ["--config.train.steps", "10"] and "/opt/ml/checkpoints" in train
