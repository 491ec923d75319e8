"""idefics_jax.distributed: which processes, and where the coordinator is, from each launcher's environment;
the environment of fake CPU devices."""

import json
import os
import subprocess
import sys

import pytest

from idefics_jax import distributed


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("gpu[003-005,010]", "gpu003"),
        ("node7", "node7"),
        ("p4d-st-1-[12-75]", "p4d-st-1-12"),
        ("a[1,3],b[2-4]", "a1"),
        ("cpu1,cpu2", "cpu1"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


def test_slurm():
    env = {"SLURM_STEP_NUM_TASKS": "64", "SLURM_PROCID": "5", "SLURM_STEP_NODELIST": "gpu[001-064]"}
    assert distributed.settings(env) == {"coordinator_address": "gpu001:8476", "num_processes": 64, "process_id": 5}
    env["JAX_COORDINATOR_PORT"] = "9000"
    assert distributed.settings(env)["coordinator_address"] == "gpu001:9000"
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
        distributed.settings({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"})
    # The batch script's own shell (outside srun) is no task: a single process.
    assert distributed.settings({"SLURM_NTASKS": "64", "SLURM_PROCID": "0", "SLURM_NODELIST": "gpu[001-064]"}) is None


def test_sagemaker():
    hosts = json.dumps(["algo-2", "algo-1", "algo-3"])
    assert distributed.settings({"SM_HOSTS": hosts, "SM_CURRENT_HOST": "algo-2"}) == {
        "coordinator_address": "algo-1:8476",
        "num_processes": 3,
        "process_id": 1,
    }
    with pytest.raises(ValueError, match="SM_CURRENT_HOST"):
        distributed.settings({"SM_HOSTS": hosts, "SM_CURRENT_HOST": "algo-9"})
    assert distributed.settings({"SM_HOSTS": json.dumps(["algo-1"]), "SM_CURRENT_HOST": "algo-1"}) is None


def test_explicit_environment_wins():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
        "SLURM_STEP_NUM_TASKS": "64",
        "SLURM_PROCID": "5",
        "SLURM_STEP_NODELIST": "gpu[001-064]",
    }
    assert distributed.settings(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="not in"):
        distributed.settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})


def test_one_process_is_a_no_op():
    assert distributed.settings({}) is None
    assert distributed.settings({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_NODELIST": "a1"}) is None
    assert (
        distributed.settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"})
        is None
    )


# Collectives inside a loop and independent ones beside it, on 8 fake devices: with XLA's default
# pool (max(cores, devices) threads) this aborted 3 runs in 3 on a 2-core host, one device short
# of a rendezvous; fake_cpu_env's NPROC headroom lets every device reach each collective.
CONCURRENT_COLLECTIVES = """
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

mesh = Mesh(jax.devices(), ("d",))

def body(x, y):
    x = jax.lax.fori_loop(0, 4, lambda i, c: jnp.tanh(c @ c.T + jax.lax.psum(c, "d")), x)
    for _ in range(6):
        y = jnp.sin(jax.lax.psum(y, "d") @ y)
    return x + y + jax.lax.all_gather(y, "d", tiled=True)[: y.shape[0]]

f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
x = y = jax.device_put(jnp.full((8 * 64, 64), 0.5), NamedSharding(mesh, P("d")))
for _ in range(200):
    x = f(x, y)
print("finished", float(x.sum()))
"""


def test_fake_devices_have_threads_for_concurrent_collectives():
    env = distributed.fake_cpu_env(os.environ, 8)
    env["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=20"  # abort fast on a deadlock
    proc = subprocess.run(
        [sys.executable, "-c", CONCURRENT_COLLECTIVES], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "finished" in proc.stdout, proc.stderr[-2000:]
