"""Worker: run one training stage in-process with the real Trainer (Energon data, checkpoints).

argv: result.json then key=value overrides (passed to load_config) and optional flags
``--calibrate=PATH``, ``--keys=DIR`` (each rank writes ``DIR/rank<r>.json`` with its DP/TP rank
and the sample keys of every batch it drew). Rank 0 writes {"summary": ..., "step": ...}.
"""

import json
import sys

import torch

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from megatron_omni.config import load_config  # noqa: E402
from megatron_omni.parallel import runtime  # noqa: E402
from megatron_omni.training.trainer import Trainer  # noqa: E402

torch.set_num_threads(1)


def main(out_path, args):
    flags = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, printer=lambda s: print(s, flush=True))
    trainer.setup()
    keys_dir = next((f.split("=", 1)[1] for f in flags if f.startswith("--keys=")), None)
    read = []
    if keys_dir:  # record the sample keys every micro-batch of this rank held
        from megatron.core import parallel_state as ps

        orig = trainer.data.next

        def next_recorded(modality):
            b = orig(modality)
            read.append([modality, list(b["sample_names"])])
            return b

        trainer.data.next = next_recorded
    result = {}
    for f in flags:
        if f.startswith("--calibrate="):
            result["weights"] = trainer.calibrate_step_balance(f.split("=", 1)[1])
    if not result:
        s = trainer.train()
        result = {"first": s.first_losses, "last": s.last_losses, "weights": s.weights,
                  "last_step": s.last_step, "steps_done": s.steps_done,
                  "checkpoint": s.checkpoint, "history": s.loss_history}
    if keys_dir:
        with open(f"{keys_dir}/rank{torch.distributed.get_rank()}.json", "w") as f:
            json.dump({"dp_rank": ps.get_data_parallel_rank(),
                       "tp_rank": ps.get_tensor_model_parallel_rank(), "read": read}, f)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(out_path, "w") as f:
            json.dump(result, f)
    runtime.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
