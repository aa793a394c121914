#!/usr/bin/env python
"""Benchmark: packing efficiency and throughput of megatron_omni.data.packing.

Workload: ``realistic_mix`` (fixed seed): 40% image captions (100-2560 image tokens + 20-80
text), 20% audio (256 tokens + text), 15% video (1024-6144 tokens + text), 25% pure text
(200-8000 tokens, truncation allowed). Samples stream through a :class:`Packer` with a buffer of
``--buffer-size`` samples, as in the data loader.

Strategies: ``one_per_row`` (naive padding), ``first_fit`` (arrival order), ``best_fit_decreasing``
(our first pass alone) and ``auto`` (ours, the default). Budgets: tokens only, and tokens + a
media budget (``--max-images`` per row, ``--max-patches`` pre-merge patches per row).

Columns: rows; efficiency = real tokens / (rows * seq_length); bound = real tokens / (lower bound
on rows * seq_length), the best any packer could do per buffer; rows/naive = rows relative to
one sample per row (its inverse is the training-throughput gain); samples/s of the packer alone
(single process); skipped (reason: count) and truncated pure-text samples.

Usage: ``python bench/bench_packing.py [--num-samples 20000] [--buffer-size 1000]``
"""

from __future__ import annotations

import argparse
import math
import time

from megatron_omni.data.packing import Packer, PackingConfig, realistic_mix

STRATEGIES = ("one_per_row", "first_fit", "best_fit_decreasing", "auto")


def run(samples, cfg: PackingConfig, buffer_size: int) -> dict:
    packer = Packer(cfg, buffer_size=buffer_size)
    lb_rows = 0
    t0 = time.perf_counter()
    batches = []
    for s in samples:
        out = packer.add(s)
        if out:
            batches.append(out)
    out = packer.flush()
    if out:
        batches.append(out)
    dt = time.perf_counter() - t0
    for rows in batches:  # lower bound per buffer (what any packer of that buffer needs)
        lb = math.ceil(sum(r.num_tokens for r in rows) / cfg.seq_length)
        if cfg.max_images_per_row:
            lb = max(lb, math.ceil(sum(r.num_images for r in rows) / cfg.max_images_per_row))
        if cfg.max_patches_per_row:
            lb = max(lb, math.ceil(sum(r.num_patches for r in rows) / cfg.max_patches_per_row))
        lb_rows += lb
    st = packer.stats
    return {
        "rows": st.rows,
        "eff": st.efficiency,
        "bound": st.real_tokens / (lb_rows * cfg.seq_length),
        "sps": len(samples) / dt,
        "skipped": dict(sorted(st.skipped.items())),
        "truncated": st.truncated,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--buffer-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--max-images", type=int, default=4, help="media budget: vision items per row")
    p.add_argument("--max-patches", type=int, default=24576,
                   help="media budget: pre-merge patches per row (24576 = one 6144-token video)")
    a = p.parse_args(argv)

    samples = realistic_mix(a.num_samples, a.seed)
    print(f"packing benchmark: {a.num_samples} samples (realistic_mix seed {a.seed}), "
          f"buffer {a.buffer_size}, truncate_text=True")
    hdr = (f"{'seq':>5} {'budget':<18} {'strategy':<20} {'rows':>6} {'eff':>7} {'bound':>7} "
           f"{'rows/naive':>10} {'samples/s':>10}  skipped / truncated")
    print(hdr)
    print("-" * len(hdr))
    for S in a.seq_lengths:
        for mi, mp in [(None, None), (a.max_images, a.max_patches)]:
            budget = "tokens" if mi is None else f"<={mi}img,{mp // 1024}Kpat"
            naive_rows = None
            for strat in STRATEGIES:
                cfg = PackingConfig(S, mi, mp, truncate_text=True, strategy=strat)
                r = run(samples, cfg, a.buffer_size)
                naive_rows = naive_rows or r["rows"]
                print(
                    f"{S:>5} {budget:<18} {strat:<20} {r['rows']:>6} {r['eff']:>7.2%} "
                    f"{r['bound']:>7.2%} "
                    f"{r['rows'] / naive_rows:>10.3f} {r['sps']:>10,.0f}  {r['skipped']} / "
                    f"{r['truncated']}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
