"""Read and decode a batch once per model-parallel group; the other ranks receive it.

What megatron-core's own pretraining does (``get_batch_on_this_tp_rank``): only one rank of each
tensor-parallel group reads and the others receive the batch by broadcast. Here one rank per
*model-parallel* group (all ranks of one data-parallel rank: TP x PP x CP) reads and decodes:

* :func:`reads_data`: TP rank 0, CP rank 0 of the FIRST pipeline stage builds the loaders (and
  their worker processes) and decodes, including the deferred GPU decode
  (``data/media/deferred.py``), which runs on the reader BEFORE the broadcast. Why not one
  reader per stage (megatron's first + last)? Every stage of ours needs inputs (each LLM layer
  applies M-RoPE and packed attention: ``position_ids``, ``cu_seqlens``; the global token counts
  of ``training/step.py`` need ``labels`` and ``loss_mask`` on every stage), and which samples
  a row keeps depends on decoding (a medium that fails to decode is skipped, or with deferred
  decoding masked out of ``loss_mask``): readers per stage would each have to decode every
  medium to agree on the rows. One reader decodes once, and the rows agree by construction.
* :class:`LoadOnceFeed` hands each batch on: the light keys (tokens, labels, masks, positions,
  boundaries, grids, counts: a few bytes per token) to every rank of the model-parallel group,
  the media (:data:`FIRST_STAGE_ONLY`: pixels, waveforms) only to the first stage's TP (x CP)
  group, where the encoders run; other stages never receive pixels (:func:`stage_batch`).
  With PP = 1 that is one broadcast over the TP (x CP) group. Context parallelism > 1 is refused
  by config validation (packed rows are not split across CP ranks yet), so no CP slicing is
  needed; the groups already include the CP ranks for when it is.
* :func:`broadcast_batch` sends any structure (dicts, lists, tuples, tensors, plain values) from
  the source rank to the group, bit for bit: the structure plus every tensor's shape, dtype and
  device kind as one pickled object, then ALL tensors' bytes as one flat buffer (one collective
  per batch, whatever the number of tensors); receivers get each tensor on the device kind the
  source had it on (CPU stays CPU; CUDA on their own GPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["FIRST_STAGE_ONLY", "LoadOnceFeed", "broadcast_batch",
           "reads_data", "recv_batch", "send_batch", "stage_batch", "stage_keys"]

FIRST_STAGE_ONLY = ("vision_patches", "image_pixel_values", "video_pixel_values",
                    "audio_waveforms", "media")
"""Inputs only the first pipeline stage uses (the encoders' media; the bulk of a batch)."""


_FAILED = "__load_once_failed__"
_ALIGN = 16  # bytes: every tensor starts aligned in the flat buffer (``view(dtype)`` needs it)


def stage_keys(keys, pp_rank: int, pp_size: int) -> list[str]:
    """The batch keys pipeline stage ``pp_rank`` of ``pp_size`` needs (in the given order): all
    but the media on the later stages. (No key is last-stage only: ``labels`` and ``loss_mask``
    are small and every stage needs them for the global token counts and loss reports of
    ``training/step.py``.)"""
    return [k for k in keys if pp_rank == 0 or k not in FIRST_STAGE_ONLY]


def stage_batch(batch: dict, pp_rank: int, pp_size: int) -> dict:
    return {k: batch[k] for k in stage_keys(batch, pp_rank, pp_size)}


def reads_data(tp_rank: int, cp_rank: int = 0, pp_rank: int = 0) -> bool:
    """Whether this rank builds loaders and decodes: one rank per model-parallel group, TP rank 0
    and CP rank 0 of the first pipeline stage (see the module docstring)."""
    return tp_rank == 0 and cp_rank == 0 and pp_rank == 0


def _pack(obj: Any, tensors: list) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("__tensor__", tuple(obj.shape), str(obj.dtype).replace("torch.", ""),
                obj.device.type)
    if isinstance(obj, dict):
        return {k: _pack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        packed = [_pack(v, tensors) for v in obj]
        return packed if isinstance(obj, list) else ("__tuple__", packed)
    return obj


def _is_tensor_spec(obj: Any) -> bool:
    return isinstance(obj, tuple) and len(obj) == 4 and obj[0] == "__tensor__"


def _unpack(obj: Any, tensors: list) -> Any:
    if _is_tensor_spec(obj):
        return tensors.pop()
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tuple__":
        return tuple(_unpack(v, tensors) for v in obj[1])
    if isinstance(obj, dict):
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def _specs(obj: Any, out: list) -> None:
    if _is_tensor_spec(obj):
        out.append((obj[1], getattr(torch, obj[2]), obj[3]))
    elif isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tuple__":
        for v in obj[1]:
            _specs(v, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _specs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _specs(v, out)


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _unflatten(buf, specs, sizes, structure, device):
    """The tensors of a received flat byte buffer (``specs``: shape, dtype, device kind per
    tensor; ``sizes``: their byte counts), put back into ``structure``."""
    out, at = [], 0
    for (shape, dt, kind), n in zip(specs, sizes):
        piece = buf[at:at + n]
        at += _padded(n)
        t = piece.view(dt).reshape(shape) if n else torch.empty(shape, dtype=dt, device=device)
        out.append(t.to(_device_of(kind)))
    return _unpack(structure, out[::-1])


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_batch(batch: Any, src: int, group=None) -> Any:
    """``batch`` on the global rank ``src`` (ignored elsewhere) -> the same value on every rank
    of ``group``: tensors keep dtype, shape, bits and device kind. Two collectives: the pickled
    structure, then one flat byte buffer of all tensors (on the group's communication device:
    CPU for gloo, this rank's GPU for NCCL)."""
    is_src = dist.get_rank() == src
    if is_src and batch is None:
        raise ValueError("the source rank must pass the batch")
    tensors: list = []
    holder = [_pack(batch, tensors) if is_src else None]
    dist.broadcast_object_list(holder, src=src, group=group)
    structure = holder[0]
    specs: list = []
    _specs(structure, specs)
    sizes = [_nbytes(shape, dt) for shape, dt, _ in specs]
    total = sum(_padded(n) for n in sizes)
    if total == 0:
        if is_src:
            return batch
        return _unpack(structure, [torch.empty(shape, dtype=dt, device=_device_of(kind))
                                   for shape, dt, kind in reversed(specs)])
    device = _comm_device(group)
    if is_src:
        parts = []
        for t, n in zip(tensors, sizes):
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8).to(device)
            parts.append(flat)
            if _padded(n) > n:
                parts.append(torch.zeros(_padded(n) - n, dtype=torch.uint8, device=device))
        buf = torch.cat(parts)
    else:
        buf = torch.empty(total, dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=src, group=group)
    if is_src:
        return batch
    return _unflatten(buf, specs, sizes, structure, device)


def send_batch(batch: Any, dst: int, group=None) -> None:
    """Point to point: ``batch`` to the global rank ``dst`` (its :func:`recv_batch`), bit for bit
    as :func:`broadcast_batch` (the structure, then one flat buffer)."""
    tensors: list = []
    dist.send_object_list([_pack(batch, tensors)], dst=dst, group=group)
    if not sum(t.numel() for t in tensors):
        return
    device = _comm_device(group)
    parts = []
    for t in tensors:
        n = t.numel() * t.element_size()
        parts.append(t.detach().contiguous().reshape(-1).view(torch.uint8).to(device))
        if _padded(n) > n:
            parts.append(torch.zeros(_padded(n) - n, dtype=torch.uint8, device=device))
    dist.send(torch.cat(parts), dst=dst, group=group)


def recv_batch(src: int, group=None) -> Any:
    """The batch :func:`send_batch` sent from the global rank ``src``."""
    holder = [None]
    dist.recv_object_list(holder, src=src, group=group)
    structure = holder[0]
    specs: list = []
    _specs(structure, specs)
    sizes = [_nbytes(shape, dt) for shape, dt, _ in specs]
    if not sum(sizes):
        return _unpack(structure, [torch.empty(shape, dtype=dt, device=_device_of(kind))
                                   for shape, dt, kind in reversed(specs)])
    device = _comm_device(group)
    buf = torch.empty(sum(_padded(n) for n in sizes), dtype=torch.uint8, device=device)
    dist.recv(buf, src=src, group=group)
    return _unflatten(buf, specs, sizes, structure, device)


def _device_of(kind: str) -> torch.device:
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


class LoadOnceFeed:
    """Hands the reader's batches to the rest of its model-parallel group (module docstring).

    Built from megatron-core's parallel state on every rank (collective over the model-parallel
    group once). ``share(batch)``: the reader passes its batch, the others None; every rank gets
    what its pipeline stage needs. ``share_object(obj)``: any small picklable value, whole."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.cp_rank = ps.get_context_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.is_reader = reads_data(self.tp_rank, self.cp_rank, self.pp_rank)
        cp = ps.get_context_parallel_world_size()
        # megatron-core's model-parallel group is TP x PP; with CP > 1 (refused by validation
        # for now) the CP ranks would need a group of their own here.
        if cp != 1:
            raise NotImplementedError("data.load_once_per_mp_group with context parallelism "
                                      "> 1: set data.load_once_per_mp_group=false")
        self.mp_group = ps.get_model_parallel_group()
        self.stage_group = ps.get_tensor_and_context_parallel_group()
        ranks = [None] * dist.get_world_size(self.mp_group)
        dist.all_gather_object(ranks, (dist.get_rank(), self.is_reader), group=self.mp_group)
        readers = [r for r, reads in ranks if reads]
        if len(readers) != 1:
            raise RuntimeError(f"model-parallel group {ranks} has {len(readers)} data readers")
        self.src = readers[0]
        self.group_size = len(ranks)

    def _raise_if_failed(self, got: Any) -> None:
        if isinstance(got, dict) and _FAILED in got:
            raise RuntimeError(f"the data-reading rank {self.src} of this model-parallel group "
                               f"failed: {got[_FAILED]} (see its log)")

    def share_object(self, obj: Any) -> Any:
        """``obj`` from the reader (an exception there: raised on every rank)."""
        if self.group_size == 1:
            if isinstance(obj, BaseException):
                raise obj
            return obj
        failed = isinstance(obj, BaseException)
        holder = [({_FAILED: f"{type(obj).__name__}: {obj}"} if failed else obj)
                  if self.is_reader else None]
        dist.broadcast_object_list(holder, src=self.src, group=self.mp_group)
        if failed:
            raise obj
        self._raise_if_failed(holder[0])
        return holder[0]

    def share(self, batch: Any) -> dict:
        """The reader passes its batch (or the exception reading it raised: then every rank of
        the group raises instead of waiting on a broadcast that never comes); others None."""
        if self.group_size == 1:
            if isinstance(batch, BaseException):
                raise batch
            return batch
        if isinstance(batch, BaseException):
            broadcast_batch({_FAILED: f"{type(batch).__name__}: {batch}"}, self.src,
                            self.mp_group if self.pp_size > 1 else self.stage_group)
            raise batch
        if self.pp_size == 1:
            got = broadcast_batch(batch, self.src, self.stage_group)
            self._raise_if_failed(got)
            return got
        light = None
        if self.is_reader:
            light = {"keys": list(batch),
                     "batch": {k: v for k, v in batch.items() if k not in FIRST_STAGE_ONLY}}
        light = broadcast_batch(light, self.src, self.mp_group)
        self._raise_if_failed(light)
        media = dist.get_world_size(self.stage_group) > 1 and self.pp_rank == 0
        if self.is_reader:
            if media:
                broadcast_batch({k: v for k, v in batch.items() if k in FIRST_STAGE_ONLY},
                                self.src, self.stage_group)
            return batch
        got = dict(light["batch"])
        if media:  # the first stage's TP peers: the media too
            got.update(broadcast_batch(None, self.src, self.stage_group))
        keep = stage_keys(light["keys"], self.pp_rank, self.pp_size)
        return {k: got[k] for k in keep}
