"""Preemption signals: SIGTERM / SIGUSR1 set a flag instead of killing the process, and the
trainer saves a checkpoint at the next step boundary and exits with :data:`REQUEUE_EXIT_CODE`.

Every rank installs the handlers (:func:`install_signal_handlers`, main thread only); the ranks
agree at each step boundary through one all-reduce (:func:`should_save_and_exit`), so a signal
that reached one rank stops all of them at the same step.
"""

from __future__ import annotations

import logging
import signal
from typing import Optional, Sequence

import torch

from ..parallel.device import comm_device

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75
"""Exit code of a run that saved a checkpoint because it was signalled (Slurm preemption or time
limit). EX_TEMPFAIL from sysexits.h, "try again later": the sbatch script requeues on it, e.g.
``srun ...; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``."""

_SIGNAL_RECEIVED: Optional[int] = None


def _on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
    global _SIGNAL_RECEIVED
    _SIGNAL_RECEIVED = signum
    log.warning(
        "received signal %d: will save a checkpoint and exit at the next step boundary", signum
    )


def install_signal_handlers(signals: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1)) -> dict:
    """Make ``signals`` set a flag instead of killing the process (main thread only).

    With Slurm, ask for an early warning with ``#SBATCH --signal=B:USR1@300`` (or
    ``srun --signal=USR1@300``) so there is time to save before the time limit; preemption sends
    SIGTERM and then SIGKILL after ``KillWait`` seconds. Returns the previous handlers.
    """
    return {s: signal.signal(s, _on_signal) for s in signals}


def signal_received() -> Optional[int]:
    """The signal this process received (None if none); local, no communication."""
    return _SIGNAL_RECEIVED


def reset_signal_flag() -> None:
    global _SIGNAL_RECEIVED
    _SIGNAL_RECEIVED = None


def should_save_and_exit(group=None) -> bool:
    """True on EVERY rank if ANY rank was signalled (all-reduce MAX); collective, so call it on
    all ranks at the same step. The trainer then saves and exits with
    :data:`REQUEUE_EXIT_CODE`."""
    flag = 1 if _SIGNAL_RECEIVED is not None else 0
    if not torch.distributed.is_initialized():
        return bool(flag)
    t = torch.tensor([flag], dtype=torch.int32, device=comm_device(group))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(t.item())
