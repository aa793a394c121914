"""Step-time model: the communication and memory-bound terms per micro-batch and per step
(seconds; each checked against a hand computation in ``tests/tools/test_plan.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .hardware import Interconnect
from .inputs import Layout


def tp_comm_seconds(tokens: float, hidden: int, tp: int, sp: bool, layers: int,
                    recomputed_layers: int, bandwidth: float, act_bytes: int = 2) -> float:
    """Tensor-parallel collectives of ``layers`` LLM layers for one micro-batch on one GPU.

    Sequence parallel: per layer, forward all-gathers the input of the QKV and FC1 GEMMs and
    reduce-scatters the outputs of the out-projection and FC2 (4 collectives); backward
    all-gathers the two row-parallel output gradients, reduce-scatters the two column-parallel
    input gradients and all-gathers the two column-parallel inputs again for the weight gradients
    (6). Each moves ``(t-1)/t`` of the ``tokens x hidden`` activation per GPU. A fully
    recomputed layer repeats its 4 forward ones. Without SP: 2 forward + 2 backward all-reduces
    of twice that volume (the same 8 units) + 2 per recomputed layer.
    """
    if tp <= 1 or layers <= 0:
        return 0.0
    unit = (tp - 1) / tp * tokens * hidden * act_bytes
    if sp:
        count = 10 * layers + 4 * recomputed_layers
    else:
        count = 8 * layers + 4 * recomputed_layers
    return count * unit / bandwidth


CP_ATTENTION_EFFICIENCY = 0.6
"""Speed of the attention kernels under context parallelism relative to one whole-sequence
flash-attention kernel: with the load-balanced split every ring step runs its own, smaller
kernels (chunks of ``s / (2 cp)`` tokens, the causal diagonal block and the off-diagonal halves
apart) on a side stream, synchronised with the K/V exchange, and backward recomputes nothing
less. Fitted, one constant (no published per-kernel figure was found): with 0.6 the published
CP2 rows of Llama-3 8B and 70B (NeMo 24.07) are within 4% and the 70B CP2 layout ranks below
PP8, as published; with 1.0 (no kernel cost, only the transfers, merges and step latencies) the
8B CP2 row is planned 18% too fast and the 70B ranking flips (BENCHMARKS.md "Planner
calibration")."""

CP_CORRECTION_BYTES = 10
"""Memory traffic per element and ring step of the partial-result merge: forward reads the
step's 16-bit output and read-modify-writes the fp32 accumulator (2 + 8 bytes per output
element); backward accumulates dQ and dK/dV likewise (per query / key-value element)."""


@dataclass(frozen=True)
class CPTerms:
    """Context parallelism's cost for one micro-batch on one GPU, by cause (seconds)."""

    exposed_ring: float
    """K/V (and dK/dV) transfer time that the ring step's attention compute does not hide."""
    kernels: float
    """The attention run as per-step kernels (:data:`CP_ATTENTION_EFFICIENCY`) minus what the
    compute term already charges for it at the whole-sequence rate."""
    correction: float
    """Merging the per-step partial results (memory bound, :data:`CP_CORRECTION_BYTES`)."""
    steps: float
    """The fixed cost of each extra ring step (P2P launch and wait, stream synchronisation)."""

    @property
    def total(self) -> float:
        return self.exposed_ring + self.kernels + self.correction + self.steps


def cp_seconds(tokens: float, q_width: int, kv_width: int, tp: int, cp: int, layers: int,
               attention_s: float, bandwidth: float, hbm: float, overhead_s: float,
               act_bytes: int = 2,
               attention_efficiency: float = CP_ATTENTION_EFFICIENCY) -> CPTerms:
    """Megatron-Core's context parallelism (Transformer Engine, ``cp_comm_type='p2p'``) for
    ``layers`` LLM layers, one micro-batch, one GPU.

    Every rank holds chunks ``r`` and ``2cp-1-r`` of ``2cp`` (causal load balance: each of the
    ``cp`` ring steps then does the same ``1/cp`` of the rank's attention). Per layer and
    micro-batch (``tokens`` local tokens, K/V heads / t under TP):

    * ring transfers: forward ``cp-1`` steps each send the K/V the rank holds
      (``2 * kv_width/t * tokens * act_bytes``) to the next rank while the step's attention runs;
      backward ``cp-1`` steps send K/V again (only the local chunk is kept) plus the dK/dV being
      accumulated (twice the bytes). Exposed: ``max(0, bytes / bandwidth - step attention)``
      per step, with the step's attention time ``attention_s / cp / attention_efficiency`` split
      1/3 forward, 2/3 backward (``attention_s``: the layer's score and value products at the
      compute rate, already in the compute term);
    * kernels: ``attention_s * (1 / attention_efficiency - 1)``;
    * correction: ``cp`` steps each way of ``CP_CORRECTION_BYTES`` per output (q) element
      forward, per q and K/V element backward, at ``hbm``;
    * steps: ``2 (cp-1)`` extra ring steps at ``overhead_s`` each.
    """
    if cp <= 1 or layers <= 0:
        return CPTerms(0.0, 0.0, 0.0, 0.0)
    kv = 2 * kv_width / tp * tokens * act_bytes
    slow = attention_s / attention_efficiency
    fwd_step, bwd_step = slow / 3 / cp, slow * 2 / 3 / cp
    ring = (cp - 1) * (max(0.0, kv / bandwidth - fwd_step)
                       + max(0.0, 2 * kv / bandwidth - bwd_step))
    q_elems = q_width / tp * tokens
    corr = cp * CP_CORRECTION_BYTES * (q_elems + (q_elems + 2 * kv_width / tp * tokens)) / hbm
    return CPTerms(layers * ring, layers * (slow - attention_s), layers * corr,
                   layers * 2 * (cp - 1) * overhead_s)


def p2p_seconds(tokens: float, hidden: int, tp: int, sp: bool, vpp: Optional[int],
                bandwidth: float, overhead_s: float) -> float:
    """Pipeline transfers on the critical path of one stage for one micro-batch.

    Each model chunk receives its input activation (``tokens x hidden`` bf16, / t with SP)
    forward and its gradient backward: ``2v`` transfers. 1F1B without interleaving sends and
    receives blocking (``batch_p2p_comm``): bytes / bandwidth + the fixed overhead each. The
    interleaved schedule overlaps the bytes with compute (``overlap_p2p_comm``); the fixed
    overhead per transfer stays, which is what makes very deep interleaving (one layer per
    virtual stage) lose to fewer, larger chunks.
    """
    v = vpp or 1
    size = tokens * hidden * 2 / (tp if sp else 1)
    per = overhead_s + (0.0 if v > 1 else size / bandwidth)
    return 2 * v * per


def dp_comm_seconds(params: float, dp: int, grad_bytes: int, param_bytes: int,
                    distributed_optimizer: bool, bandwidth: float) -> tuple[float, float]:
    """(gradient reduction, parameter all-gather) seconds per step for ``params`` trained
    parameters on one GPU over a data-parallel group of ``dp`` (DP x CP) ranks (ring: each GPU
    moves ``(n-1)/n`` of the buffer per collective). Distributed optimizer: reduce-scatter of
    the gradients + all-gather of the updated 16-bit parameters; without it one all-reduce
    (twice the reduce-scatter volume) and no gather."""
    if dp <= 1 or params <= 0:
        return 0.0, 0.0
    frac = (dp - 1) / dp
    if distributed_optimizer:
        return params * grad_bytes * frac / bandwidth, params * param_bytes * frac / bandwidth
    return 2 * params * grad_bytes * frac / bandwidth, 0.0


def dp_exposed_seconds(reduce_s: float, gather_s: float, chunks: int, backward_window_s: float,
                       forward_window_s: float) -> float:
    """What the overlapped DP communication leaves exposed. Megatron-Core buckets it by layer
    (no PP) or by virtual pipeline stage (PP): the reduce-scatter of a bucket starts when its
    last backward ends, so the last bucket is always exposed, and the rest only hides if it fits
    in the remaining backward of the step's last micro-batch (the parameter all-gather likewise
    in the first forward). PP without interleaving has one bucket: all exposed."""
    chunks = max(1, chunks)
    rs = max(reduce_s / chunks, reduce_s - backward_window_s)
    ag = max(gather_s / chunks, gather_s - forward_window_s)
    return rs + ag


CROSS_ENTROPY_PASSES = 3
"""Memory passes over the fp32 logits in the vocab-parallel cross entropy (max/sum-exp
reductions and softmax forward, the gradient write backward)."""

OPTIMIZER_BYTES_PER_PARAM = 30
"""Adam step per (sharded) parameter: read fp32 grad, master, m, v (16 B), write master, m, v
(12 B), write the bf16 parameter (2 B)."""


def cross_entropy_seconds(tokens: float, vocab_per_gpu: int, hbm: float) -> float:
    return tokens * vocab_per_gpu * 4.0 * CROSS_ENTROPY_PASSES / hbm


def optimizer_seconds(params_per_gpu: float, hbm: float) -> float:
    return params_per_gpu * OPTIMIZER_BYTES_PER_PARAM / hbm


# ------------------------------------------------------------------------------------------------
# Composing a stage's time per micro-batch and the step
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Links:
    """The bandwidth each parallel dimension's traffic runs at for one layout: NVLink while the
    group (with the dimensions nested inside it: TP innermost, then CP, DP, PP) fits in a node,
    the per-GPU network otherwise."""

    tp: float
    cp: float
    dp: float
    pp: float

    @classmethod
    def of(cls, net: Interconnect, tp: int, cp: int, dp_n: int, pp: int) -> "Links":
        node = net.gpus_per_node
        pick = lambda n: net.intra_node if n <= node else net.inter_node  # noqa: E731
        return cls(pick(tp), pick(tp * cp), pick(tp * dp_n), pick(tp * dp_n * pp))


def stage_times(compute_s: float, llm_layers: int, chunk_layers: Sequence[int], rank: int,
                has_lm_head: bool, trained_params: float, layout: Layout, tokens: float,
                hidden: int, q_width: int, kv_width: int, attention_s_per_layer: float,
                vocab: int, net: Interconnect, links: Links,
                tp_exposed: float, grad_bytes: int, param_bytes: int, shard: int,
                recompute_block: Optional[int], vit_patches: float = 0.0, vit_hidden: int = 0,
                vit_depth: int = 0) -> dict:
    """Seconds per micro-batch (compute, tp, cp, p2p, cross_entropy) and per step (dp,
    optimizer) of one pipeline stage, from its compute time and the terms above.
    ``vit_patches`` > 0 on the first stage with images (the ViT is tensor parallel without SP:
    2 + 2 all-reduces per block)."""
    tp, pp, cp, v = layout.tp, layout.pp, layout.cp, layout.vpp or 1
    sp = bool(layout.sequence_parallel)
    m = layout.num_micro_batches
    recomputed = 0
    if layout.recompute == "full":
        recomputed = sum(n if recompute_block is None else min(recompute_block, n)
                         for n in chunk_layers)
    t_c = compute_s
    times = {"compute": t_c,
             "tp": tp_exposed * tp_comm_seconds(tokens, hidden, tp, sp, llm_layers, recomputed,
                                                links.tp, 2),
             "cp": cp_seconds(tokens, q_width, kv_width, tp, cp, llm_layers,
                              attention_s_per_layer, links.cp, net.hbm,
                              net.p2p_overhead_s).total,
             "p2p": p2p_seconds(tokens, hidden, tp, sp, layout.vpp, links.pp,
                                net.p2p_overhead_s) if pp > 1 else 0.0,
             "cross_entropy": cross_entropy_seconds(tokens, vocab // tp, net.hbm)
             if has_lm_head else 0.0}
    if vit_patches and tp > 1:
        times["tp"] += tp_exposed * tp_comm_seconds(vit_patches, vit_hidden, tp, False, vit_depth,
                                                    0, links.tp, 2)
    rs, ag = dp_comm_seconds(trained_params, layout.dp * cp, grad_bytes, param_bytes,
                             layout.distributed_optimizer, links.dp)
    chunks = llm_layers if pp == 1 else v
    # Window: the backward (forward) work left after the first bucket is final: the last
    # micro-batch's backward without PP; the interleaved cool-down (as many chunk backwards as
    # the warm-up had forwards) with VPP; nothing for plain 1F1B.
    if pp == 1:
        bwd_win, fwd_win = t_c * 2 / 3, t_c / 3
    elif v > 1:
        steps = min(m * v, (pp - 1 - rank) * 2 + (v - 1) * pp)
        bwd_win, fwd_win = steps * t_c * 2 / 3 / v, steps * t_c / 3 / v
    else:
        bwd_win = fwd_win = 0.0
    times["dp"] = dp_exposed_seconds(rs, ag, chunks, bwd_win, fwd_win)
    times["optimizer"] = optimizer_seconds(trained_params / shard, net.hbm)
    return times


def step_seconds(layout: Layout, stages: Sequence) -> float:
    """``(m + (p-1)/v) * t_slowest + max over stages (exposed DP + optimizer)``: the slowest
    stage sets the pace of the pipeline, the bubble adds ``(p-1)/v`` of its micro-batch time."""
    pp, v = layout.pp, layout.vpp or 1
    slowest = max(s.micro_batch_time for s in stages)
    return (layout.num_micro_batches + (pp - 1) / v) * slowest \
        + max(s.times["dp"] + s.times["optimizer"] for s in stages)
