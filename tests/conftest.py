"""Shared test set-up: one thread per process, tests/ on sys.path, fast megatron-core import."""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)

from megatron_omni.parallel.cpu_compat import import_megatron_fast  # noqa: E402

import_megatron_fast()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed + megatron-core parallel state for one process (TP=PP=DP=1)."""
    from dist_utils import free_port
    from megatron.core import parallel_state as ps

    from megatron_omni.config import ParallelConfig
    from megatron_omni.parallel import runtime

    if not ps.model_parallel_is_initialized():
        env = runtime.DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
        runtime.initialize(ParallelConfig(), seed=1234, env=env)
    yield
