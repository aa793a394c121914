"""4-rank worker: the AT step (LoRA + DPO + 0.3 x SFT) at TP2, PP2, TP2+SP, TP2xPP2 and DP4 vs
a TP=PP=1 reference computed with plain autograd.

Reference: an adapted TP=1 omni model (same seed on every rank, B random so A gets gradients):
per micro-batch a packed forward with the adapters on and one with them off, L = L_dpo + 0.3 x
L_sft over ALL micro-batches, backward. Each layout loads its shard of the reference weights
(adapters included, split by models/weight_maps/sharding.py's rules), runs ``run_at_step`` through
megatron-core's schedule and DDP on its data-parallel share, and compares the DPO metrics, the
SFT loss and the finalised adapter gradients. Rank 0 writes {layout: {metric: max abs diff}}.
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
from omni_batch import omni_batch, tiny_omni_cfg  # noqa: E402
from pref_batch import pref_row, random_pairs  # noqa: E402

from megatron_omni.models.llm import chunk_layer_range  # noqa: E402
from megatron_omni.models.omni import (  # noqa: E402
    OmniModel,
    build_omni_chunks,
    load_full_omni_state,
    omni_stage_state_dict,
    special_token_ids,
)
from megatron_omni.parallel import runtime  # noqa: E402
from megatron_omni.training.dpo import dpo_terms, run_at_step, segment_logps  # noqa: E402
from megatron_omni.training.lora import adapters_disabled, apply_lora, is_lora_param, lora_modules  # noqa: E402
from megatron_omni.training.step import model_inputs  # noqa: E402

torch.set_num_threads(1)
T, M = 64, 4
BETA, SFT = 0.2, 0.3
RANK, ALPHA = 4, 8.0


def cfg_for(*extra):
    return tiny_omni_cfg("model.llm.num_layers=4", *extra, vision=False, audio=False)


def make_data(cfg):
    sp = special_token_ids(cfg)
    pref = [pref_row(random_pairs(100 + i, 2 + i % 2, sp.base_vocab_size), T=T)[0]
            for i in range(M)]
    instr = [omni_batch(cfg, seed=200 + i, vision=False, audio=False, pad_to=T) for i in range(M)]
    return pref, instr, sp


def reference(cfg, pref, instr, sp):
    torch.manual_seed(1)
    model = OmniModel(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora([model], RANK, ALPHA, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}
    n_pairs = sum(len(b["dpo_pairs"]) for b in pref)
    n_tok = sum(float(b["loss_mask"].sum()) for b in instr)
    terms = {"loss": 0.0, "rc": 0.0, "rr": 0.0, "acc": 0.0}
    total = 0.0
    for b in pref:
        args, kwargs = model_inputs(b)
        with torch.no_grad(), adapters_disabled([model]):
            ref = segment_logps(model(*args, **kwargs), b["loss_mask"], b["cu_seqlens"])
        pol = segment_logps(model(*args, **kwargs), b["loss_mask"], b["cu_seqlens"])
        t = dpo_terms(pol, ref, b["dpo_pairs"], BETA)
        total = total + t["loss"].sum() / n_pairs
        terms["loss"] += t["loss"].sum().item() / n_pairs
        terms["rc"] += t["reward_chosen"].sum().item() / n_pairs
        terms["rr"] += t["reward_rejected"].sum().item() / n_pairs
        terms["acc"] += t["correct"].sum().item() / n_pairs
    sft = 0.0
    for b in instr:
        args, kwargs = model_inputs(b)
        s = (model(*args, **kwargs) * b["loss_mask"]).sum() / n_tok
        total = total + SFT * s
        sft += s.item()
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    terms["sft"] = sft
    return full, terms, grads


def run_layout(name, overrides, full, ref, ref_grads, pref, instr, sp, results):
    cfg = cfg_for(*overrides)
    ps.destroy_model_parallel()
    p = cfg.parallel
    ps.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                 p.virtual_pipeline_model_parallel_size)
    chunks = build_omni_chunks(cfg)
    for c in chunks:
        for q in c.parameters():
            q.requires_grad_(False)
    apply_lora(chunks, RANK, ALPHA, seed=5)
    for c in chunks:
        load_full_omni_state(c, full)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    model = [DistributedDataParallel(c.config, ddp_cfg, c) for c in chunks]
    for c in chunks:
        c.config.finalize_model_grads_func = finalize_model_grads
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = slice(dp_rank * (M // dp), (dp_rank + 1) * (M // dp))
    for m in model:
        m.zero_grad_buffer()
    res = run_at_step(model, {"text": instr[share], "preference": pref[share]}, "preference", sp,
                      beta=BETA, sft_weight=SFT)
    diffs = {"dpo_loss": abs(res.metrics["dpo/loss"] - ref["loss"]),
             "reward_chosen": abs(res.metrics["dpo/reward_chosen"] - ref["rc"]),
             "reward_rejected": abs(res.metrics["dpo/reward_rejected"] - ref["rr"]),
             "accuracy": abs(res.metrics["dpo/accuracy"] - ref["acc"]),
             "sft": abs(res.metrics["loss/sft"] - ref["sft"])}
    grad_diff, n_checked = 0.0, 0
    for chunk in chunks:
        off, n = chunk_layer_range(chunk.llm)
        ref_local = omni_stage_state_dict(ref_grads, ps.get_tensor_model_parallel_rank(),
                                          ps.get_tensor_model_parallel_world_size(), off, n,
                                          chunk.pre_process, chunk.post_process)
        for pname, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            assert is_lora_param(pname), pname
            grad_diff = max(grad_diff, (param.main_grad - ref_local[pname]).abs().max().item())
            n_checked += 1
    diffs["adapter_grads"] = grad_diff
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (diffs, n_checked))
    out = {k: max(g[0][k] for g in gathered) for k in diffs}
    out["adapters_checked"] = sum(g[1] for g in gathered)
    out["dpo_loss_value"] = res.metrics["dpo/loss"]
    results[name] = out


def main(out_path):
    runtime.initialize(cfg_for().parallel, seed=11)
    cfg = cfg_for()
    pref, instr, sp = make_data(cfg)
    full, ref, ref_grads = reference(cfg, pref, instr, sp)
    results = {"reference": ref, "ref_adapter_grad_max": max(
        g.abs().max().item() for g in ref_grads.values())}
    layouts = {
        "dp4": [],
        "tp2_dp2": ["parallel.tensor_model_parallel_size=2"],
        "tp2_sp_dp2": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
        "pp2_dp2": ["parallel.pipeline_model_parallel_size=2"],
        "tp2_pp2": ["parallel.tensor_model_parallel_size=2",
                    "parallel.pipeline_model_parallel_size=2"],
    }
    for name, ov in layouts.items():
        run_layout(name, ov, full, ref, ref_grads, pref, instr, sp, results)
    finish_worker(out_path, results)


if __name__ == "__main__":
    main(sys.argv[1])
