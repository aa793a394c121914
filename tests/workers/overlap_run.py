"""Worker: the same short omni run with DP=2 under three DDP settings - reduction after the
backward pass, overlapped reduction (``training.overlap_grad_reduce``), overlapped + distributed
optimizer - with modality groups [audio, image]: the last group's micro-batches never touch the
audio encoder or its projector. argv: result.json. The last rank writes the loss histories."""

import json
import sys

import torch

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from megatron.core import tensor_parallel  # noqa: E402
from omni_batch import MemoryData, tiny_omni_cfg  # noqa: E402

from megatron_omni.parallel import runtime  # noqa: E402
from megatron_omni.training.trainer import Trainer  # noqa: E402

torch.set_num_threads(1)


def run(*extra):
    cfg = tiny_omni_cfg("data.modalities=[audio,image]", "training.train_iters=3",
                        "training.num_micro_batches=2", "training.lr=2e-3",
                        "training.lr_warmup_iters=0", "training.log_interval=100", *extra)
    torch.manual_seed(7)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    t = Trainer(
        cfg,
        data=MemoryData(cfg, period=5, offset=10 * torch.distributed.get_rank()),
        printer=lambda s: None,
    )
    t.setup()
    torch.manual_seed(7)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    s = t.train()
    overlap = t.model[0].ddp_config.overlap_grad_reduce
    return {"history": s.loss_history, "overlap": overlap}


def main(out_path):
    runtime.initialize(tiny_omni_cfg().parallel)
    result = {
        "plain": run("training.overlap_grad_reduce=false"),
        "overlap": run("training.overlap_grad_reduce=true"),
        "overlap_distopt": run(
            "training.overlap_grad_reduce=true", "training.use_distributed_optimizer=true"
        ),
    }
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(out_path, "w") as f:
            json.dump(result, f)
    runtime.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
