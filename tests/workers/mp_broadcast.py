"""4-rank gloo worker: TP2 x PP2, one reader per model-parallel group, batches by broadcast.

megatron-core's parallel state at TP2 x PP2 (ranks 0, 1: first stage; 2, 3: last). Only the rank
``reads_data`` names "opens the loader" (a counting fake loader building a deterministic omni
batch); :class:`LoadOnceFeed` hands each batch to the others. Every rank reports which loaders it
opened, a digest of every value it received per step, what ``share_object`` gave and what a
failing read raised; rank 0 writes them all as JSON.
"""

import hashlib
import sys

import torch
import torch.distributed as dist

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from dist_utils import finish_worker  # noqa: E402

from megatron_omni.config.schema import ParallelConfig  # noqa: E402
from megatron_omni.data.mp_broadcast import LoadOnceFeed  # noqa: E402
from megatron_omni.parallel import runtime  # noqa: E402

OPENED = {"loaders": 0}


def make_batch(step: int) -> dict:
    """What a loader would yield (deterministic in ``step``)."""
    g = torch.Generator().manual_seed(1000 + step)
    T = 64
    return {
        "tokens": torch.randint(0, 32000, (1, T), generator=g),
        "labels": torch.randint(0, 32000, (1, T), generator=g),
        "loss_mask": (torch.rand(1, T, generator=g) > 0.3).float(),
        "gen_audio_mask": torch.rand(1, T, generator=g) > 0.9,
        "position_ids": torch.randint(0, T, (3, 1, T), generator=g),
        "cu_seqlens": torch.tensor([0, 20, 47, T], dtype=torch.int32),
        "max_seqlen": 27,
        "vision_patches": torch.randn(40 + step, 1176, generator=g).bfloat16(),
        "vision_grid_thw": torch.tensor([[1, 4, 6], [1, 4, 4]]),
        "video_pixel_values": torch.zeros(0, 1176),
        "audio_waveforms": [torch.randn(1600 + step, generator=g)],
        "audio_lengths": torch.tensor([1600 + step]),
        "image_grids_per_sample": [[torch.tensor([[1, 4, 6]]), torch.zeros(0, 3).long()]],
        "scale": torch.tensor(0.5, dtype=torch.float64),
        "modality": "image",
        "sample_keys": [("a", 1), "b"],
        "skipped": {"too_long": step},
        "extra": None,
    }


def open_loader():
    OPENED["loaders"] += 1
    return make_batch


def digest(v):
    if isinstance(v, torch.Tensor):
        return [str(v.dtype), list(v.shape), v.device.type, hashlib.sha256(
            v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()]
    if isinstance(v, dict):
        return {k: digest(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [type(v).__name__] + [digest(x) for x in v]
    return repr(v)


def main(out_path: str) -> None:
    runtime.initialize(ParallelConfig(tensor_model_parallel_size=2,
                                      pipeline_model_parallel_size=2))
    feed = LoadOnceFeed()
    loader = open_loader() if feed.is_reader else None
    seen = [digest(feed.share(loader(step) if loader else None)) for step in range(3)]
    shared = feed.share_object({"state": [1, 2]} if feed.is_reader else None)
    try:
        feed.share(ValueError("damaged shard") if feed.is_reader else None)
        failed = None
    except Exception as e:  # noqa: BLE001 - reported
        failed = f"{type(e).__name__}: {e}"
    report = {"rank": dist.get_rank(), "pp": feed.pp_rank, "tp": feed.tp_rank,
              "reader": feed.is_reader, "src": feed.src, "loaders": OPENED["loaders"],
              "steps": seen, "shared": shared, "failed": failed}
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, report)
    finish_worker(out_path, everything)


if __name__ == "__main__":
    main(sys.argv[1])
