"""Text output: one plan, a table of suggestions, the calibration table."""

from __future__ import annotations

from typing import Sequence

from .core import Plan
from .hardware import GiB


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def format_plan(p: Plan) -> str:
    """A readable report of one plan."""
    lay, w = p.layout, p.workload
    pr = p.params
    lines = [
        f"model      {p.model}: LLM {pr['llm'] / 1e9:.2f}B, ViT {pr['vision'] / 1e9:.3f}B, "
        f"SAN-M {pr['audio'] / 1e9:.3f}B, projectors {pr['projectors'] / 1e9:.3f}B "
        f"(total {pr['total'] / 1e9:.2f}B)",
        f"hardware   {p.gpu.name}, {p.precision}, {p.impl} layers",
        f"layout     {lay.describe()}; SP {'on' if lay.sequence_parallel else 'off'}, "
        f"distributed optimizer {'on' if lay.distributed_optimizer else 'off'}, "
        f"recompute {lay.recompute or 'none'}"
        + (f", first stage {lay.first_stage_num_layers} LLM layers"
           if lay.first_stage_num_layers is not None else ""),
        f"batch      micro batch {lay.micro_batch_size} x {lay.num_micro_batches} micro-batches x "
        f"DP {lay.dp} = global batch {lay.global_batch} rows of {w.seq_length} tokens",
        f"row        {w.describe()}",
        "",
    ]
    shown = {0, p.peak_stage.rank, len(p.stages) - 1}
    stages = [s for s in p.stages if s.rank in shown]
    # Column width from the widest cell, and always a space between columns (long in-flight
    # lists of two stages used to run together: "...0/02/2/...").
    width = max([9] + [len("/".join(str(c) for c in s.inflight)) for s in stages])
    lines.append(f"{'per-GPU memory (GiB)':<28}"
                 + "".join(f" {'stage ' + str(s.rank):>{width}}" for s in stages))

    def row(label, fn):
        lines.append(f"{label:<28}" + "".join(f" {fn(s):>{width}}" for s in stages))

    row("  LLM layers", lambda s: str(s.llm_layers) + ("+enc" if s.has_encoders else ""))
    row("  weights", lambda s: _gib(s.weights).strip())
    row("  gradients", lambda s: _gib(s.gradients).strip())
    row("  optimizer states", lambda s: _gib(s.optimizer).strip())
    if p.precision == "fp8":
        row("  fp8 weight cache", lambda s: _gib(s.fp8_weight_cache).strip())
    row("  activations", lambda s: _gib(s.activations).strip())
    row("    in flight (per chunk)", lambda s: "/".join(str(c) for c in s.inflight) or "0")
    row("  transients", lambda s: _gib(s.transient).strip())
    if p.gpu.memory_bytes is not None:
        row("  overhead", lambda s: _gib(s.overhead).strip())
    row("  total", lambda s: _gib(s.total).strip())
    lines.append("")
    peak = p.peak_stage
    if p.fits is None:
        lines.append(f"peak       {peak.total / GiB:.2f} GiB (stage {peak.rank}); no device limit")
    else:
        cap = p.gpu.memory_bytes
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(f"peak       {peak.total / GiB:.2f} GiB on stage {peak.rank} of "
                     f"{cap / GiB:.2f} GiB ({peak.total / cap:.0%}): {verdict}")
    if p.step_time:
        lines += [
            f"step       {p.step_time:.4g} s estimated (compute efficiency {p.assumed_mfu:.3f} of "
            f"{p.gpu.peak[p.precision] / 1e12:.0f} TFLOP/s {p.precision}, pipeline bubble "
            f"(PP-1)/(VPP*m) = {p.bubble_fraction:.1%}, slowest stage {p.stage_imbalance:.3f}x "
            f"the mean)",
            f"throughput {p.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
            f"{p.tflops_per_gpu:,.0f} model TFLOP/s/GPU, MFU {p.mfu:.1%} "
            f"({p.model_flops_per_step / lay.global_batch / w.seq_length / 1e9:.4g} GFLOP/token)",
        ]
        slow = max(p.stages, key=lambda s: s.micro_batch_time)
        t = slow.times
        ms = lambda k: f"{t.get(k, 0.0) * 1e3:.2f}"  # noqa: E731
        lines.append(
            f"stage {slow.rank} per micro-batch (ms): compute {ms('compute')}, exposed TP "
            f"{ms('tp')}, CP {ms('cp')}, pipeline p2p {ms('p2p')}, cross entropy "
            f"{ms('cross_entropy')}; per step: exposed DP {ms('dp')}, optimizer "
            f"{ms('optimizer')}")
    for msg in p.warnings:
        lines.append(f"WARNING: {msg}")
    return "\n".join(lines)


def format_suggestions(plans: Sequence[Plan]) -> str:
    """A table of :func:`suggest` results."""
    if not plans:
        return "no layout fits; try another GPU, a shorter sequence or a smaller micro batch"
    head = (f"{'GPUs':>5} {'TP':>3} {'PP':>3} {'VPP':>4} {'CP':>3} {'DP':>4} {'1st':>4} "
            f"{'recompute':>10} {'peak GiB':>9} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6}")
    lines = [head]
    for p in plans:
        lay = p.layout
        first = "-" if lay.first_stage_num_layers is None else lay.first_stage_num_layers
        lines.append(
            f"{lay.num_gpus:>5} {lay.tp:>3} {lay.pp:>3} {lay.vpp or '-':>4} {lay.cp:>3} "
            f"{lay.dp:>4} {first:>4} "
            f"{lay.recompute or 'none':>10} {p.peak_bytes / GiB:>9.2f} "
            f"{(p.tokens_per_s_per_gpu or 0):>10,.0f} {(p.tflops_per_gpu or 0):>8,.0f} "
            f"{(p.mfu or 0):>6.1%}")
    return "\n".join(lines)


def format_calibration(rows: Sequence[dict]) -> str:
    lines = [f"{'model':<11} {'prec':<5} {'layout':<32} {'GBS':>4} {'published':>10} "
             f"{'planned':>9} {'error':>7}  source"]
    for r in rows:
        row = r["row"]
        flag = "" if row.in_tolerance else " (not held to tolerance)"
        lines.append(f"{row.model:<11} {row.precision:<5} {r['layout']:<32} "
                     f"{row.global_batch:>4} {r['published']:>10,.0f} {r['planned']:>9,.0f} "
                     f"{r['error']:>+7.1%}  {row.source}{flag}")
    return "\n".join(lines)
