"""Where this process computes and where its collectives' tensors must live: ONE rule.

* :func:`compute_device` - the runtime's device: the current CUDA device when CUDA is available
  (``parallel.runtime.initialize`` selects ``LOCAL_RANK``), else the CPU. Model inputs
  (``trainer.to_model_batch``) and every plain torch module of the model
  (:func:`place_module`) go there.
* :func:`comm_device` - the device of a tensor handed to a collective on ``group``: the current
  GPU when the group's backend is NCCL (NCCL has no CPU path), else the compute device (gloo
  reduces CPU tensors and, on a GPU machine, CUDA tensors). Used by ``training/step.py``,
  ``training/checkpoint.py`` and ``training/balance.py``.

Tests declare a different device with :func:`declared_device` (e.g. ``"meta"``, or the CPU while
tensors are created elsewhere by default) to show that nothing silently stays where it was made:
on a CPU-only machine a forgotten ``.to(device)`` is otherwise invisible.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch

_DECLARED: Optional[torch.device] = None


def compute_device() -> torch.device:
    """The device this process computes on (see the module docstring)."""
    if _DECLARED is not None:
        return _DECLARED
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device(group=None) -> torch.device:
    """Device for tensors handed to a collective on ``group`` (default: the world)."""
    if _DECLARED is not None:
        return _DECLARED
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return compute_device()


@contextlib.contextmanager
def declared_device(device: Union[str, torch.device]) -> Iterator[torch.device]:
    """Tell the runtime its device is ``device`` for the duration (tests only)."""
    global _DECLARED
    prev, _DECLARED = _DECLARED, torch.device(device)
    try:
        yield _DECLARED
    finally:
        _DECLARED = prev


def place_module(module: torch.nn.Module, device: Optional[torch.device] = None
                 ) -> torch.nn.Module:
    """Move every parameter and buffer of ``module`` to the compute device (in place).

    megatron-core modules already land on the GPU (``use_cpu_initialization=False``), where this
    is a no-op; plain torch modules (ViT patch embedding and merger norm, projectors, SAN-M, the
    torch norms of the local spec) are built on the CPU and must be moved, or a frozen encoder
    or the non-distributed optimizer would meet CPU weights in a CUDA forward.
    """
    device = device or compute_device()
    module.to(device)
    return module


def off_device(module: torch.nn.Module, device: Optional[torch.device] = None) -> list[str]:
    """Names of the parameters and buffers of ``module`` that are not on ``device``."""
    device = device or compute_device()
    out = [n for n, p in module.named_parameters() if p.device != device]
    out += [n for n, b in module.named_buffers() if b.device != device]
    return out
