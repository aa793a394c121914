"""4-rank gloo worker: TP2 x PP2, one reader per TP group, the batch by broadcast.

Rank r has pipeline rank r // 2 and tensor rank r % 2. Only TP rank 0 of each stage "opens the
loader" (``reads_data``; a counting fake loader building a deterministic omni batch) and keeps
the keys its stage needs (``stage_batch``); ``broadcast_batch`` sends it to the TP peer. Every
rank reports which loaders it opened and a digest of every value it holds; the last rank writes
them all as JSON.
"""

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from megatron_omni.data.mp_broadcast import broadcast_batch, reads_data, stage_batch

OPENED = {"loaders": 0}


def make_batch(step: int) -> dict:
    """What a loader would yield (deterministic in ``step``)."""
    g = torch.Generator().manual_seed(1000 + step)
    T = 64
    return {
        "tokens": torch.randint(0, 32000, (1, T), generator=g),
        "labels": torch.randint(0, 32000, (1, T), generator=g),
        "loss_mask": (torch.rand(1, T, generator=g) > 0.3).float(),
        "position_ids": torch.randint(0, T, (3, 1, T), generator=g),
        "cu_seqlens": torch.tensor([0, 20, 47, T], dtype=torch.int32),
        "vision_patches": torch.randn(40, 1176, generator=g, dtype=torch.float32).bfloat16(),
        "vision_grid_thw": [(1, 4, 6), (1, 4, 4)],
        "audio_waveforms": [torch.randn(1600 + step, generator=g)],
        "modality": "image",
        "num_pad": 3,
        "extra": None,
    }


def open_loader():
    OPENED["loaders"] += 1
    return make_batch


def digest(v):
    if isinstance(v, torch.Tensor):
        return [str(v.dtype), list(v.shape), hashlib.sha256(
            v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()]
    if isinstance(v, (list, tuple)):
        return [digest(x) for x in v]
    return repr(v)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pp_rank, tp_rank = rank // 2, rank % 2
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = tp_groups[pp_rank]
    src = pp_rank * 2  # the group's TP rank 0
    loader = open_loader() if reads_data(tp_rank) else None
    seen = []
    for step in range(3):
        batch = stage_batch(loader(step), pp_rank, 2) if loader is not None else None
        got = broadcast_batch(batch, src, group)
        seen.append({k: digest(v) for k, v in got.items()})
    report = {"rank": rank, "pp": pp_rank, "tp": tp_rank, "loaders": OPENED["loaders"],
              "steps": seen}
    everything = [None] * 4
    dist.all_gather_object(everything, report)
    if rank == 3:
        with open(out_path, "w") as f:
            json.dump(everything, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
