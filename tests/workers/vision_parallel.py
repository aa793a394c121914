"""2-rank worker: the ViT under TP=2 (with the LLM's sequence parallelism on) and under PP=2 /
virtual PP equals the TP=PP=1 reference.

Reference: a TP=1 ``VisionEncoder`` with random weights (same seed on every rank), one forward on
a mixed batch (3 images of different sizes + a 4-frame video) and a backward of a scalar loss.
Each layout loads the reference weights (sharded per TP rank by ``shard_vision_state_dict``),
runs the same batch and compares features, the input gradient and every parameter gradient with
the matching shard of the reference gradient. Rank 0 writes {check: value}.
"""

import sys

import numpy as np
import torch

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from dist_utils import finish_worker  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.transformer.transformer_block import get_num_layers_to_build  # noqa: E402

from megatron_omni.config import load_config  # noqa: E402
from megatron_omni.data.media.vision import patchify  # noqa: E402
from megatron_omni.models.vision import (  # noqa: E402
    _vision_config,
    build_vision_encoder,
    vision_transformer_config,
)
from megatron_omni.models.weight_maps.vision import shard_vision_state_dict  # noqa: E402
from megatron_omni.parallel import runtime  # noqa: E402

torch.set_num_threads(1)
DEPTH = 4
BASE = [f"model.vision.depth={DEPTH}", "model.vision.merger_hidden_size=64",
        "model.audio.enabled=false", "model.llm.num_layers=4", "model.transformer_impl=local"]


def make_batch():
    rng = np.random.default_rng(3)
    patches, grids = [], []
    for frames, h, w in [(1, 28, 28), (1, 56, 84), (1, 112, 56), (4, 56, 56)]:
        p, grid = patchify(rng.standard_normal((frames, 3, h, w)).astype(np.float32))
        patches.append(torch.from_numpy(p))
        grids.append(grid)
    x = torch.cat(patches)
    target = torch.randn(x.shape[0] // 4, 64, generator=torch.Generator().manual_seed(4))
    return x, torch.tensor(grids), target


def run(model, batch):
    """features, input grad, {param: grad} of the loss mean((features - target)^2)."""
    x, grid, target = batch
    model.zero_grad(set_to_none=True)
    inp = x.clone().requires_grad_(True)
    out = model(inp, grid)
    ((out - target) ** 2).mean().backward()
    return out.detach(), inp.grad, {n: p.grad for n, p in model.named_parameters()}


def reference(batch):
    cfg = load_config(None, BASE)
    model = build_vision_encoder(cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}
    return full, run(model, batch)


def reinit(tp, pp, vpp=None):
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp)


def compare(name, model, batch, full, ref, results, expect_sharded):
    model.load_full_state_dict(full)
    out, in_grad, grads = run(model, batch)
    ref_out, ref_in_grad, ref_grads = ref
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    ref_local = shard_vision_state_dict(ref_grads, tp_rank, tp)
    grad_diff = max((grads[n] - ref_local[n]).abs().max().item() for n in grads)
    qkv = model.transformer.layers[0].self_attention.linear_qkv.weight
    local = {
        "features": (out - ref_out).abs().max().item(),
        "input_grad": (in_grad - ref_in_grad).abs().max().item(),
        "param_grad": grad_diff,
        "params_compared": len(grads),
        "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
        "input_grad_scale": ref_in_grad.abs().max().item(),
        "qkv_rows": qkv.shape[0],
        "num_layers": len(model.transformer.layers),
        "layer_numbers": [layer.layer_number for layer in model.transformer.layers],
        "sequence_parallel": model.config.sequence_parallel,
    }
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    results[name] = {
        "features": max(d["features"] for d in gathered),
        "input_grad": max(d["input_grad"] for d in gathered),
        "param_grad": max(d["param_grad"] for d in gathered),
        "params_compared": min(d["params_compared"] for d in gathered),
        "grad_scale": gathered[0]["grad_scale"],
        "input_grad_scale": gathered[0]["input_grad_scale"],
        "qkv_rows": [d["qkv_rows"] for d in gathered],
        "num_layers": [d["num_layers"] for d in gathered],
        "layer_numbers": [d["layer_numbers"] for d in gathered],
        "sequence_parallel": any(d["sequence_parallel"] for d in gathered),
        "expected_qkv_rows": 3 * 32 // (2 if expect_sharded else 1),
    }


def main(out_path):
    runtime.initialize(load_config(None, BASE).parallel, seed=5)
    batch = make_batch()
    full, ref = reference(batch)
    results = {"ref_params": len(ref[2])}

    # TP=2, with the LLM sequence-parallel (the ViT must not be).
    reinit(2, 1)
    cfg = load_config(None, BASE + ["parallel.tensor_model_parallel_size=2",
                                    "parallel.sequence_parallel=true"])
    compare("tp2", build_vision_encoder(cfg), batch, full, ref, results, expect_sharded=True)

    # PP=2: the ViT is built whole (its layers numbered 1..DEPTH) whatever the stage.
    reinit(1, 2)
    cfg = load_config(None, BASE + ["parallel.pipeline_model_parallel_size=2"])
    results["pp2_first_stage"] = ps.is_pipeline_first_stage()
    compare("pp2", build_vision_encoder(cfg), batch, full, ref, results, expect_sharded=False)
    # What megatron-core would do with a ViT config that inherited PP=2 (the pitfall).
    naive = _vision_config(cfg.model.vision, pipeline_model_parallel_size=2)
    naive_layers = [None] * 2
    torch.distributed.all_gather_object(naive_layers, get_num_layers_to_build(naive))
    results["pp2_naive_layers"] = naive_layers
    results["pp2_vit_pp_size"] = vision_transformer_config(cfg).pipeline_model_parallel_size

    # PP=2 with virtual pipeline 2 (interleaved schedule of the LLM).
    reinit(1, 2, vpp=2)
    cfg = load_config(None, BASE + ["parallel.pipeline_model_parallel_size=2",
                                    "parallel.virtual_pipeline_model_parallel_size=2",
                                    "training.num_micro_batches=2"])
    compare("pp2_vpp2", build_vision_encoder(cfg), batch, full, ref, results,
            expect_sharded=False)

    finish_worker(out_path, results)


if __name__ == "__main__":
    main(sys.argv[1])
