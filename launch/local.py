"""Starts N trainer processes on this host, as a cluster of N nodes would, for testing multi-process runs.

    python launch/local.py -n 2 [--devices-per-process 2] -- --config configs/tiny.py --workdir /tmp/run \
        --config.mesh.fsdp=2 --config.mesh.tensor=2

Each process gets `--devices-per-process` fake CPU devices (`--xla_force_host_platform_device_count`)
and the explicit `jax.distributed` environment (JAX_COORDINATOR_ADDRESS on 127.0.0.1, JAX_NUM_PROCESSES,
JAX_PROCESS_ID) that `idefics_jax.distributed.initialize` reads; cross-process collectives run over
gloo. The arguments after `--` go to `python -m idefics_jax.train` (or to `--module`). Process 0's
output is passed through; the others' lines are prefixed with `[i]`. SIGTERM and SIGINT are forwarded
to every process (the trainer saves a checkpoint and exits 0). The exit status is the first non-zero
one, and when one process fails the others are terminated.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading

from idefics_jax.distributed import fake_cpu_env


def free_port() -> int:
    """A TCP port nobody listens on right now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], rank: int, n: int, devices: int, port: int) -> dict[str, str]:
    """The environment of process `rank` of `n` with `devices` fake CPU devices."""
    env = fake_cpu_env(base, devices)
    env.update(
        {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(n),
            "JAX_PROCESS_ID": str(rank),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _pump(stream, prefix: str, out) -> None:
    for line in stream:
        out.write(prefix + line)
        out.flush()


def launch(n: int, devices: int, module: str, args: list[str], env: dict[str, str] | None = None) -> int:
    """Runs `python -m module *args` as `n` processes; returns the first non-zero exit status (or 0)."""
    port = free_port()
    procs = []
    for rank in range(n):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env=process_env(env or os.environ, rank, n, devices, port),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    pumps = [
        threading.Thread(target=_pump, args=(p.stdout, "" if r == 0 else f"[{r}] ", sys.stderr), daemon=True)
        for r, p in enumerate(procs)
    ]
    for t in pumps:
        t.start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        remaining = list(procs)
        while remaining:
            for p in list(remaining):
                try:
                    rc = p.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                remaining.remove(p)
                if rc and not status:
                    status = rc
                    # A lost peer leaves the others blocked in a collective, where a SIGTERM would
                    # only set the trainer's stop flag: kill them (their last checkpoint is intact).
                    for q in remaining:
                        q.kill()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(timeout=5)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--processes", type=int, required=True, help="processes to start")
    parser.add_argument("--devices-per-process", type=int, default=2, help="fake CPU devices per process")
    parser.add_argument("--module", default="idefics_jax.train", help="module to run (python -m MODULE ARGS)")
    opts = parser.parse_args(ours)
    if opts.processes < 1 or opts.devices_per_process < 1:
        parser.error("-n and --devices-per-process must be positive")
    return launch(opts.processes, opts.devices_per_process, opts.module, rest)


if __name__ == "__main__":
    sys.exit(main())
