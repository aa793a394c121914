"""Worker (1 rank): load checkpoints (weights only, resharded to TP=PP=1) and compare them by
model part. argv: result.json CKPT_A CKPT_B -- key=value overrides of the run config.
Writes {"equal": {part: bool}, "params": {part: count}}."""

import json
import sys

import torch

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from megatron_omni.config import load_config  # noqa: E402
from megatron_omni.models.omni import OmniModel, part_of  # noqa: E402
from megatron_omni.parallel import runtime  # noqa: E402
from megatron_omni.training.checkpoint import load_checkpoint  # noqa: E402


def main(out_path, args):
    sep = args.index("--")
    paths, overrides = args[:sep], args[sep + 1:]
    cfg = load_config(None, overrides + ["parallel.tensor_model_parallel_size=1",
                                         "parallel.pipeline_model_parallel_size=1"])
    runtime.initialize(cfg.parallel, seed=1)
    states = []
    for p in paths:
        m = OmniModel(cfg)
        load_checkpoint(p, [m], weights_only=True)
        states.append({k: v.detach().clone() for k, v in m.named_parameters()})
    equal, params = {}, {}
    for name, t in states[0].items():
        part = part_of(name)
        params[part] = params.get(part, 0) + t.numel()
        equal[part] = equal.get(part, True) and torch.equal(t, states[1][name])
    with open(out_path, "w") as f:
        json.dump({"equal": equal, "params": params}, f)
    runtime.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
