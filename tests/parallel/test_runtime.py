"""Distributed start-up: torchrun and Slurm environments, backend choice."""

import pytest
import torch

from megatron_omni.config import ConfigError
from megatron_omni.parallel.runtime import choose_backend, dist_env_from_environ, first_host


def test_torchrun_env():
    env = dist_env_from_environ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                 "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
                                 "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_env_master_from_nodelist_and_port_from_job():
    env = dist_env_from_environ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                                 "SLURM_JOB_NODELIST": "gpu[007-009,012],login", "SLURM_JOB_ID":
                                 "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "slurm")
    assert env.master_addr == "gpu007"
    assert env.master_port == 20000 + 123456 % 20000
    env = dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                                 "SLURM_NODELIST": "node1", "MASTER_PORT": "4000"})
    assert env.master_addr == "node1" and env.master_port == 4000


@pytest.mark.parametrize("nodelist,first", [("a", "a"), ("a,b", "a"), ("x[1-3]", "x1"),
                                            ("x[01,05]", "x01"), ("rack-a[010-020]", "rack-a010")])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_single_process_default():
    env = dist_env_from_environ({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_backend_choice():
    if torch.cuda.is_available():
        assert choose_backend("auto") == "nccl"
    else:
        assert choose_backend("auto") == "gloo"
        with pytest.raises(ConfigError, match="nccl needs CUDA"):
            choose_backend("nccl")
    assert choose_backend("gloo") == "gloo"
