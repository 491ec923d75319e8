"""`jax.distributed` initialisation from the launcher's environment; a no-op for one process.

Sources, first match wins:
1. explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID
   (launch/local.py sets these);
2. SLURM, inside `srun`: SLURM_STEP_NUM_TASKS > 1 with SLURM_PROCID and SLURM_STEP_NODELIST
   (the job-step variables: the batch script's own shell has SLURM_NTASKS but is no task, and
   must not try to join; coordinator = first node of the
   list, port JAX_COORDINATOR_PORT or 8476; one task per node driving its 8 GPUs);
3. SageMaker: SM_HOSTS (JSON list) and SM_CURRENT_HOST (coordinator = first host).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Mapping

DEFAULT_PORT = 8476


def fake_cpu_env(base: Mapping[str, str], devices: int) -> dict[str, str]:
    """A copy of the environment `base` in which JAX starts with `devices` fake CPU devices.

    XLA_FLAGS' device count is replaced (other flags kept), JAX_PLATFORMS=cpu, and NPROC (read by
    XLA:CPU when it sizes its thread pool) is 4 × `devices` unless `base` sets it. XLA:CPU runs the
    collectives of all fake devices on one pool of max(cores, devices) threads, and a collective holds
    its thread until every peer has arrived; independent collectives of one program may run at once.
    On a 2-core host 4 devices then parked all 4 threads in 4 different rendezvous, nobody could
    arrive, and XLA aborted the process after 40 s (CI, 2026-11-30). The headroom costs nothing
    measurable (tiny default on 4 devices: same losses, same step time).
    """
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("NPROC", str(4 * devices))
    return env


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM node list, e.g. 'gpu[003-005,010],cpu1' → 'gpu003'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"SLURM_NODELIST={nodelist!r}: cannot read a host name from it")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def settings(env: Mapping[str, str] | None = None) -> dict | None:
    """{coordinator_address, num_processes, process_id} from the environment, or None (one process)."""
    env = os.environ if env is None else env
    port = int(env.get("JAX_COORDINATOR_PORT", DEFAULT_PORT))
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        found = dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        if "SLURM_STEP_NODELIST" not in env or "SLURM_PROCID" not in env:
            raise ValueError("SLURM_STEP_NUM_TASKS > 1 but SLURM_STEP_NODELIST or SLURM_PROCID is missing")
        found = dict(
            coordinator_address=f"{first_host(env['SLURM_STEP_NODELIST'])}:{port}",
            num_processes=int(env["SLURM_STEP_NUM_TASKS"]),
            process_id=int(env["SLURM_PROCID"]),
        )
    elif "SM_HOSTS" in env:
        hosts = json.loads(env["SM_HOSTS"])
        if len(hosts) <= 1:
            return None
        current = env.get("SM_CURRENT_HOST")
        if current not in hosts:
            raise ValueError(f"SM_CURRENT_HOST={current!r} is not in SM_HOSTS={hosts}")
        found = dict(
            coordinator_address=f"{sorted(hosts)[0]}:{port}",
            num_processes=len(hosts),
            process_id=sorted(hosts).index(current),
        )
    else:
        return None
    if found["num_processes"] <= 1:
        return None
    if not 0 <= found["process_id"] < found["num_processes"]:
        raise ValueError(f"process id {found['process_id']} not in [0, {found['num_processes']})")
    return found


def initialize() -> None:
    """Initialises jax.distributed when the environment describes several processes.

    Must run before anything touches the devices. On CPU (launch/local.py, tests) the collectives
    between processes need an implementation: gloo, unless JAX_CPU_COLLECTIVES_IMPLEMENTATION says
    otherwise; GPUs use NCCL whatever this is set to.
    """
    found = settings()
    if found is None:
        return
    import jax

    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**found)


def barrier(name: str, timeout_s: float = 1800.0) -> None:
    """Waits until every process has reached the barrier `name` (a no-op for one process).

    It goes through the coordination service (the same one orbax and jax's serialization wait on),
    not through a device collective, so it has its own generous timeout."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


# Barrier names must not repeat within a run; every process creates its steps in the same order.
_barriers = itertools.count()


class CompiledTogether:
    """A jitted function whose first call, with several processes, compiles ahead of time and waits
    for every process at a barrier before running (`lower` is the jitted function's own).

    On CPU, gloo gives each process 30 s to join the first collective of a new device group; one
    process compiling on a loaded host can lag another by more than that (it failed CI once). Later
    calls reuse the executable compiled here (jax's compilation cache), so they cost nothing extra."""

    def __init__(self, jitted: Callable, name: str):
        self.jitted, self.name, self.lower = jitted, name, jitted.lower
        self._waited = False

    def __call__(self, *args):
        import jax

        if not self._waited and jax.process_count() > 1:
            self.jitted.lower(*args).compile()
            barrier(f"compiled:{self.name}:{next(_barriers)}")
        self._waited = True
        return self.jitted(*args)
