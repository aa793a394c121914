"""Worker: several short runs of the real Trainer on Energon data in one launch (gloo ranks),
one after the other from the same seeds, for the load-once and DP-balance tests.

argv: result.json, the save root, a JSON list of runs ``[name, save dir name, [overrides]]``,
then the key=value overrides every run shares (without ``training.save``). Per run and rank:
the loss history, the OmniLoaders objects built, the loader worker processes seen (new child
processes while batches are drawn), per step a digest and the sample names of every micro-batch
drawn (``next_step``), this rank's step cost (``CostModel.batch_cost``), the micro-batches
its DP exchange sent and the skipped-sample count. Rank 0 writes {run: [per-rank reports]}.
"""

import hashlib
import json
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
from megatron_omni.data.dp_balance import CostModel  # noqa: E402
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


def run(name, save_dir, save_root, overrides, *extra):
    cfg = load_config(None, [*overrides, f"training.save={save_root}/{save_dir}", *extra])
    seed = cfg.training.seed
    if not ps.model_parallel_is_initialized():
        runtime.initialize(cfg.parallel, seed=seed)
    BUILT["n"] = 0
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    workers, batches, names, costs = set(), [], [], []
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    trainer = Trainer(cfg, printer=lambda s: None)
    trainer.setup()
    orig = trainer.data.next_step
    cost = CostModel.from_config(cfg)

    def next_step_recorded(modalities, n):
        step = orig(modalities, n)
        workers.update(p.pid for p in me.children(recursive=True) if p.pid not in before)
        for m in modalities:
            batches.extend(digest(b) for b in step[m])
            names.append([m, [list(b["sample_names"]) for b in step[m]]])
        costs.append(sum(cost.batch_cost(b) for bs in step.values() for b in bs))
        return step

    trainer.data.next_step = next_step_recorded
    s = trainer.train()
    ex = trainer.data.exchange
    return {"history": s.loss_history, "last_step": s.last_step, "loaders": BUILT["n"],
            "workers": len(workers), "batches": batches, "names": names, "costs": costs,
            "moved": ex.moved if ex is not None else 0,
            "decoder": trainer.data.decoder is not None,
            "skipped": trainer.data.skipped_total, "reads": trainer.data.reads,
            "rank": torch.distributed.get_rank(),
            "dp": ps.get_data_parallel_rank(),
            "pp": ps.get_pipeline_model_parallel_rank(),
            "tp": ps.get_tensor_model_parallel_rank()}


def main(out_path, save_root, runs, overrides):
    out = {}
    for name, save_dir, extra in json.loads(runs):
        rep = run(name, save_dir, save_root, overrides, *extra)
        everything = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everything, rep)
        out[name] = everything
    finish_worker(out_path, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
