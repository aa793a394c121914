#!/usr/bin/env python
"""Tiny CPU demo: train the Llama-3 M-RoPE LLM with tensor parallelism (TP=2) on 2 gloo ranks.

This is the foundation-stage demo behind ``make demo``: real megatron-core training steps
(schedule, DDP, Adam optimizer, gradient clipping) on packed rows of a learnable synthetic task,
printing the loss. It grows into the full omni demo (synthetic omni data, step balance, dynamic
balance) with the training issue.

    python tools/demo.py                 # launches 2 local ranks itself
    python tools/demo.py --steps 60 --tp 2 --nproc 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="local processes to launch (default 2)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    p.add_argument("--seq-length", type=int, default=64, help="packed row length (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def launch(args) -> int:
    """Start ``nproc`` copies of this script as ranks of one gloo job (what torchrun does)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(args.nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *sys.argv[1:]],
                                      env=env))
    codes = [p.wait() for p in procs]
    return max(codes)


def make_row(gen, seq_length: int, vocab: int):
    """A packed row of 2-4 samples; each sample counts upward mod 97 from a random start, so the
    next token is predictable from the current one (the model must learn +1)."""
    import torch

    n = int(torch.randint(2, 5, (1,), generator=gen))
    cuts = sorted(torch.randperm(seq_length - 8, generator=gen)[: n - 1].add(4).tolist())
    lens = [b - a for a, b in zip([0] + cuts, cuts + [seq_length])]
    toks, pos = [], []
    for length in lens:
        start = int(torch.randint(0, 97, (1,), generator=gen))
        toks.append((torch.arange(length + 1) + start) % 97)
        pos.append(torch.arange(length))
    tokens = torch.cat([t[:-1] for t in toks])[None]
    labels = torch.cat([t[1:] for t in toks])[None]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    return dict(tokens=tokens, labels=labels, position_ids=torch.cat(pos)[None], cu_seqlens=cu)


def worker(args) -> None:
    import warnings

    # megatron-core announces every missing GPU extension at import; the log says it once below.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
    from megatron_omni.parallel.cpu_compat import import_megatron_fast

    import_megatron_fast()
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_omni.config import load_config
    from megatron_omni.models.attention import packed_seq_params
    from megatron_omni.models.llm import build_llm_chunks
    from megatron_omni.parallel import runtime

    torch.set_num_threads(1)
    cfg = load_config(REPO / "examples" / "tiny_llm.yaml", [
        f"parallel.tensor_model_parallel_size={args.tp}",
        f"parallel.pipeline_model_parallel_size={args.pp}",
        f"data.seq_length={args.seq_length}", f"training.train_iters={args.steps}",
        f"training.lr={args.lr}"])
    env = runtime.initialize(cfg.parallel, seed=cfg.training.seed)
    chunks = build_llm_chunks(cfg)
    model = [DistributedDataParallel(c.config, DistributedDataParallelConfig(), c)
             for c in chunks]
    for c in chunks:
        c.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.training.lr, min_lr=cfg.training.min_lr,
        weight_decay=cfg.training.weight_decay, adam_beta1=cfg.training.adam_beta1,
        adam_beta2=cfg.training.adam_beta2, clip_grad=cfg.training.clip_grad, bf16=False),
        model)
    gen = torch.Generator().manual_seed(1000 + ps.get_data_parallel_rank())
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    if env.rank == 0:
        print(f"[demo] backend={'nccl' if torch.cuda.is_available() else 'gloo'} "
              f"layers={chunks[0].transformer_impl} ranks={env.world_size} TP={args.tp} PP={args.pp} "
              f"DP={ps.get_data_parallel_world_size()} params/rank={n_params:,} "
              f"seq={args.seq_length}", flush=True)

    def forward_step(it, m):
        b = next(it)
        out = m(b["tokens"], b["position_ids"], labels=b["labels"],
                packed_seq_params=packed_seq_params(b["cu_seqlens"]))

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    micro = cfg.training.num_micro_batches
    first = last = None
    t0 = time.time()
    for step in range(1, args.steps + 1):
        lr = cfg.training.lr * min(1.0, step / 5)
        for g in opt.param_groups:
            g["lr"] = lr
        for m in model:
            m.zero_grad_buffer()
        opt.zero_grad()
        batches = [make_row(gen, args.seq_length, 97) for _ in range(micro)]
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches),
            model=model[0], num_microbatches=micro, seq_length=args.seq_length,
            micro_batch_size=1, forward_only=False)
        ok, grad_norm, _ = opt.step()
        loss = torch.tensor(sum(d["loss"].item() for d in losses) / max(1, len(losses)))
        if ps.is_pipeline_last_stage():
            torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
            loss /= ps.get_data_parallel_world_size()
        first = loss.item() if first is None else first
        last = loss.item()
        if env.rank == (env.world_size - 1) and (step % 5 == 0 or step == 1):
            tok_s = step * micro * args.seq_length * ps.get_data_parallel_world_size() / (
                time.time() - t0)
            print(f"[demo] step {step:4d}/{args.steps} | lr {lr:.2e} | loss {last:.4f} | "
                  f"grad norm {grad_norm:.3f} | {tok_s:,.0f} tokens/s", flush=True)
    if env.rank == env.world_size - 1:
        print(f"[demo] loss {first:.4f} -> {last:.4f} in {time.time() - t0:.1f}s", flush=True)
        if not last < first:
            raise SystemExit("[demo] loss did not fall")
    runtime.destroy()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
