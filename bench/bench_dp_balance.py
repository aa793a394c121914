#!/usr/bin/env python
"""Benchmark: encoder-aware balance of packed rows across data-parallel ranks.

Workload: ``realistic_mix`` (fixed seed; 40% images, 20% audio, 15% video, 25% long text),
packed to 8192-token rows (16 images / 32768 patches per row, pure text truncated), 128 rows per
step, in chunks of ``--buffer-size`` samples as in the loader. Costs: training FLOPs per row from
``CostModel.from_config`` of the 9B and 72B presets (LLM on the padded row + per-sample attention,
ViT per patch and per attention block, SAN-M per frame and per clip).

Per shape (model x DP 8 / 64; micro-batches per rank = 128 / DP): max/mean of the per-rank step
cost (the mean over steps and the worst step) for the token-only assignment (rank r takes the
r-th slice of the step's rows, as when every rank packs its own stream) and the balanced one
(``BalancedSteps``: window of 8 steps, longest-first dealing + swaps); token efficiency (the
same rows for both); samples/s of packing + balancing (single process, this machine).

The wired path (``data.dp_balance: cost``, ``RowExchange``): as in training, rank r packs its
own slice of the samples (Energon's per-rank shard slice: ``samples[r::DP]``) in chunks of
``--buffer-size`` and takes its next 128 / DP rows per step; "per-rank" is that as it is (what
``dp_balance: none`` trains), "swapped" after ``swap_plan`` (target 1.01, the default; rows of one
group, as in a single-modality stage): moved = share of the step's rows that change rank;
samples/s = packing + costing + planning for all ranks in this one process.

Usage: ``python bench/bench_dp_balance.py [--num-samples 20000] [--seed 0]``
"""

from __future__ import annotations

import argparse
import time

from megatron_omni.data.dp_balance import (
    BalancedSteps,
    CostModel,
    apply_swaps,
    imbalance,
    swap_plan,
)
from megatron_omni.data.packing import (
    PackingConfig,
    PackingStats,
    pack_samples,
    realistic_mix,
)
from megatron_omni.plan import load_model_config


def run(samples, cost, dp, balance, buffer_size):
    cfg = PackingConfig(8192, 16, 32768, truncate_text=True)
    infos = {s.id: s for s in samples}
    bs = BalancedSteps(samples, cfg, cost, dp, 128 // dp, buffer_size=buffer_size,
                       balance=balance)
    t0 = time.perf_counter()
    steps = []
    while (st := bs.next_step()) is not None:
        steps.append(st)
    dt = time.perf_counter() - t0
    ratios = [imbalance([sum(cost.row_cost(r, infos) for mb in rank for r in mb)
                         for rank in st]) for st in steps]
    return {"steps": len(steps), "mean": sum(ratios) / len(ratios), "worst": max(ratios),
            "eff": bs.stats.efficiency, "rate": bs.stats.samples / dt}


def run_wired(samples, cost, dp, buffer_size, target=1.01):
    """Per-rank packing, then the swaps RowExchange plans (see the module docstring)."""
    cfg = PackingConfig(8192, 16, 32768, truncate_text=True)
    infos = {s.id: s for s in samples}
    per = 128 // dp
    t0 = time.perf_counter()
    stats = PackingStats(seq_length=8192)
    streams = []
    for r in range(dp):
        mine, rows = samples[r::dp], []
        for a in range(0, len(mine), buffer_size):
            res = pack_samples(mine[a:a + buffer_size], cfg)
            stats += res.stats
            rows += [(row, cost.row_cost(row, infos)) for row in res.rows]
        streams.append(rows)
    steps = min(len(x) for x in streams) // per
    before, after, moved = [], [], 0
    for st in range(steps):
        costs = [[c for _, c in x[st * per:(st + 1) * per]] for x in streams]
        plan = swap_plan(costs, [[0] * per] * dp, target)
        got = apply_swaps(costs, plan)
        ids = apply_swaps([[(r, k) for k in range(per)] for r in range(dp)], plan)
        moved += sum(r != rr for rr, x in enumerate(ids) for r, _ in x)
        before.append(imbalance([sum(c) for c in costs]))
        after.append(imbalance([sum(c) for c in got]))
    dt = time.perf_counter() - t0
    out = {}
    for name, ratios in (("per-rank", before), ("swapped", after)):
        out[name] = {"steps": steps, "mean": sum(ratios) / len(ratios), "worst": max(ratios),
                     "eff": stats.efficiency, "rate": stats.samples / dt,
                     "moved": moved / (steps * 128) if name == "swapped" else 0.0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-samples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--buffer-size", type=int, default=1024)
    a = ap.parse_args()
    samples = realistic_mix(a.num_samples, a.seed)
    print(f"{a.num_samples} samples, seed {a.seed}, 8192-token rows, 128 rows/step")
    print(f"{'shape':<10} {'assignment':<11} {'steps':>5} {'max/mean':>9} {'worst':>7} "
          f"{'token eff':>9} {'samples/s':>10}")
    for model in ("9b", "72b"):
        cost = CostModel.from_config(load_model_config(model), 8192)
        for dp in (8, 64):
            base = None
            for balance in (False, True):
                r = run(samples, cost, dp, balance, a.buffer_size)
                base = base or r
                name = "balanced" if balance else "token-only"
                print(f"{model + ' DP' + str(dp):<10} {name:<11} {r['steps']:>5} "
                      f"{r['mean']:>9.4f} {r['worst']:>7.4f} {r['eff']:>9.2%} "
                      f"{r['rate']:>10,.0f}" + (f"  ({r['rate'] / base['rate']:.2f}x)"
                                                if balance else ""))
            for name, r in run_wired(samples, cost, dp, a.buffer_size).items():
                print(f"{model + ' DP' + str(dp):<10} {name:<11} {r['steps']:>5} "
                      f"{r['mean']:>9.4f} {r['worst']:>7.4f} {r['eff']:>9.2%} "
                      f"{r['rate']:>10,.0f}" + (f"  moved {r['moved']:.1%}"
                                                if name == "swapped" else ""))


if __name__ == "__main__":
    main()
