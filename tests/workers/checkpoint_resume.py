"""2-rank worker for checkpoint/resume tests. Two phases, each a separate launch (NEW processes):

``train``  For each layout (pp2, dp2_distopt, tp2): train N=6 steps straight (reference losses,
           lrs, grad norms); rebuild from the same seed, train K=3 steps, save, record the
           forward-only loss of a fixed eval batch, train one more step in-process (a save must
           not perturb training). Last, at tp2, rank 0 writes the results and the step-4 save is
           killed by SIGKILL on rank 0 after every rank wrote its shards, before publishing.
``resume`` For each layout: fresh model (different init seed), load the newest complete
           checkpoint, train steps 4..6. Also: reshard tp2 -> tp1 x pp2 (eval loss, then 3 steps),
           weights-only load into a model with an extra submodule (allowed / refused), the
           signal flag agreed by all ranks, and saves at steps 4, 5, 6 with keep_last=2.

A small LLM training loop like tools/demo.py: megatron-core DDP, optimizer, scheduler and
pipeline schedule through megatron_omni.training.optimizer. Data come from a torch.Generator per
data-parallel rank whose state is the rank-local extra state. Rank 0 writes the JSON results.
"""

import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from megatron_omni.config import load_config  # noqa: E402
from megatron_omni.models.attention import packed_seq_params  # noqa: E402
from megatron_omni.models.llm import build_llm_chunks  # noqa: E402
from megatron_omni.parallel import runtime  # noqa: E402
from megatron_omni.training import checkpoint as ckpt  # noqa: E402
from megatron_omni.training import signals  # noqa: E402
from megatron_omni.training.optimizer import (  # noqa: E402
    build_optimizer,
    build_scheduler,
    inner_optimizers,
    wrap_ddp,
)

torch.set_num_threads(1)
T, M, N, K = 32, 2, 6, 3  # row length, micro-batches per step, straight steps, steps before save
BASE = ["model.llm.num_layers=4", "model.vision.enabled=false", "model.audio.enabled=false",
        "model.llm.vocab_size=128", "model.llm.make_vocab_size_divisible_by=64",
        f"data.seq_length={T}", f"training.train_iters={N}", "training.lr=3e-3",
        "training.min_lr=3e-4", "training.lr_warmup_iters=2", f"training.num_micro_batches={M}",
        "training.weight_decay=0.01", "training.clip_grad=1.0", "training.seed=1234"]
LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "dp2_distopt": ["training.use_distributed_optimizer=true"],
    "tp1_pp2": ["parallel.pipeline_model_parallel_size=2"],
}


def rank() -> int:
    return torch.distributed.get_rank()


def setup(name, init_seed=1234, extra_overrides=()):
    cfg = load_config(None, BASE + LAYOUTS[name] + list(extra_overrides))
    p = cfg.parallel
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                 p.virtual_pipeline_model_parallel_size)
    random.seed(init_seed)
    np.random.seed(init_seed)
    torch.manual_seed(init_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(init_seed)
    return cfg


def build(cfg, init_seed=1234):
    chunks = build_llm_chunks(cfg)
    model = wrap_ddp(cfg, chunks)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt)
    gen = torch.Generator().manual_seed(1000 + ps.get_data_parallel_rank())
    return chunks, model, opt, sched, gen


def make_batch(gen):
    cuts = sorted(torch.randperm(T - 8, generator=gen)[:2].add(4).tolist())
    lens = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    tokens = torch.randint(0, 128, (1, T), generator=gen)
    labels = torch.randint(0, 128, (1, T), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    return dict(tokens=tokens, labels=labels, position_ids=pos, cu_seqlens=cu)


def forward_step(it, m):
    b = next(it)
    out = m(b["tokens"], b["position_ids"], labels=b["labels"],
            packed_seq_params=packed_seq_params(b["cu_seqlens"]))

    def loss_func(per_token):
        loss = per_token.float().mean()
        # clone: the schedule divides the returned loss in place (docs/architecture.md section 6,
        # issue 5)
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


def run_schedule(model, batches, forward_only):
    iters = [iter(batches) for _ in model]
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(model) > 1 else iters[0],
        model=model if len(model) > 1 else model[0], num_microbatches=len(batches),
        seq_length=T, micro_batch_size=1, forward_only=forward_only)
    loss = torch.zeros(1, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        loss += sum(d["loss"].double().item() for d in out) / len(out)
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        loss /= ps.get_data_parallel_world_size()
    # every rank gets the value of the last stage (sum over the pipeline group; others add 0)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
    return loss.item()


def train_step(model, opt, sched, gen):
    batches = [make_batch(gen) for _ in range(M)]
    for m in model:
        m.zero_grad_buffer()
    opt.zero_grad()
    lr = opt.param_groups[0]["lr"]
    loss = run_schedule(model, batches, forward_only=False)
    ok, grad_norm, _ = opt.step()
    assert ok
    sched.step(1)
    return loss, lr, float(grad_norm)


def eval_loss(model):
    gen = torch.Generator().manual_seed(99)
    return run_schedule(model, [make_batch(gen) for _ in range(M)], forward_only=True)


def extra_state(step, gen):
    return {"iteration": step, "consumed_rows": step * M * ps.get_data_parallel_world_size(),
            ckpt.RANK_LOCAL: {"data_gen": gen.get_state()}}


def steps_info(opt):
    """Adam 'step' values and whether any step tensor object is shared between parameters."""
    ids, vals = [], []
    for inner in inner_optimizers(opt):
        for st in inner.state.values():
            if "step" in st:
                ids.append(id(st["step"]))
                vals.append(float(st["step"]))
    return {"values": sorted(set(vals)), "n": len(ids), "shared": len(ids) != len(set(ids))}


def gather(obj):
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# --- phase 1 --------------------------------------------------------------------------------------

def phase_train(base: Path, out_path: str):
    results = {}
    for name in ["pp2", "dp2_distopt", "tp2"]:
        cfg = setup(name)
        chunks, model, opt, sched, gen = build(cfg)
        ref = [train_step(model, opt, sched, gen) for _ in range(N)]
        cfg = setup(name)
        chunks, model, opt, sched, gen = build(cfg)
        first = [train_step(model, opt, sched, gen) for _ in range(K)]
        path = ckpt.save_checkpoint(base / name, K, model, opt, sched, extra_state(K, gen), cfg,
                                    keep_last=2)
        fp = gather(rng_fingerprint())
        ev = eval_loss(model)
        after = train_step(model, opt, sched, gen)
        results[name] = {
            "ref_losses": [r[0] for r in ref], "ref_lrs": [r[1] for r in ref],
            "ref_grad_norms": [r[2] for r in ref],
            "first_losses": [r[0] for r in first], "after_save_loss": after[0],
            "eval_at_k": ev, "saved": str(path), "steps_at_save": steps_info(opt), "rng": fp,
            "optimizer_kind": type(opt.chained_optimizers[0]).__name__,
            "optimizer_numel": gather(sum(p.numel() for inner in inner_optimizers(opt)
                                          for g in inner.param_groups for p in g["params"])),
            "model_numel": gather(sum(p.numel() for c in chunks for p in c.parameters())),
        }
    # tp2 is set up now, at step K+1. Write results, then a save that rank 0 dies in.
    if rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    torch.distributed.barrier()

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if rank() == 0:
        ckpt._publish = die
    ckpt.save_checkpoint(base / "tp2", K + 1, model, opt, sched, extra_state(K + 1, gen), cfg,
                         keep_last=2)
    raise SystemExit("unreachable: the save should have killed rank 0")


# --- phase 2 --------------------------------------------------------------------------------------

def resume(name, path, init_seed=4321, **load_kwargs):
    cfg = setup(name, init_seed=init_seed)
    chunks, model, opt, sched, gen = build(cfg)
    extra = ckpt.load_checkpoint(path, model, opt, sched, **load_kwargs)
    if extra[ckpt.RANK_LOCAL] is not None:
        gen.set_state(extra[ckpt.RANK_LOCAL]["data_gen"])
    return cfg, model, opt, sched, gen, extra


def rng_fingerprint() -> str:
    """Digest of every RNG state a checkpoint restores (reading them consumes nothing)."""
    import hashlib

    st = ckpt.capture_rng_state()
    h = hashlib.sha256()
    h.update(repr(st["python"]).encode())
    h.update(st["numpy"][1].tobytes())
    h.update(st["torch"].numpy().tobytes())
    for k in sorted(st["tracker"]):
        h.update(k.encode())
        h.update(st["tracker"][k].numpy().tobytes())
    return h.hexdigest()


def resume_layout(name, path):
    cfg, model, opt, sched, gen, extra = resume(name, path)
    meta = extra[ckpt.META_KEY]
    r = {"latest": str(path), "iteration": extra["iteration"],
         "consumed_rows": extra["consumed_rows"], "rng_restored": meta["rng_restored"],
         "rank_local_source": meta["rank_local_source"], "steps": steps_info(opt),
         "sched_num_steps": sched.num_steps, "rng": gather(rng_fingerprint()),
         "eval_at_k": eval_loss(model)}
    steps = [train_step(model, opt, sched, gen) for _ in range(N - K)]
    r.update(losses=[s[0] for s in steps], lrs=[s[1] for s in steps],
             grad_norms=[s[2] for s in steps])
    return r, (cfg, model, opt, sched, gen)


def phase_resume(base: Path, out_path: str):
    results = {}
    for name in ["pp2", "dp2_distopt"]:
        results[name], _ = resume_layout(name, ckpt.find_latest(base / name))

    # Reshard: the tp2 step-3 checkpoint (TP=2 x PP=1) into TP=1 x PP=2.
    results["reshard_tp2_to_tp1pp2"], _ = resume_layout("tp1_pp2",
                                                        base / "tp2" / ckpt.step_dir_name(K))

    # Weights-only stage initialisation into a model with a new submodule.
    src = base / "tp2" / ckpt.step_dir_name(K)
    cfg = setup("tp2", init_seed=777)
    chunks = build_llm_chunks(cfg)
    chunks[0].extra_head = torch.nn.Linear(8, 8)
    init_extra = chunks[0].extra_head.weight.detach().clone()
    before = chunks[0].decoder.layers[0].mlp.linear_fc1.weight.detach().clone()
    w = {}
    try:
        ckpt.load_checkpoint(src, chunks, weights_only=True)
        w["refused"] = None
    except ckpt.CheckpointError as e:
        w["refused"] = str(e)
    w["untouched_after_refusal"] = bool(torch.equal(
        before, chunks[0].decoder.layers[0].mlp.linear_fc1.weight))
    extra = ckpt.load_checkpoint(src, chunks, weights_only=True, allow_missing=["extra_head."])
    w["returned_keys"] = sorted(k for k in extra)
    w["allowed_missing"] = extra[ckpt.META_KEY]["allowed_missing"]
    w["extra_head_kept_init"] = bool(torch.equal(init_extra, chunks[0].extra_head.weight))
    w["eval_at_k"] = eval_loss(wrap_ddp(cfg, chunks))
    results["weights_only"] = w

    # Signals: nobody signalled -> False everywhere; rank 1 signalled -> True everywhere.
    signals.install_signal_handlers()
    s0 = signals.should_save_and_exit()
    if rank() == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    s1 = signals.should_save_and_exit()
    results["signals"] = {"before": gather(s0), "after": gather(s1),
                          "local": gather(signals.signal_received())}

    # tp2 last: its killed step-4 save must be ignored; then keep-last-2 over saves 4, 5, 6
    # (the first of which also clears the killed save's tmp_step_00000004).
    latest = ckpt.find_latest(base / "tp2")
    results["tp2"], (cfg, model, opt, sched, gen) = resume_layout("tp2", latest)
    for step in (K + 1, K + 2, N):
        ckpt.save_checkpoint(base / "tp2", step, model, opt, sched, extra_state(step, gen), cfg,
                             keep_last=2)
    if rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def main(out_path, phase, base):
    runtime.initialize(load_config(None, BASE).parallel, seed=1234)
    base = Path(base)
    if phase == "train":
        phase_train(base, out_path)
    else:
        phase_resume(base, out_path)
    runtime.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:4])
