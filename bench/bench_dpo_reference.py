#!/usr/bin/env python
"""Benchmark: the cost of DPO's reference log-probs computed in the step vs precomputed.

``training/dpo.py`` gets the reference log-probs from the same network with the LoRA adapters
switched off, in a forward-only schedule call inside every AT step. The alternative is to
precompute them once per pair (one extra pass over the data before training) and read them from
the data. This script times, in one process on the same LoRA model and the same packed preference
rows (+ as many instruction rows, the 1 : 1 mix), one AT step (forward + backward, DPO + SFT)

* with the in-step reference pass (what the trainer does), and
* with the reference log-probs handed in (what precomputation would cost per step),

and prints both and their ratio, plus the one-off precomputation pass per row.

    python bench/bench_dpo_reference.py [--layers 4 --hidden 256 --seq 1024 --rows 2 --iters 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

warnings.filterwarnings("ignore")


def interleaved(fns: dict, iters: int, warmup: int = 1) -> dict:
    """Median CPU time (``time.process_time``, one thread) of each function, run alternately so
    that load from other processes on a shared machine hits all of them alike; CPU time, unlike
    wall time, does not count the time this process waits for a core."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            times[k].append(time.process_time() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rows", type=int, default=2, help="preference rows (and instruction rows)")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

    from megatron_omni.parallel.cpu_compat import import_megatron_fast

    import_megatron_fast()
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_omni.config import ParallelConfig
    from megatron_omni.models.omni import OmniModel, special_token_ids
    from megatron_omni.parallel import runtime
    from megatron_omni.testing.omni_batch import tiny_omni_cfg
    from megatron_omni.testing.pref_batch import pref_row, random_pairs
    from megatron_omni.training.dpo import reference_logps, run_at_step

    runtime.initialize(ParallelConfig(), seed=1,
                       env=runtime.DistEnv(0, 1, 0, "127.0.0.1", 29577, "single"))
    heads = max(4, a.hidden // 64)
    cfg = tiny_omni_cfg(f"model.llm.num_layers={a.layers}", f"model.llm.hidden_size={a.hidden}",
                        f"model.llm.ffn_hidden_size={a.hidden * 3}",
                        f"model.llm.num_attention_heads={heads}",
                        f"model.llm.num_query_groups={heads // 2}",
                        f"model.llm.kv_channels={a.hidden // heads}",
                        "model.llm.mrope_section=[{},{},{}]".format(
                            a.hidden // heads // 8, 3 * a.hidden // heads // 16,
                            3 * a.hidden // heads // 16),
                        "model.llm.vocab_size=2000", vision=False, audio=False)
    sp = special_token_ids(cfg)
    torch.manual_seed(0)
    m = OmniModel(cfg)
    for q in m.parameters():
        q.requires_grad_(False)
    from megatron_omni.training.lora import apply_lora, lora_rank_for_share

    r = lora_rank_for_share(cfg.model.llm, 0.05)
    apply_lora([m], r, 2.0 * r)
    ddp = DistributedDataParallel(m.config, DistributedDataParallelConfig(), m)
    per_pair = 2 * (40 + 2 * 12)
    n_pairs = max(1, a.seq // per_pair)
    pref = [pref_row(random_pairs(i, n_pairs, sp.base_vocab_size, (30, 50), (8, 16)),
                     T=a.seq)[0] for i in range(a.rows)]
    instr = [pref_row(random_pairs(100 + i, n_pairs, sp.base_vocab_size, (30, 50), (8, 16)),
                      T=a.seq)[0] for i in range(a.rows)]
    groups = {"text": instr, "preference": pref}
    ref = reference_logps(ddp, pref)

    def step(reference):
        ddp.zero_grad_buffer()
        run_at_step(ddp, groups, "preference", sp, reference=reference)

    t = interleaved({"in": lambda: step(None), "pre": lambda: step(ref),
                     "ref": lambda: reference_logps(ddp, pref)}, a.iters)
    t_in, t_pre, t_ref = t["in"], t["pre"], t["ref"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"LLM {a.layers} layers x {a.hidden}, LoRA rank {r} (5% of the LLM), {a.rows} "
          f"preference rows ({n_pairs} pairs each) + {a.rows} instruction rows of {a.seq} tokens")
    print("CPU time per call (median, one thread):")
    print(f"AT step, reference in the step:        {t_in * 1e3:8.1f} ms")
    print(f"AT step, reference precomputed:        {t_pre * 1e3:8.1f} ms")
    print(f"ratio in-step / precomputed:           {t_in / t_pre:8.3f}")
    print(f"reference pass alone (no grad):        {t_ref * 1e3:8.1f} ms "
          f"({t_ref / a.rows * 1e3:.1f} ms per preference row, paid once when precomputed)")
    runtime.destroy()


if __name__ == "__main__":
    main()
