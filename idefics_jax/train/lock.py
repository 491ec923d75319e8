"""One run per workdir: a lock file that works on a shared filesystem.

Process 0 creates `WORKDIR/run.lock` with O_CREAT|O_EXCL (atomic on local filesystems and NFS v3+;
no reliance on flock across hosts) holding {host, pid, job id, start time, heartbeat, token}, and a
daemon thread rewrites the heartbeat every `stale_after_s / 10` seconds (write to a temporary name,
then rename over the lock). Another run refuses to start while the heartbeat is fresh. A lock whose
heartbeat is older than `stale_after_s`, or whose pid is dead on this same host, is stale: it is
taken over by renaming it away (of two runs trying at once, exactly one rename succeeds) and
creating a new one. A holder whose lock was taken over (its heartbeat stopped long enough, e.g. a
suspended job) sees `lost` and the trainer stops rather than write beside the new owner.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from idefics_jax.errors import UserError

LOCK_NAME = "run.lock"


class WorkdirLocked(UserError):
    """Another live run holds the workdir."""


def _job_id() -> str | None:
    for var in ("SLURM_JOB_ID", "TRAINING_JOB_NAME", "JOB_ID"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class WorkdirLock:
    """Holds WORKDIR/run.lock for this run (see the module docstring); `release()` removes it."""

    def __init__(self, workdir: str, stale_after_s: float):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self.stale_after_s = stale_after_s
        self.lost: str | None = None
        now = time.time()
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": _job_id(),
            "started": now,
            "heartbeat": now,
            "token": uuid.uuid4().hex,
        }
        self.took_over: dict | None = None
        self._acquire()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def describe(info: dict) -> str:
        age = time.time() - info.get("heartbeat", 0)
        job = f", {info['job']}" if info.get("job") else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
        return f"host {info.get('host')}, pid {info.get('pid')}{job}, started {started}, last heartbeat {age:.0f} s ago"

    def _stale(self, info: dict | None) -> bool:
        if info is None:  # unreadable: a holder mid-rename never leaves it so; treat as stale only if old
            try:
                return time.time() - os.path.getmtime(self.path) > self.stale_after_s
            except OSError:
                return True
        if time.time() - info.get("heartbeat", 0) > self.stale_after_s:
            return True
        return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", 0)))

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
        return True

    def _acquire(self) -> None:
        for _ in range(3):
            if self._create():
                return
            held = _read(self.path)
            if not self._stale(held):
                raise WorkdirLocked(
                    f"{self.path} is held by another run ({self.describe(held or {})}); one run per workdir: "
                    f"wait for it, stop it, or use another --workdir (a lock whose heartbeat is older than "
                    f"train.lock_stale_after_s={self.stale_after_s:g} s is taken over)"
                )
            try:  # exactly one of several contenders renames the stale lock away
                os.rename(self.path, f"{self.path}.stale-{self.info['token']}")
            except FileNotFoundError:
                continue
            os.remove(f"{self.path}.stale-{self.info['token']}")
            self.took_over = held or {}
        raise WorkdirLocked(f"{self.path}: could not take the lock (other runs are starting at the same time)")

    def _beat(self) -> None:
        interval = max(self.stale_after_s / 10, 0.05)
        while not self._stop.wait(interval) and self._beat_once():
            pass

    def _beat_once(self) -> bool:
        """Rewrites the heartbeat; False (and `lost` says why) once the lock is no longer ours."""
        held = _read(self.path)
        if held is None or held.get("token") != self.info["token"]:
            self.lost = self.describe(held) if held else "the lock file was removed"
            return False
        self.info["heartbeat"] = time.time()
        tmp = f"{self.path}.{self.info['token']}"
        with open(tmp, "w") as f:
            json.dump(self.info, f)
        os.replace(tmp, self.path)
        return True

    def check(self) -> None:
        """Raises WorkdirLocked when another run has taken the lock over."""
        if self.lost:
            raise WorkdirLocked(f"{self.path}: this run lost the workdir lock ({self.lost}); stopping")

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        held = _read(self.path)
        if held is not None and held.get("token") == self.info["token"]:
            os.remove(self.path)
