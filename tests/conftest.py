"""Shared test set-up: one thread per process, fast megatron-core import. The repository root
and tests/ are on the import path through pytest's ``pythonpath`` setting (pyproject.toml), so tests
import their helpers (``dist_utils``, ``omni_batch``, ``workers.<name>``) by name."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from megatron_omni.parallel.cpu_compat import import_megatron_fast  # noqa: E402

import_megatron_fast()


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
