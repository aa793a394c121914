"""Read and decode a batch once per model-parallel group; the other ranks receive it.

What megatron-core's own pretraining does (``get_batch_on_this_tp_rank``): only one rank of each
tensor-parallel group reads, and only the pipeline stages that use inputs; the others receive
the batch by broadcast. Here:

* :func:`reads_data` says which ranks build loaders: TP rank 0 (and CP rank 0) of the stages
  that need data (:func:`stage_keys`): the first (tokens, media, positions), the last (labels,
  loss mask, positions) and, because every LLM layer applies M-RoPE and packed attention, the
  middle ones (positions and ``cu_seqlens`` only; no media is decoded for them).
* :func:`broadcast_batch` sends a batch dict (tensors, lists of tensors, None and plain Python
  values) from the group's source rank to the rest of the group, bit for bit: the structure and
  the tensors' shapes/dtypes go as one pickled object, then every tensor by ``broadcast``.
* :func:`stage_batch` keeps the keys a stage needs.

Status: the primitive, the roles and the key selection are tested with gloo at TP2 x PP2
(``tests/data/test_mp_broadcast.py``). The hook into ``training/trainer.py`` / ``data/loaders.py``
(only reader ranks construct ``EnergonData``; the rest call :func:`broadcast_batch` with None)
is not wired yet: those files are being changed by other work.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["FIRST_STAGE_ONLY", "LAST_STAGE_ONLY", "broadcast_batch", "reads_data",
           "stage_batch", "stage_keys"]

FIRST_STAGE_ONLY = ("tokens", "vision_patches", "vision_grid_thw", "audio_waveforms",
                    "audio_lengths", "media")
"""Inputs only the first pipeline stage uses (embedding and encoders)."""

LAST_STAGE_ONLY = ("labels", "loss_mask")
"""Inputs only the last pipeline stage uses (the loss)."""


def stage_keys(keys, pp_rank: int, pp_size: int) -> list[str]:
    """The batch keys pipeline stage ``pp_rank`` of ``pp_size`` needs (in the given order)."""
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    out = []
    for k in keys:
        if k in FIRST_STAGE_ONLY and not first:
            continue
        if k in LAST_STAGE_ONLY and not last:
            continue
        out.append(k)
    return out


def stage_batch(batch: dict, pp_rank: int, pp_size: int) -> dict:
    return {k: batch[k] for k in stage_keys(batch, pp_rank, pp_size)}


def reads_data(tp_rank: int, cp_rank: int = 0) -> bool:
    """Whether this rank builds loaders and decodes: one rank per TP x CP group (every stage
    reads what it needs, see :func:`stage_keys`; CP ranks take their slice after the broadcast)."""
    return tp_rank == 0 and cp_rank == 0


def _pack(obj: Any, tensors: list) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("__tensor__", tuple(obj.shape), str(obj.dtype).replace("torch.", ""))
    if isinstance(obj, dict):
        return {k: _pack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        packed = [_pack(v, tensors) for v in obj]
        return packed if isinstance(obj, list) else ("__tuple__", packed)
    return obj


def _unpack(obj: Any, tensors: list) -> Any:
    if isinstance(obj, tuple) and len(obj) == 3 and obj[0] == "__tensor__":
        return tensors.pop(0)
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tuple__":
        return tuple(_unpack(v, tensors) for v in obj[1])
    if isinstance(obj, dict):
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def _specs(obj: Any, out: list) -> None:
    if isinstance(obj, tuple) and len(obj) == 3 and obj[0] == "__tensor__":
        out.append((obj[1], getattr(torch, obj[2])))
    elif isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tuple__":
        for v in obj[1]:
            _specs(v, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _specs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _specs(v, out)


def broadcast_batch(batch: Optional[dict], src: int, group=None) -> dict:
    """``batch`` on the global rank ``src`` (None elsewhere) -> the same batch on every rank of
    ``group``. Tensors keep dtype, shape and bits; they travel on the tensors' own device (CPU
    with gloo; the current CUDA device with NCCL)."""
    is_src = dist.get_rank() == src
    if is_src and batch is None:
        raise ValueError("the source rank must pass the batch")
    tensors: list = []
    holder = [_pack(batch, tensors) if is_src else None]
    dist.broadcast_object_list(holder, src=src, group=group)
    structure = holder[0]
    if is_src:
        out_tensors = [t.contiguous() for t in tensors]
    else:
        specs: list = []
        _specs(structure, specs)
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")
        out_tensors = [torch.empty(shape, dtype=dt, device=device) for shape, dt in specs]
    for t in out_tensors:
        dist.broadcast(t, src=src, group=group)
    return batch if is_src else _unpack(structure, list(out_tensors))
