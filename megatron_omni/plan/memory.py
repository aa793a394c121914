"""Memory model: activation bytes per token / patch / frame, and what the pipeline schedule
holds in flight (the candidates for each stage's peak)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

from ..config.schema import ConfigError, OmniConfig


@dataclass(frozen=True)
class Numerics:
    """Bytes per element of each kind of state, from the precision."""

    precision: str
    param: int
    act: int
    grad: int
    master: int

    @classmethod
    def of(cls, precision: str, grad_fp32: bool = True) -> "Numerics":
        if precision == "fp32":
            return cls("fp32", 4, 4, 4, 0)
        if precision in ("bf16", "fp8"):
            return cls(precision, 2, 2, 4 if grad_fp32 else 2, 4)
        raise ConfigError(f"precision must be bf16|fp8|fp32, got {precision!r}")


def llm_layer_activation_bytes(cfg: OmniConfig, num: Numerics, impl: str, tp: int, sp: bool,
                               recompute: Optional[str], seqlens: Sequence[int],
                               flash_attention: bool = True) -> tuple[float, float]:
    """(kept bytes per token, bytes per token of one whole layer) for one LLM layer on one GPU.

    Korthikanti et al.'s per-layer count (``34 s b h`` bytes for GPT-3: 11 attention + 19 MLP +
    4 norms, ``+5 a s^2 b`` for unfused attention), redone for a Llama layer with flash attention,
    no dropout, GQA (``q_w = a*d``, ``kv_w = g*d``) and SwiGLU (F):

    * ``te`` bf16: norm inputs and outputs ``4h`` (replicated across TP unless sequence
      parallel) + q, k, v and the attention output ``2 q_w + 2 kv_w`` + SwiGLU input ``2F`` + down
      projection input ``F`` (all / t), times 2 bytes;
    * ``te`` fp8: the same, but the inputs saved by TE's FP8 linears (the two norm outputs, the
      attention output for the out-projection, the down-projection input) take 1 byte:
      ``6h`` replicated + ``5 q_w + 4 kv_w + 5F`` bytes;
    * ``local``: enumerated from autograd's saved tensors: each RMSNorm keeps input, inverse RMS
      and normalised input, each linear its input (``6h + 2``); RoPE ``4d`` (cos/sin of q and k);
      SDPA keeps q and GQA-expanded k, v (``3 q_w``), its output and the reshaped copy
      (``2 q_w``) and the log-sum-exp (a); unfused SwiGLU keeps ``5F``.
    * Unfused attention (``flash_attention=False``) adds the scores and softmax output,
      ``2 a sum(s_i^2) / s`` per token; selective recomputation drops them (with flash attention
      it has nothing to drop: memory unchanged, extra FLOPs).
    * Full recomputation keeps only the layer input (``h``, / t with SP); the whole layer is
      rebuilt, one at a time, during backward (reported as a transient).
    """
    llm = cfg.model.llm
    h, f, d, a = llm.hidden_size, llm.ffn_hidden_size, llm.head_dim, llm.num_attention_heads
    q_w, kv_w = a * d, llm.num_query_groups * d
    ab = num.act
    if impl == "te" and num.precision == "fp8":
        rep, tpart = 6.0 * h, 5.0 * q_w + 4.0 * kv_w + 5.0 * f
    elif impl == "te":
        rep, tpart = 4.0 * h * ab, (2.0 * q_w + 2.0 * kv_w + 3.0 * f) * ab
    elif impl == "local":
        rep, tpart = (6.0 * h + 2 + 4 * d) * ab, (5.0 * q_w + a + 5.0 * f) * ab
    else:
        raise ConfigError(f"impl must be te|local, got {impl!r}")
    scores = 0.0
    if not flash_attention:
        tokens = sum(seqlens)
        scores = 2.0 * a * sum(s * s for s in seqlens) / tokens * ab / tp
    whole = rep / (tp if sp else 1) + tpart / tp + scores
    if recompute == "full":
        return h * ab / (tp if sp else 1), whole
    if recompute == "selective":
        return whole - scores, whole - scores
    return whole, whole


def _vit_patch_bytes(cfg: OmniConfig, num: Numerics, impl: str, tp: int,
                     recompute: Optional[str], flash_attention: bool, grids) -> tuple[float, float]:
    """(kept bytes per patch, one block's bytes per patch) for the whole ViT + merger.

    Per block and patch (enumerated on ``models/vision.py``'s local layers): norm inputs/outputs
    and the residual ``5W`` + rotary ``4d`` + 4 stats replicated; q, k, the fused qkv output and
    the attention output ``6W``, quick_gelu's input, sigmoid and product ``3F``, the lse (heads)
    sharded by TP. TE saves one W less (no reshaped attention-output copy). The merger keeps
    ``2W`` replicated + ``2W`` sharded per patch, the patch embedding its pixel input. The ViT is
    never sequence-parallel and has no FP8.
    """
    v = cfg.model.vision
    w, f, heads = v.hidden_size, int(v.hidden_size * v.mlp_ratio), v.num_heads
    d = w // heads
    ab = num.act
    rep = (5.0 * w + 4 * d + 4) if impl == "local" else (4.0 * w + 4 * d)
    tpart = 6.0 * w + 3.0 * f + heads
    patches = sum(t * hh * ww for t, hh, ww in grids)
    scores = 0.0
    if not flash_attention and recompute not in ("selective", "full"):
        scores = 2.0 * heads * sum(t * (hh * ww) ** 2 for t, hh, ww in grids) / patches / tp
    block = (rep + tpart / tp) * ab + scores * ab
    kept_block = w * ab if recompute == "full" else block
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    merger = (2.0 * w + 2 + 2.0 * w / tp) * ab
    return v.depth * kept_block + merger + patch_in * ab, block


def _sanm_frame_bytes(cfg: OmniConfig) -> float:
    """SAN-M keeps, per frame (fp32, enumerated on ``models/audio.py``): first block
    ``2*560 + 7d + F + 8``, every other block ``9d + F + 8``, the final norm ``d + 3``."""
    a = cfg.model.audio
    d, f = a.hidden_size, a.ffn_hidden_size
    elems = (2 * a.input_size + 7 * d + f + 8) + (a.num_blocks - 1) * (9 * d + f + 8) + d + 3
    return 4.0 * elems


# ------------------------------------------------------------------------------------------------
# Pipeline schedule
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def inflight_counts(pp: int, vpp: Optional[int], m: int, rank: int) -> tuple[tuple[int, ...], ...]:
    """Per model chunk, how many micro-batches' activations pipeline ``rank`` holds right after
    each forward of Megatron-Core's schedule (the candidates for the memory peak; dominated
    candidates dropped).

    1F1B: ``min(m, p - rank - 1)`` warm-up forwards, then one forward + one backward each.
    Interleaved (v chunks): ``(p - rank - 1) * 2 + (v - 1) * p`` warm-up forwards; virtual
    micro-batch k runs chunk ``(k // p) % v`` forward and ``v - 1 - (k // p) % v`` backward
    (megatron.core.pipeline_parallel.schedules, micro-batch groups of size p).
    """
    v = vpp or 1
    total = m * v
    if v == 1:
        warmup = min(m, pp - rank - 1)
    else:
        warmup = min(total, (pp - rank - 1) * 2 + (v - 1) * pp)
    held = [0] * v
    cands: list[tuple[int, ...]] = []
    f = b = 0
    while f < total:
        held[(f // pp) % v] += 1
        f += 1
        cands.append(tuple(held))
        if f > warmup:
            held[v - 1 - (b // pp) % v] -= 1
            b += 1
    keep = []
    for c in sorted(set(cands), key=sum, reverse=True):
        if not any(all(x <= y for x, y in zip(c, k)) for k in keep):
            keep.append(c)
    return tuple(keep)
