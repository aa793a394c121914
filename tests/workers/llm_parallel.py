"""4-rank worker: LLM parallel layouts vs a TP=PP=1 reference, and HF parity at TP=2.

Reference: a TP=1 model (same seed on every rank) run on all micro-batches with plain autograd.
Each layout loads its shard of the reference weights, runs megatron-core's schedule with DDP on its
data-parallel share of the same packed micro-batches, and compares per-micro-batch losses and
(finalised) gradients against the reference. Rank 0 writes {check: max abs diff}.
"""

import sys

import torch

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from dist_utils import finish_worker  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402

from megatron_omni.config import load_config  # noqa: E402
from megatron_omni.models.attention import packed_seq_params  # noqa: E402
from megatron_omni.models.llm import build_llm_chunks, chunk_layer_range, load_full_llm_state  # noqa: E402
from megatron_omni.models.weight_maps.llm import hf_to_megatron, llm_config_from_hf  # noqa: E402
from megatron_omni.models.weight_maps.sharding import stage_state_dict  # noqa: E402
from megatron_omni.parallel import runtime  # noqa: E402

torch.set_num_threads(1)
T, M = 32, 4  # packed row length, micro-batches in the global batch
BASE = ["model.llm.num_layers=4", "model.vision.enabled=false", "model.audio.enabled=false",
        f"data.seq_length={T}"]


def make_batches():
    g = torch.Generator().manual_seed(7)
    batches = []
    for i in range(M):
        lens = [[10, 7, 15], [32], [5, 5, 22], [16, 16]][i]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
        tokens = torch.randint(0, 500, (1, T), generator=g)
        labels = torch.randint(0, 500, (1, T), generator=g)
        mask = (torch.rand(1, T, generator=g) > 0.2).float()
        pos1 = torch.cat([torch.arange(n) for n in lens])
        pos = torch.stack([pos1, pos1 + (torch.arange(T) % 3), pos1 + (torch.arange(T) % 5)])
        batches.append(dict(tokens=tokens, labels=labels, loss_mask=mask,
                            position_ids=pos.unsqueeze(1), cu_seqlens=cu))
    return batches


def loss_of(per_token, mask):
    return (per_token.float() * mask).sum() / mask.sum()


def reference(cfg, batches):
    (model,) = build_llm_chunks(cfg)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}
    losses = []
    for b in batches:
        out = model(b["tokens"], b["position_ids"], labels=b["labels"],
                    packed_seq_params=packed_seq_params(b["cu_seqlens"]))
        loss = loss_of(out, b["loss_mask"])
        (loss / len(batches)).backward()
        losses.append(loss.item())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return full, losses, grads


def run_layout(name, overrides, full, ref_losses, ref_grads, batches, results):
    cfg = load_config(None, BASE + overrides)
    ps.destroy_model_parallel()
    p = cfg.parallel
    ps.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                 p.virtual_pipeline_model_parallel_size)
    chunks = build_llm_chunks(cfg)
    for c in chunks:
        load_full_llm_state(c, full)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    model = [DistributedDataParallel(c.config, ddp_cfg, c) for c in chunks]
    for c in chunks:
        c.config.finalize_model_grads_func = finalize_model_grads
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = batches[dp_rank * (M // dp):(dp_rank + 1) * (M // dp)]

    def forward_step(it, m):
        b = next(it)
        out = m(b["tokens"], b["position_ids"], labels=b["labels"],
                packed_seq_params=packed_seq_params(b["cu_seqlens"]))

        def loss_func(output):
            loss = loss_of(output, b["loss_mask"])
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    iters = [iter(local) for _ in model]
    for m in model:
        m.zero_grad_buffer()
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(model) > 1 else iters[0],
        model=model if len(model) > 1 else model[0], num_microbatches=len(local),
        seq_length=T, micro_batch_size=1, forward_only=False)
    loss_diff, compared = 0.0, 0
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for j, d in enumerate(out):
            compared += 1
            ref = ref_losses[dp_rank * (M // dp) + j]
            loss_diff = max(loss_diff, abs(d["loss"].item() - ref))
    grad_diff = 0.0
    for chunk, m in zip(chunks, model):
        off, n = chunk_layer_range(chunk)
        ref_local = stage_state_dict(ref_grads, ps.get_tensor_model_parallel_rank(),
                                     ps.get_tensor_model_parallel_world_size(), off, n,
                                     chunk.pre_process, chunk.post_process)
        for pname, param in chunk.named_parameters():
            grad_diff = max(grad_diff, (param.main_grad - ref_local[pname]).abs().max().item())
    diffs = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(diffs, (loss_diff, grad_diff, compared))
    # Every micro-batch loss is seen by each TP rank of the last stage of its DP replica.
    results[name] = {"loss": max(d[0] for d in diffs), "grad": max(d[1] for d in diffs),
                     "losses_compared": sum(d[2] for d in diffs),
                     "expected_compared": M * ps.get_tensor_model_parallel_world_size()}


def hf_parity_tp2(results):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    torch.manual_seed(3)
    hf = LlamaForCausalLM(hf_cfg).eval()
    llm = llm_config_from_hf(hf_cfg.to_dict())
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(2, 1)
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2"])
    cfg.model.llm = llm
    (model,) = build_llm_chunks(cfg)
    load_full_llm_state(model, hf_to_megatron(hf.state_dict(), cfg.model.llm, 512))
    model.eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        ours = gather_from_tensor_model_parallel_region(model(ids, pos))
        ref = hf(ids).logits
    d = torch.tensor((ours - ref).abs().max().item())
    torch.distributed.all_reduce(d, op=torch.distributed.ReduceOp.MAX)
    results["hf_parity_tp2"] = d.item()


def main(out_path):
    runtime.initialize(load_config(None, BASE).parallel, seed=11)
    batches = make_batches()
    cfg = load_config(None, BASE)
    full, ref_losses, ref_grads = reference(cfg, batches)
    results = {"ref_losses": ref_losses}
    layouts = {
        "dp4": [],
        "tp2_dp2": ["parallel.tensor_model_parallel_size=2"],
        "tp2_sp_dp2": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
        "pp2_dp2": ["parallel.pipeline_model_parallel_size=2"],
        "pp2_vpp2_dp2": ["parallel.pipeline_model_parallel_size=2",
                         "parallel.virtual_pipeline_model_parallel_size=2",
                         "training.num_micro_batches=2"],
        "tp2_pp2": ["parallel.tensor_model_parallel_size=2",
                    "parallel.pipeline_model_parallel_size=2"],
        "pp2_first1_dp2": ["parallel.pipeline_model_parallel_size=2",
                           "parallel.first_stage_num_layers=1"],
    }
    for name, ov in layouts.items():
        run_layout(name, ov, full, ref_losses, ref_grads, batches, results)
    hf_parity_tp2(results)
    finish_worker(out_path, results)


if __name__ == "__main__":
    main(sys.argv[1])
