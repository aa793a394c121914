"""The few places where megatron-core (0.16.1) assumes CUDA, patched for CPU-only machines.

Everything here is applied by :func:`apply_cpu_shims` only when CUDA is unavailable, so the GPU
path runs megatron-core untouched. Each shim names the megatron-core code it works around and has
its own test in ``tests/parallel/test_cpu_compat.py``. With these, the same model, schedule,
optimizer and checkpoint code runs on gloo with 2-4 processes on a laptop.

Shims (megatron-core 0.16.1):

1. ``torch.cuda.current_device`` -> ``"cpu"`` and ``torch.cuda.synchronize`` -> no-op. About 200
   allocations in megatron-core pass ``device=torch.cuda.current_device()`` (memory buffers,
   sequence-parallel all-gather, p2p receive buffers, DDP grad buffers, rotary tables).
2. CUDA RNG API -> the CPU default generator: ``tensor_parallel/random.py``'s
   ``CudaRNGStatesTracker.add``/``fork`` and ``CheckpointFunction`` call
   ``torch.cuda.get_rng_state``/``manual_seed`` and ``_set_cuda_rng_state`` (the latter goes
   through ``torch.cuda._lazy_call``, a silent no-op without CUDA, which would make every tracker
   state identical). Mapping them to the CPU generator keeps TP-distinct initialisation, dropout
   and recompute replay faithful, because on CPU the kernels draw from that generator.
3. ``device="cuda"`` literals in ``pipeline_parallel/schedules.py`` (``total_num_tokens``),
   ``utils.py`` (``local_multi_tensor_l2_norm``, the grad norm used without apex),
   ``optimizer/clip_grads.py`` (norm buffers), ``optimizer/optimizer.py`` (``found_inf``, scale
   tensors) and ``optimizer/grad_scaler.py``: those modules' ``torch`` global is replaced by a
   proxy whose tensor factories map a CUDA device to CPU. Scoped to those modules, no cost
   elsewhere.
4. ``Tensor.cuda()`` -> identity (``optimizer/distrib_optimizer.py`` moves gathered state with
   ``.cuda()``; without CUDA that call could only raise).
5. ``DistributedOptimizer._build_model_and_main_param_groups``,
   ``Float16OptimizerWithFloat16Params.__init__`` (the bf16 optimizer without the distributed
   optimizer) and ``optimizer/clip_grads.py``'s ``clip_grad_by_total_norm_fp32`` accept only
   ``param.type()`` in the ``torch.cuda.*Tensor`` names; during those calls the no-argument
   ``Tensor.type()`` reports CPU tensors under the CUDA type names.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

import torch

_APPLIED = False
_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def shims_applied() -> bool:
    return _APPLIED


# --- 1. current_device / synchronize ------------------------------------------------------------

def _shim_current_device():
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None


# --- 2. RNG -------------------------------------------------------------------------------------

class _ForkWarningFilter(logging.Filter):
    """``CudaRNGStatesTracker.fork`` warns when the CPU RNG changed inside a fork; with shim 2 the
    CPU generator IS the tracked generator, so that warning is expected and dropped."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _shim_rng():
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all (a lazy no-op here) itself.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    logging.getLogger(mrandom.__name__).addFilter(_ForkWarningFilter())


# --- 3. device="cuda" literals ------------------------------------------------------------------

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "as_tensor", "randn", "rand")


def _to_cpu_device(dev):
    if dev is None:
        return None
    if isinstance(dev, int):
        return "cpu"
    d = torch.device(dev)
    return "cpu" if d.type == "cuda" else dev


class _CpuDeviceTorch(types.ModuleType):
    """Stands in for ``torch`` inside one megatron-core module: the tensor factories map CUDA
    devices to CPU; every other attribute is torch's own."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            original = attr

            @functools.wraps(original)
            def attr(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu_device(kwargs["device"])
                return original(*args, **kwargs)

        setattr(self, name, attr)  # cached: later look-ups cost nothing
        return attr


CUDA_LITERAL_MODULES = (
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad norm without apex)
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
)


def _shim_cuda_literals():
    import importlib

    proxy = _CpuDeviceTorch()
    for name in CUDA_LITERAL_MODULES:
        mod = importlib.import_module(name)
        mod.torch = proxy


# --- 4. Tensor.cuda -----------------------------------------------------------------------------

def _shim_tensor_cuda():
    torch.Tensor.cuda = lambda self, *a, **k: self


# --- 5. Tensor.type() inside DistributedOptimizer -----------------------------------------------

@contextlib.contextmanager
def report_cuda_tensor_types():
    """Inside this block, ``t.type()`` (no argument) on a CPU tensor returns the CUDA name."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


# Functions that check ``param.grad.type() == 'torch.cuda.FloatTensor'``; each is replaced in
# every module that holds a reference to it (``optimizer.py`` imports clip_grad_by_total_norm_fp32
# by name).
TYPE_CHECKED_FUNCTIONS = (
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
     ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer")),
)


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with report_cuda_tensor_types():
            return fn(*args, **kwargs)

    return wrapped


def _shim_type_checks():
    import importlib

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._build_model_and_main_param_groups.__func__  # a classmethod
    DistributedOptimizer._build_model_and_main_param_groups = classmethod(
        _with_cuda_type_names(original))
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    Float16OptimizerWithFloat16Params.__init__ = _with_cuda_type_names(
        Float16OptimizerWithFloat16Params.__init__)
    for home, name, holders in TYPE_CHECKED_FUNCTIONS:
        wrapped = _with_cuda_type_names(getattr(importlib.import_module(home), name))
        for holder in holders:
            setattr(importlib.import_module(holder), name, wrapped)


# --- entry point --------------------------------------------------------------------------------

def apply_cpu_shims(force: bool = False) -> bool:
    """Apply every shim once if CUDA is unavailable (or ``force``). Returns whether applied."""
    global _APPLIED
    if _APPLIED:
        return True
    if cuda_available() and not force:
        return False
    _shim_current_device()
    _shim_rng()
    _shim_cuda_literals()
    _shim_tensor_cuda()
    _shim_type_checks()
    _APPLIED = True
    logging.getLogger(__name__).info("CUDA unavailable: megatron-core CPU shims applied")
    return True


# --- start-up speed (not a CUDA shim, CPU only) -------------------------------------------------

MEGATRON_MODULES = (
    "megatron.core",
    "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.transformer.transformer_block",
    "megatron.core.pipeline_parallel",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing",
)


def import_megatron_fast() -> None:
    """Import megatron-core with ``torch.compile`` as a pass-through decorator (CPU only).

    ``megatron/core/jit.py`` makes ``jit_fuser = torch.compile`` and dozens of fusion helpers are
    decorated at import time, about 2.6 s of a 4 s import; every test worker pays it. The helpers
    then run eagerly (same math; on CPU inductor would need a compiler run anyway). With CUDA this
    does nothing, so GPU runs keep the compiled fusions.
    """
    import importlib
    import sys

    if cuda_available() or "megatron.core" in sys.modules:
        return
    original = torch.compile

    def passthrough(fn=None, *args, **kwargs):
        if callable(fn):
            return fn
        return lambda f: f

    torch.compile = passthrough
    try:
        for name in MEGATRON_MODULES:
            importlib.import_module(name)
    finally:
        torch.compile = original
