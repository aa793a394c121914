"""Worker: the real Trainer on Energon data at TP2 x PP2 (4 gloo ranks), the data read by every
rank (``data.load_once_per_mp_group=false``) vs once per model-parallel group, in one launch.

argv: result.json, then the save root, then key=value overrides of the tiny run (without
``training.save``). Runs, one after the other, from the same seeds: ``off`` (every rank reads),
``on`` (one reader), ``part`` (load-once, stops after 2 steps) and ``resumed`` (continues
``part``). Per run and rank: the loss history, the OmniLoaders objects built, the loader worker
processes seen (new child processes while batches are drawn), a digest of every batch drawn and
the skipped-sample count. Rank 0 writes {run: [per-rank reports]}.
"""

import hashlib
import sys

import psutil
import torch

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from dist_utils import finish_worker  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402

from megatron_omni.config import load_config  # noqa: E402
from megatron_omni.data import loaders as loaders_mod  # noqa: E402
from megatron_omni.parallel import runtime  # noqa: E402
from megatron_omni.training.trainer import Trainer  # noqa: E402

torch.set_num_threads(1)
BUILT = {"n": 0}
_orig_init = loaders_mod.OmniLoaders.__init__


def counting_init(self, *a, **kw):
    BUILT["n"] += 1
    _orig_init(self, *a, **kw)


loaders_mod.OmniLoaders.__init__ = counting_init


def digest(v):
    if isinstance(v, torch.Tensor):
        return hashlib.sha256(str((v.dtype, tuple(v.shape))).encode() + v.detach().contiguous()
                              .reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    if isinstance(v, dict):
        return {str(k): digest(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [digest(x) for x in v]
    return repr(v)


def run(name, save_root, overrides, *extra):
    cfg = load_config(None, [*overrides, f"training.save={save_root}/{name.split('_')[0]}",
                             *extra])
    seed = cfg.training.seed
    if not ps.model_parallel_is_initialized():
        runtime.initialize(cfg.parallel, seed=seed)
    BUILT["n"] = 0
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    workers, batches = set(), []
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    trainer = Trainer(cfg, printer=lambda s: None)
    trainer.setup()
    orig = trainer.data.next

    def next_recorded(modality):
        b = orig(modality)
        workers.update(p.pid for p in me.children(recursive=True) if p.pid not in before)
        batches.append(digest(b))
        return b

    trainer.data.next = next_recorded
    s = trainer.train()
    return {"history": s.loss_history, "last_step": s.last_step, "loaders": BUILT["n"],
            "workers": len(workers), "batches": batches,
            "skipped": trainer.data.skipped_total, "reads": trainer.data.reads,
            "rank": torch.distributed.get_rank(),
            "pp": ps.get_pipeline_model_parallel_rank(),
            "tp": ps.get_tensor_model_parallel_rank()}


def main(out_path, save_root, overrides):
    out = {}
    for name, extra in (("off", ["data.load_once_per_mp_group=false"]),
                        ("on", []),
                        ("part", ["training.exit_interval=2"]),
                        ("part_resumed", [])):
        rep = run(name, save_root, overrides, *extra)
        everything = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everything, rep)
        out[name] = everything
    finish_worker(out_path, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
