"""Distributed checkpoints on megatron-core ``dist_checkpointing`` (torch_dist backend).

A checkpoint root holds published step directories, a ``latest`` pointer and, transiently, the
directory of a save in progress::

    root/
      latest                     "step_00000120" (atomic write: temp file + os.replace)
      step_00000100/             a complete checkpoint
        complete.json            completion marker, written last, before the directory is renamed;
                                 size + CRC-32 of every file (verified before a resume)
        config.yaml              the run config (human-readable copy)
        metadata.json common.pt *.distcp ...   the dist_checkpointing payload
        rank_state/rank_00003.json per-rank RNG states + rank-local extra state (e.g. data
                                 loader), tagged JSON that loads without running code
        rank_state/index.json    global rank -> (tp, pp, dp, cp) ranks at save time
      tmp_step_00000120/         a save in progress, or one killed midway: never loaded, deleted
                                 by the next save

What is saved
    * ``model0``, ``model1``, ...: each model chunk's ``sharded_state_dict`` (one per virtual
      pipeline stage). Tensor keys are global (layer numbers include the pipeline offset), so a
      checkpoint loads at any TP/PP/VPP/DP layout.
    * ``optimizer``: ``optimizer.sharded_state_dict`` with
      ``distrib_optim_sharding_type='fully_reshardable'``: the distributed optimizer's shards are
      gathered into per-parameter tensors, so optimizer state also reshards (megatron-core's
      default type is rejected by dist_checkpointing: "flattened_range is not supported").
    * ``scheduler`` (step count), ``extra_state`` (the caller's global state: step counters,
      balancer state, ...) and ``checkpoint_meta`` (step, layout, config YAML) in the common part.
      Global extra state must be loadable with ``torch.load(weights_only=True)`` (plain
      containers, numbers, strings, tensors): dist_checkpointing reads ``common.pt`` that way, so
      :func:`save_checkpoint` checks it up front rather than failing at resume time.
    * per rank, in our own file: python/numpy/torch (and CUDA) RNG states, megatron-core's RNG
      tracker states and ``extra_state[RANK_LOCAL]`` (this rank's data-loader state, say).

Resuming at the SAME layout (world size, TP, PP, VPP, CP) restores every rank's RNG streams and
rank-local state exactly; with deterministic kernels the loss curve continues bit for bit. At a
different layout the model, optimizer and scheduler still load (resharded); rank-specific state
cannot map one-to-one, so the RNGs are re-seeded from (seed, step, pipeline rank) and the
rank-local state is taken from a saved rank with the same data-parallel rank when the data-parallel
size is unchanged, else it is None (see ``extra[META_KEY]['rank_local_source']``); the trainer then
refuses the resume unless ``training.on_dp_change=restart_data`` (``training/resume.py``), since
Energon's per-rank loader positions do not map onto another data-parallel size.

Integrity: ``complete.json`` lists size + CRC-32 of every file (each rank checksums the files it
wrote, rank 0 the rest) and ``training/ckpt_integrity.py`` verifies them before a resume. Rank
state files are tagged JSON (``training/safe_state.py``): reading one never runs code; the old
pickled ``rank_XXXXX.pt`` files are read only with ``MEGATRON_OMNI_TRUST_PICKLED_RANK_STATE=1``.

Publishing is atomic: every rank writes into ``tmp_step_XXXXXXXX``; after a barrier rank 0 writes
``complete.json``, renames the directory to ``step_XXXXXXXX``, rewrites ``latest`` and only then
deletes checkpoints beyond the newest ``keep_last``. A save killed at any point leaves the previous
checkpoint as :func:`find_latest`'s answer.

How ``training/trainer.py`` (``Trainer.setup`` / ``Trainer.train``) uses it; every call is
collective (all ranks, same order)::

    signals.install_signal_handlers()          # SIGTERM/SIGUSR1 set a flag (training/signals.py)
    chunks = build_omni_chunks(cfg)            # models/omni.py; then set_trainable(chunk, ...)
    ddp = wrap_ddp(cfg, chunks)                # training/optimizer.py
    opt = build_optimizer(cfg, ddp); sched = build_scheduler(cfg, opt)
    source = resume.choose_checkpoint(cfg, printer)   # training.load, else find_latest(save),
    if source is not None:                            # integrity-checked (training/resume.py)
        extra = load_checkpoint(source, ddp, opt, sched)
        step = extra["step"]
        data.restore_state(extra[RANK_LOCAL]["data"])  # when not None and the DP size matches
    elif cfg.stage.init_from:                  # a new stage: weights only, fresh optimizer
        load_checkpoint(cfg.stage.init_from, ddp, opt, None, weights_only=True,
                        allow_missing=cfg.stage.init_allow_missing or False)
    while step < cfg.training.train_iters:
        ... one step; sched.step(increment=1); step += 1 ...
        if step % cfg.training.save_interval == 0 or signals.should_save_and_exit():
            save_checkpoint(cfg.training.save, step, ddp, opt, sched,
                            {"step": step, ..., RANK_LOCAL: {"data": data.save_state()}}, cfg)
        # signalled: stop here; megatron_omni.train exits with signals.REQUEUE_EXIT_CODE
    save_checkpoint(...)                       # at the end, unless this step is already saved

megatron-core bugs worked around here (megatron-core 0.16.1):

1. ``DistributedOptimizer.state_dict`` with torch's Adam (no Apex/TE) asserts ``len(steps) == 1``
   over the per-parameter ``step`` values, which fails for an optimizer that has not stepped yet
   (no state) -- and ``sharded_state_dict(is_loading=True)`` calls it, so loading into a fresh
   optimizer fails. Fix: :func:`_ensure_adam_state` creates the state torch Adam creates on its
   first step (zero moments, ``step`` = 0) before the sharded state dict is built, for save and
   load; numerically identical to a fresh optimizer.
2. ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` ->
   ``_set_main_param_and_optimizer_states`` copies every key of the live per-parameter state from
   the loaded tensors, which never hold torch Adam's ``step`` (the loader skips it):
   ``KeyError: 'step'``. Fix: :func:`_load_optimizer_state` restores param groups/step through
   ``load_state_dict`` without the parameter state, then loads the parameter state with ``step``
   detached from the live state.
3. ``DistributedOptimizer.load_state_dict`` assigns ONE ``step`` tensor object to every
   parameter's state (``s["step"] = step``) and torch's ``Optimizer.load_state_dict`` keeps it
   shared, so each later step increments it once per parameter and Adam's bias correction is wrong
   after every resume. Fix: :func:`_unshare_adam_steps` gives every parameter its own copy after
   loading (harmless on the non-distributed path, where megatron-core deep-copies the step).
4. ``FP32Optimizer.sharded_state_dict`` (and the bf16 ``Float16OptimizerWithFloat16Params``)
   store the shared Adam step only ``if step:``, so a checkpoint taken before the first update
   has none and torch Adam's ``load_state_dict`` raises ``KeyError: 'step'``. Fix:
   :func:`_restore_zero_common_step` puts the 0 back before loading.
5. The distributed optimizer's default sharding type is rejected by dist_checkpointing
   ("flattened_range is not supported"): we always pass ``fully_reshardable``.
6. ``filesystem_async._get_write_results_queue`` (used by every torch_dist save, async or not)
   starts a ``multiprocessing`` manager server process (spawn) on the first save and keeps it for
   the process's life; when the rank is SIGKILLed (OOM killer, ``kill -9``, a node agent) that
   server and its resource tracker are orphaned and run on (idle) until someone kills them.
   Fix: :func:`_own_results_queue` creates that queue first, from a manager whose server asks the
   kernel to end it with its parent (``prctl(PR_SET_PDEATHSIG)``, Linux; elsewhere unchanged).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ..parallel.device import comm_device
from . import ckpt_integrity as integrity
from . import safe_state

log = logging.getLogger(__name__)

FORMAT = "megatron-omni/dist-ckpt/1"
COMPLETE = "complete.json"
LATEST = "latest"
RANK_DIR = "rank_state"
RANK_LOCAL = "rank_local"
"""Key of ``extra_state`` whose value is saved per rank (not merged across ranks)."""
META_KEY = "checkpoint_meta"
"""Key of the dict :func:`load_checkpoint` returns that describes the checkpoint and what was
restored (step, path, layout, config YAML, rng_restored, rank_local_source, allowed_missing)."""
SHARDED_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}

_STEP_RE = re.compile(r"step_(\d{8,})")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{int(step):08d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{int(rank):05d}.json"


TRUST_PICKLE_ENV = "MEGATRON_OMNI_TRUST_PICKLED_RANK_STATE"
"""Set to 1 to read a rank state file of the old pickle format (``rank_XXXXX.pt``, checkpoints
written before the JSON format): unpickling runs code from the file, so only for checkpoints you
wrote yourself."""


def read_rank_file(rank_dir: Path, rank: int) -> Optional[dict]:
    """One rank's saved state, or None if the checkpoint has no file for it. Never unpickles
    unless :data:`TRUST_PICKLE_ENV` is set (old ``.pt`` files)."""
    path = Path(rank_dir) / rank_file_name(rank)
    if path.is_file():
        try:
            return safe_state.loads(path.read_bytes())
        except (safe_state.UnsafeStateError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable rank state ({e})") from None
    legacy = Path(rank_dir) / f"rank_{int(rank):05d}.pt"
    if not legacy.is_file():
        return None
    if os.environ.get(TRUST_PICKLE_ENV) == "1":
        return torch.load(legacy, map_location="cpu", weights_only=False)
    try:
        return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        raise CheckpointError(
            f"{legacy} is a pickled rank state file (old format) that holds more than plain "
            f"tensors; unpickling it could run code from the file, so it is not read. If you "
            f"wrote this checkpoint yourself, set {TRUST_PICKLE_ENV}=1 for this resume (the next "
            f"checkpoint is written in the safe format). ({type(e).__name__})"
        ) from None


# --- finding checkpoints --------------------------------------------------------------------------


def list_checkpoints(root: Union[str, Path]) -> list[tuple[int, Path]]:
    """Published, complete checkpoints under ``root`` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.fullmatch(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(root: Union[str, Path]) -> Optional[Path]:
    """The newest COMPLETE checkpoint under ``root`` (None if there is none).

    Only published ``step_*`` directories with a completion marker count: ``tmp_*`` directories
    of saves in progress or killed, and step directories without a marker, are ignored. The
    directory scan is authoritative; ``latest`` is a convenience for humans and scripts.
    """
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A step directory as given, or the newest complete checkpoint of a root."""
    path = Path(path)
    if _STEP_RE.fullmatch(path.name) and path.is_dir():
        if not (path / COMPLETE).is_file():
            raise CheckpointError(
                f"{path} is not a complete checkpoint (no {COMPLETE}); it was "
                f"not published. Use its root to pick the newest complete one"
            )
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    return latest


def read_saved_config(path: Union[str, Path], meta: Optional[dict] = None):
    """The run config checkpoint ``path`` (a step directory, or a root: its newest complete
    checkpoint) was saved with, as a :class:`~megatron_omni.config.loader.SavedConfig`: read
    from the common state dict (``checkpoint_meta["config"]``; ``config.yaml`` beside it is a
    human-readable copy), or from ``meta`` when the caller has loaded it already. Every reader of
    a checkpoint's config (generation, conversion, the re-seed of a resume) goes through here or
    :func:`~megatron_omni.config.loader.parse_saved_config`, so keys this version does not know
    follow one rule (``SavedConfig``: an error under ``model``, a warning elsewhere)."""
    from ..config.loader import parse_saved_config

    ckpt = resolve_checkpoint(path)
    if meta is None:
        from megatron.core import dist_checkpointing

        meta = dist_checkpointing.load_common_state_dict(str(ckpt)).get(META_KEY) or {}
    return parse_saved_config(meta.get("config"), str(ckpt))


def read_latest(root: Union[str, Path]) -> Optional[str]:
    """Contents of ``root/latest`` (a step directory name) or None."""
    p = Path(root) / LATEST
    return p.read_text().strip() if p.is_file() else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so readers see the old or the new content, never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_latest(root: Union[str, Path], name: str) -> None:
    """Atomically point ``root/latest`` at ``name``."""
    _atomic_write_bytes(Path(root) / LATEST, (name + "\n").encode())


def cleanup_tmp(root: Union[str, Path]) -> list[Path]:
    """Delete ``tmp_*`` directories (saves that never published). Only call when no save into
    ``root`` is running. Returns what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("tmp_") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune_checkpoints(root: Union[str, Path], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all).

    Each victim is first renamed to ``tmp_delete_*`` (atomic), so a deletion cut short never
    leaves a half-deleted directory that still looks complete.
    """
    if keep_last <= 0:
        return []
    found = list_checkpoints(root)
    removed = []
    for _, p in found[:-keep_last]:
        trash = p.with_name(f"tmp_delete_{p.name}")
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(p)
    return removed


# --- layouts, RNG, rank-local state ---------------------------------------------------------------


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return dict(
        world_size=torch.distributed.get_world_size(),
        rank=torch.distributed.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


_SHAPE_KEYS = ("world_size", "tp", "pp", "vpp", "cp", "dp")


def _shape(layout: dict) -> dict:
    return {k: layout.get(k) for k in _SHAPE_KEYS}


def _rng_value(v):
    if isinstance(v, torch.Generator):  # graph-safe trackers keep generator objects
        return v.get_state().clone()
    return v.clone() if torch.is_tensor(v) else v


def capture_rng_state() -> dict:
    """This rank's python, numpy, torch (CPU + CUDA) and megatron RNG-tracker states."""
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    state["tracker"] = {k: _rng_value(v) for k, v in tracker.get_states().items()}
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    current = tracker.get_states()
    new = {}
    for k, v in state.get("tracker", {}).items():
        if isinstance(current.get(k), torch.Generator):
            current[k].set_state(v)
            new[k] = current[k]
        else:
            new[k] = v.clone()
    tracker.set_states(new)


def reseed_rng(seed: int, step: int) -> None:
    """Fresh RNG streams for a resume at a different layout: python/numpy/torch and megatron's
    tracker (per-TP-rank model-parallel stream, shared data-parallel stream), seeded from the run
    seed, the step (so the streams do not replay the start of the run) and the pipeline rank."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    s = (int(seed) + 100 * ps.get_pipeline_model_parallel_rank() + 7919 * int(step)) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s)


# --- optimizer state fixes (see module docstring, bugs 1 and 2) -----------------------------------


def _adam_like(inner) -> bool:
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _ensure_adam_state(optimizer) -> None:
    """Work-around for megatron-core ``DistributedOptimizer.state_dict`` (``assert len(steps)
    == 1`` with torch Adam before its first step; bug 1 of the module docstring): give every
    parameter the state torch Adam creates on its first step (``step`` = 0, zero moments)."""
    from .optimizer import inner_optimizers

    for inner in inner_optimizers(optimizer):
        if not _adam_like(inner):
            continue  # TE/Apex FusedAdam keep 'step' in the param groups; nothing to do
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if len(st) > 0:
                    continue
                on_param = group.get("capturable") or group.get("fused")
                st["step"] = torch.zeros(
                    (), dtype=torch.float32, device=p.device if on_param else "cpu"
                )
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _unshare_adam_steps(optimizer) -> int:
    """Work-around for megatron-core ``DistributedOptimizer.load_state_dict`` setting one shared
    ``step`` tensor on every parameter: give each its own copy. Returns how many were shared."""
    from .optimizer import inner_optimizers

    shared = 0
    for inner in inner_optimizers(optimizer):
        if not _adam_like(inner):
            continue
        seen = set()
        for st in inner.state.values():
            if not st:
                continue
            step = st.get("step")
            if step is None:
                st["step"] = torch.zeros((), dtype=torch.float32)
            elif torch.is_tensor(step):
                if id(step) in seen:
                    shared += 1
                seen.add(id(step))
                st["step"] = step.detach().clone()
    return shared


def _restore_zero_common_step(state) -> None:
    """Work-around for megatron-core ``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params``
    ``.sharded_state_dict``, which store the shared Adam step only ``if step:``, so a step of 0
    (a checkpoint taken before the first update) is dropped and torch Adam's ``load_state_dict``
    then raises ``KeyError: 'step'`` (bug 4 of the module docstring). Puts the 0 back."""
    if not isinstance(state, dict):
        return
    inner = state.get("optimizer") if isinstance(state.get("optimizer"), dict) else state
    per_param = inner.get("state")
    if not isinstance(per_param, dict) or not per_param or "common_step" in per_param:
        return
    if not any(isinstance(v, dict) and "step" in v for v in per_param.values()):
        per_param["common_step"] = torch.zeros((), dtype=torch.float32)


def _load_optimizer_state(optimizer, state) -> None:
    """``optimizer.load_state_dict(state)`` with the distributed-optimizer + torch Adam fix.

    Work-around for megatron-core ``DistributedOptimizer.load_parameter_state_from_fully_
    reshardable`` -> ``_set_main_param_and_optimizer_states``: it copies EVERY key of the live
    per-parameter state from the loaded tensors, but the loaded tensors never contain torch
    Adam's ``step`` (that loader skips it on purpose), so it raises ``KeyError: 'step'``. We let
    ``load_state_dict`` restore param groups, step and grad scaler without the parameter state,
    then load the parameter state with ``step`` detached from the live state, then put it back.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", None)
    if subs is None:
        pairs = [(optimizer, state)]
    elif len(subs) == 1:
        pairs = [(subs[0], state)]
    else:
        states = [v for _, v in sorted(state.items())] if isinstance(state, dict) else list(state)
        if len(states) != len(subs):
            raise CheckpointError(
                f"checkpoint has {len(states)} optimizer parts, this run {len(subs)}"
            )
        pairs = list(zip(subs, states))
    for sub, st in pairs:
        needs_fix = (
            isinstance(sub, DistributedOptimizer)
            and isinstance(st, dict)
            and st.get("param_state_sharding_type") == "fully_reshardable"
            and _adam_like(sub.optimizer)
        )
        if not needs_fix:
            if _adam_like(getattr(sub, "optimizer", None)):
                _restore_zero_common_step(st)
            sub.load_state_dict(st)
            continue
        st = dict(st)
        param_state = st.pop("param_state")
        st.pop("param_state_sharding_type")
        sub.load_state_dict(st)
        steps = {p: s.pop("step") for p, s in sub.optimizer.state.items() if "step" in s}
        try:
            sub.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                sub.optimizer.state[p]["step"] = step
    if subs is not None and len(subs) > 1:
        optimizer._synchronize_steps()


def _optimizer_kind(optimizer) -> Optional[str]:
    if optimizer is None:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return "distributed" if any(isinstance(s, DistributedOptimizer) for s in subs) else "local"


# --- save -----------------------------------------------------------------------------------------


def _unwrap(chunks: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(chunks))


def _model_sharded_state_dict(chunks) -> dict:
    return {
        f"model{i}": c.sharded_state_dict(metadata=dict(SHARDED_METADATA))
        for i, c in enumerate(chunks)
    }


def _check_common_loadable(obj: Any, what: str) -> None:
    """dist_checkpointing loads common.pt with torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as e:  # noqa: BLE001 - we re-raise with advice
        raise CheckpointError(
            f"{what} cannot be stored in the checkpoint's common part (it must load with "
            f"torch.load(weights_only=True): plain dicts/lists/tuples, numbers, strings, tensors). "
            f"Convert it, or put per-rank objects under extra_state[{RANK_LOCAL!r}]. ({e})"
        ) from e


def _die_with_parent(parent_pid: int) -> None:
    """Manager-server initializer: SIGTERM this process when its parent dies (Linux)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _own_results_queue() -> None:
    """Work-around 6 of the module docstring: megatron-core's write-results queue from a
    manager that dies with this process."""
    import multiprocessing as mp
    import sys

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if fa._results_queue is not None or not sys.platform.startswith("linux"):
        return
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    fa._results_queue = manager.Queue()
    _OWN_MANAGER.append(manager)  # keep it referenced for the process's life


_OWN_MANAGER: list = []


def _save_strategy():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    strategy = get_default_save_sharded_strategy("torch_dist")
    if ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        # Spread the writes of replicated shards over the data-parallel ranks.
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, ps.get_data_parallel_group(with_context_parallel=True)
        )
    return strategy


def _config_yaml(cfg) -> Optional[str]:
    if cfg is None:
        return None
    import yaml

    from ..config.loader import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _publish(
    root: Path,
    tmp: Path,
    final: Path,
    step: int,
    keep_last: int,
    meta: dict,
    known_sums: Optional[dict] = None,
) -> None:
    """Rank 0, after every rank finished writing into ``tmp``. ``known_sums``: checksums the
    ranks computed for their own files; the remaining files are checksummed here."""
    known = dict(known_sums or {})
    files = {**known, **integrity.file_checksums(tmp, skip=known)}
    _atomic_write_bytes(
        tmp / COMPLETE,
        json.dumps(
            {
                "step": int(step),
                "time": time.time(),
                "format": FORMAT,
                "layout": meta["layout"],
                "files": dict(sorted(files.items())),
            },
            indent=1,
        ).encode(),
    )
    _fsync_dir(tmp)
    replaced = None
    if final.exists():  # re-saving a step (e.g. after resuming from an older checkpoint)
        replaced = root / f"tmp_replaced_{final.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(root)
    write_latest(root, final.name)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    try:
        prune_checkpoints(root, keep_last)
    except OSError as e:  # the new checkpoint is published; a failed clean-up must not stop
        log.warning("could not delete old checkpoints under %s: %s", root, e)


def _on_rank0(fn, what: str) -> None:
    """Run ``fn`` on rank 0 and raise its error on EVERY rank (a bare barrier would leave the
    other ranks waiting for a rank that already failed)."""
    err = None
    if torch.distributed.get_rank() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised on all ranks below
            log.exception("%s failed", what)
            err = f"{type(e).__name__}: {e}"
    status = [err]
    torch.distributed.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise CheckpointError(f"{what} failed on rank 0: {status[0]}")


def save_checkpoint(
    root: Union[str, Path],
    step: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    extra_state: Optional[dict] = None,
    cfg=None,
    *,
    keep_last: Optional[int] = None,
) -> Path:
    """Save a checkpoint of ``step`` under ``root`` (collective: call on every rank).

    Args:
        root: checkpoint root (shared file system, same path on every rank).
        step: optimizer steps done; names the directory ``step_XXXXXXXX``.
        model_chunks: this rank's model chunks (DDP-wrapped or not), one per virtual stage.
        optimizer, scheduler: megatron-core optimizer / ``OptimizerParamScheduler`` (or None).
        extra_state: global state (identical on all ranks; rank 0's copy is kept), except
            ``extra_state[RANK_LOCAL]``, which is saved per rank (e.g. the data-loader state of
            this data-parallel rank).
        cfg: the run's ``OmniConfig`` (saved as YAML; supplies ``keep_last_checkpoints``).
        keep_last: override of ``cfg.training.keep_last_checkpoints`` (0 keeps all).

    Returns the published ``step_XXXXXXXX`` path.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    rank = torch.distributed.get_rank()
    extra = dict(extra_state or {})
    rank_local = extra.pop(RANK_LOCAL, None)
    if META_KEY in extra:
        raise ValueError(f"extra_state must not use the reserved key {META_KEY!r}")
    if keep_last is None:
        keep_last = cfg.training.keep_last_checkpoints if cfg is not None else 0
    _check_common_loadable(extra, "extra_state")
    chunks = _unwrap(model_chunks)
    config_yaml = _config_yaml(cfg)
    layout = _layout()
    meta = {
        "format": FORMAT,
        "step": int(step),
        "layout": _shape(layout),
        "optimizer": _optimizer_kind(optimizer),
        "num_chunks": len(chunks),
        "config": config_yaml,
    }

    model_sd = _model_sharded_state_dict(chunks)
    sd: dict = dict(model_sd)
    if optimizer is not None:
        _ensure_adam_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=dict(SHARDED_METADATA)
        )
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd["extra_state"] = extra
    sd[META_KEY] = meta

    name = step_dir_name(step)
    tmp, final = root / f"tmp_{name}", root / name

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        cleanup_tmp(root)  # leftovers of killed saves; no other save can be running now
        tmp.mkdir()

    _on_rank0(prepare, f"creating {tmp}")
    _own_results_queue()
    dist_checkpointing.save(sd, str(tmp), sharded_strategy=_save_strategy())

    rank_dir = tmp / RANK_DIR
    rank_dir.mkdir(exist_ok=True)
    # Tagged JSON, not a pickle: reading it back runs no code (training/safe_state.py).
    _atomic_write_bytes(
        rank_dir / rank_file_name(rank),
        safe_state.dumps({"layout": layout, "rng": capture_rng_state(), RANK_LOCAL: rank_local}),
    )
    # Each rank checksums what it wrote (in parallel); rank 0 adds the common files.
    sums = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(
        sums, integrity.file_checksums(tmp, only=integrity.own_files(tmp, rank))
    )
    layouts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(layouts, layout)
    if rank == 0:
        _atomic_write_bytes(rank_dir / "index.json", json.dumps(layouts, indent=0).encode())
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
    torch.distributed.barrier()  # every rank's files are on disk

    known = {k: v for part in sums for k, v in part.items()}
    _on_rank0(
        lambda: _publish(root, tmp, final, step, keep_last, meta, known), f"publishing {final}"
    )
    if rank == 0:
        log.info("saved checkpoint %s", final)
    return final


# --- load -----------------------------------------------------------------------------------------

LORA_PATTERN = "*.lora_"
"""An ``allow_missing`` entry matching every LoRA adapter (new in the alignment stage)."""


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    """``key`` starts with one of ``prefixes``; an entry ``*text`` matches ``text`` anywhere."""
    return any(key.startswith(p) if not p.startswith("*") else p[1:] in key for p in prefixes)


def _gather_union(items: Iterable[str]) -> list[str]:
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, sorted(set(items)))
    return sorted(set().union(*gathered))


def _mismatches(sd: dict, ckpt: Path) -> tuple[list[str], list[str]]:
    """(requested by some rank but absent from the checkpoint, in the checkpoint but requested by
    no rank): sharded keys, identical on every rank (the same test dist_checkpointing applies
    with ``StrictHandling.RETURN_ALL``, but before loading anything)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    pre, _, _ = load_preprocess(sd)
    requested = {v.key for v in nested_values(pre) if isinstance(v, ShardedBase)}
    saved = sorted({v.key for v in load_sharded_metadata(str(ckpt)).values()})
    used = torch.tensor([k in requested for k in saved], dtype=torch.uint8, device=comm_device())
    if used.numel():
        torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
    absent = _gather_union(requested.difference(saved))
    return absent, [k for k, u in zip(saved, used.tolist()) if not u]


def _seed_from(meta: dict, seed: Optional[int]) -> int:
    if seed is not None:
        return int(seed)
    if meta.get("config"):
        from ..config.loader import parse_saved_config

        try:  # the raw value: a key this version lost elsewhere must not stop a resume
            return int(parse_saved_config(meta["config"], "checkpoint").raw["training"]["seed"])
        except (KeyError, TypeError, ValueError):  # (ConfigError is a ValueError)
            pass
    return 1234


def _rank_state(ckpt: Path, meta: dict, weights_only: bool, seed: Optional[int]) -> dict:
    """Restore RNG (same layout) or re-seed (different layout); find this rank's local state."""
    info = {"rng_restored": False, "rank_local_source": None, RANK_LOCAL: None}
    if weights_only:
        return info
    layout = _layout()
    rank = layout["rank"]
    same_layout = _shape(layout) == meta.get("layout")
    st = read_rank_file(ckpt / RANK_DIR, rank) if same_layout else None
    if st is not None:
        restore_rng_state(st["rng"])
        info.update(rng_restored=True, rank_local_source="exact", **{RANK_LOCAL: st[RANK_LOCAL]})
        return info
    if same_layout:
        log.warning(
            "%s has no state file for rank %d (%s): its RNG streams are re-seeded and "
            "its rank-local state (data position) is taken from a rank of the same "
            "data-parallel rank if there is one",
            ckpt,
            rank,
            ckpt / RANK_DIR / rank_file_name(rank),
        )
        info["rank_state_missing"] = True
    reseed_rng(_seed_from(meta, seed), meta.get("step", 0))
    index_file = ckpt / RANK_DIR / "index.json"
    if meta.get("layout", {}).get("dp") == layout["dp"] and index_file.is_file():
        saved = json.loads(index_file.read_text())
        same_dp = [s for s in saved if s["dp_rank"] == layout["dp_rank"]]
        # Prefer the same pipeline stage, then the lowest TP/CP rank.
        same_dp.sort(
            key=lambda s: (
                s["pp_rank"] != layout["pp_rank"],
                s["pp_rank"],
                s["tp_rank"],
                s["cp_rank"],
            )
        )
        for cand in same_dp:
            st = read_rank_file(ckpt / RANK_DIR, cand["rank"])
            if st is not None:
                info.update(rank_local_source="data_parallel_rank", **{RANK_LOCAL: st[RANK_LOCAL]})
                break
    return info


def load_checkpoint(
    path: Union[str, Path],
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    strict: bool = True,
    load_optimizer: bool = True,
    *,
    weights_only: bool = False,
    allow_missing: Union[bool, Sequence[str]] = False,
    seed: Optional[int] = None,
) -> dict:
    """Load a checkpoint into this rank's model chunks (and optimizer/scheduler); collective.

    Args:
        path: a ``step_XXXXXXXX`` directory, or a root (its newest complete checkpoint).
        model_chunks: DDP-wrapped or bare chunks, built for the CURRENT layout (any TP/PP/VPP/DP;
            the weights are resharded on load).
        optimizer: loaded unless ``load_optimizer`` is False or ``weights_only``; in those cases
            its main parameters are refreshed from the loaded weights.
        scheduler: its step count is restored unless ``weights_only``; lr, min_lr, warm-up and
            length stay those of the current config.
        strict: a model parameter of the checkpoint that no rank asks for is an error (else a
            warning).
        weights_only: stage initialisation: model weights only; optimizer, scheduler, RNG and
            extra state are not touched and only ``META_KEY`` (and ``RANK_LOCAL`` = None) is
            returned.
        allow_missing: model parameters absent from the checkpoint (a new encoder, say) are
            allowed and keep their initialisation: True for any, or a list of parameter-name
            prefixes (``["vision.", "audio_projector."]``). Otherwise they are an error that
            names them.
        seed: re-seed base for a resume at a different layout (default: the saved config's
            ``training.seed``).

    Returns:
        The saved global ``extra_state`` plus ``extra[RANK_LOCAL]`` (this rank's saved local
        state, or None) and ``extra[META_KEY]`` (step, path, layout, config YAML, rng_restored,
        rank_local_source: 'exact' | 'data_parallel_rank' | None, allowed_missing).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt = resolve_checkpoint(path)
    chunks = _unwrap(model_chunks)
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    meta = common.get(META_KEY)
    if not meta or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a megatron-omni checkpoint (format {FORMAT})")
    if allow_missing is True:
        allowed: Optional[list[str]] = None  # anything
    else:
        allowed = list(allow_missing or [])

    model_sd = _model_sharded_state_dict(chunks)
    sd: dict = dict(model_sd)
    want_opt = optimizer is not None and load_optimizer and not weights_only
    if want_opt:
        if "optimizer" not in common:
            raise CheckpointError(
                f"{ckpt} holds no optimizer state; load with load_optimizer=False (fresh optimizer)"
            )
        kind = _optimizer_kind(optimizer)
        if meta.get("optimizer") != kind:
            raise CheckpointError(
                f"{ckpt} was saved with the {meta.get('optimizer')} optimizer but this run uses "
                f"the {kind} one (training.use_distributed_optimizer changed); load with "
                f"load_optimizer=False or switch it back"
            )
        _ensure_adam_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=dict(SHARDED_METADATA)
        )

    # Mismatches are decided BEFORE anything is loaded, identically on every rank, so a refused
    # load leaves the model untouched.
    unexpected, dropped = _mismatches(sd, ckpt)
    bad_new = [
        k
        for k in unexpected
        if not (
            allowed is None
            or _matches(k, allowed)
            or (
                k.startswith("optimizer.")
                and allowed is not None
                and _matches(k.split(".", 3)[-1], allowed)
            )
        )
    ]
    if bad_new:
        raise CheckpointError(
            f"{ckpt} lacks {len(bad_new)} tensor(s) this model needs: {bad_new[:8]}"
            f"{' ...' if len(bad_new) > 8 else ''}; to keep their initialisation (stage "
            f"initialisation with a new module) pass allow_missing=[name prefixes]"
        )
    dropped = [k for k in dropped if not k.startswith("optimizer.")]
    if dropped:
        msg = (
            f"{ckpt} has {len(dropped)} tensor(s) this model does not: {dropped[:8]}"
            f"{' ...' if len(dropped) > 8 else ''}"
        )
        if strict:
            raise CheckpointError(msg + "; load with strict=False to ignore them")
        log.warning(msg)

    # RETURN_UNEXPECTED drops the (allowed) absent tensors from the request instead of failing.
    loaded = dist_checkpointing.load(sd, str(ckpt), strict=StrictHandling.RETURN_UNEXPECTED)[0]

    for i, chunk in enumerate(chunks):
        result = chunk.load_state_dict(loaded[f"model{i}"], strict=False)
        miss = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        miss = [k for k in miss if not (allowed is None or _matches(k, allowed))]
        if miss or result.unexpected_keys:
            raise CheckpointError(
                f"model{i}: state dict mismatch after load: missing {miss[:8]}, "
                f"unexpected {result.unexpected_keys[:8]}"
            )

    if want_opt:
        _load_optimizer_state(optimizer, loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    elif optimizer is not None:
        optimizer.reload_model_params()

    if scheduler is not None and not weights_only and "scheduler" not in loaded:
        log.warning("%s holds no scheduler state; the lr schedule starts from step 0", ckpt)
    if scheduler is not None and not weights_only and "scheduler" in loaded:
        # The current config defines the schedule's shape; param groups loaded from the
        # checkpoint carry the old max_lr/min_lr, which get_lr would otherwise prefer.
        for group in getattr(optimizer, "param_groups", []) if optimizer is not None else []:
            if group.get("default_config", True):
                group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
        scheduler.num_steps = 0  # load_state_dict adds the saved count
        scheduler.load_state_dict(loaded["scheduler"])

    info = _rank_state(ckpt, meta, weights_only, seed)
    out = {} if weights_only else dict(loaded.get("extra_state") or {})
    out[RANK_LOCAL] = info.pop(RANK_LOCAL)
    out[META_KEY] = {
        "step": meta["step"],
        "path": str(ckpt),
        "layout": meta["layout"],
        "config": meta.get("config"),
        "allowed_missing": unexpected,
        **info,
    }
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        log.info(
            "loaded checkpoint %s (step %d, rng %s)",
            ckpt,
            meta["step"],
            "restored" if info["rng_restored"] else "re-seeded",
        )
    return out
