"""Distributed start-up: torchrun or Slurm environment -> torch.distributed -> megatron-core groups.

One entry point, :func:`initialize`, used by training, tests and tools alike:

* reads the process layout from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
  ``MASTER_PORT``) or, when those are absent, from Slurm (``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_LOCALID``, master = first host of ``SLURM_JOB_NODELIST``, port from ``MASTER_PORT`` or
  derived from ``SLURM_JOB_ID``);
* picks NCCL when CUDA is present, gloo otherwise (and applies the CPU shims then);
* calls ``megatron.core.parallel_state.initialize_model_parallel`` for TP, PP, virtual PP, CP
  (DP is what remains) and seeds megatron-core's model-parallel RNG tracker.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from ..config.schema import ConfigError, ParallelConfig
from . import cpu_compat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list: ``gpu[003-010,012],login1`` -> ``gpu003``.

    ``scontrol show hostnames`` is not always available inside containers, so the compressed
    syntax is expanded here (prefix + first number of the first range, keeping its zero padding).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST is empty; cannot find the master node")
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if m is None:
        raise ConfigError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def dist_env_from_environ(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read the process layout from torchrun or Slurm variables (torchrun wins if both exist)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 20000 + job_id % 20000
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=port,
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                   int(env.get("MASTER_PORT", 29500)), "single")


def choose_backend(requested: str = "auto") -> str:
    """NCCL with CUDA, gloo without; asking for NCCL without CUDA is an error, not a fallback."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA GPUs; use gloo or auto on CPU")
    return requested


def initialize(parallel: ParallelConfig, seed: int = 1234, env: Optional[DistEnv] = None,
               timeout_minutes: Optional[int] = None) -> DistEnv:
    """Start torch.distributed and megatron-core's parallel state for ``parallel``."""
    from megatron.core import parallel_state, tensor_parallel

    env = env or dist_env_from_environ()
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    if env.world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {env.world_size} is not divisible by TP*PP*CP = {tp * pp * cp}; launch a "
            f"multiple of {tp * pp * cp} processes or change parallel.*")
    backend = choose_backend(parallel.backend)
    if not torch.cuda.is_available():
        cpu_compat.apply_cpu_shims()
    else:
        torch.cuda.set_device(env.local_rank)

    if not torch.distributed.is_initialized():
        minutes = timeout_minutes or parallel.distributed_timeout_minutes
        timeout = datetime.timedelta(minutes=minutes)
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=cp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    if env.rank == 0:
        log.info(
            "distributed: launcher=%s backend=%s world=%d TP=%d PP=%d VPP=%s CP=%d DP=%d",
            env.launcher,
            backend,
            env.world_size,
            tp,
            pp,
            parallel.virtual_pipeline_model_parallel_size,
            cp,
            parallel_state.get_data_parallel_world_size(),
        )
    return env


def destroy() -> None:
    """Tear down megatron-core groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
