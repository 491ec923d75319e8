"""The workdir lock on its own: refusal, stale takeover by heartbeat age, and the holder that lost it."""

import json
import os
import socket
import time

import pytest

from idefics_jax.train.lock import LOCK_NAME, WorkdirLock, WorkdirLocked


def test_a_live_lock_refuses_a_second_holder_and_is_released(tmp_path):
    first = WorkdirLock(str(tmp_path), stale_after_s=30)
    with pytest.raises(WorkdirLocked, match=rf"held by another run \(host {socket.gethostname()}, pid {os.getpid()}"):
        WorkdirLock(str(tmp_path), stale_after_s=30)
    first.release()
    assert not os.path.exists(tmp_path / LOCK_NAME)
    WorkdirLock(str(tmp_path), stale_after_s=30).release()


def test_a_lock_on_another_host_is_taken_over_only_when_its_heartbeat_is_old(tmp_path):
    now = time.time()
    theirs = {"host": "node-17", "pid": 4242, "job": "SLURM_JOB_ID=99", "started": now - 60, "token": "x"}
    with open(tmp_path / LOCK_NAME, "w") as f:
        json.dump({**theirs, "heartbeat": now - 1}, f)
    with pytest.raises(WorkdirLocked, match=r"host node-17, pid 4242, SLURM_JOB_ID=99"):
        WorkdirLock(str(tmp_path), stale_after_s=30)
    with open(tmp_path / LOCK_NAME, "w") as f:
        json.dump({**theirs, "heartbeat": now - 31}, f)
    lock = WorkdirLock(str(tmp_path), stale_after_s=30)
    assert lock.took_over["host"] == "node-17"
    lock.release()


def test_a_holder_whose_lock_was_taken_over_stops(tmp_path):
    holder = WorkdirLock(str(tmp_path), stale_after_s=0.5)
    holder._stop.set()  # as if suspended: the heartbeat stops
    holder._thread.join()
    time.sleep(0.6)
    thief = WorkdirLock(str(tmp_path), stale_after_s=0.5)
    assert thief.took_over["pid"] == os.getpid()
    holder._stop.clear()
    holder._beat_once()
    with pytest.raises(WorkdirLocked, match="this run lost the workdir lock"):
        holder.check()
    holder.release()  # does not remove the new owner's lock
    assert os.path.exists(tmp_path / LOCK_NAME)
    thief.release()
