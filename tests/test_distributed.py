"""idefics_jax.distributed: which processes, and where the coordinator is, from each launcher's environment."""

import json

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
