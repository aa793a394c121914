"""Layout search: every TP, PP, VPP, first-stage size and recomputation that fits, fastest first."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from ..config.schema import ConfigError, OmniConfig
from .core import Plan, plan
from .inputs import Layout, Workload
from .mix import balanced_first_stage_layers, plan_mix


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def suggest(cfg: OmniConfig, workload: Optional[Workload] = None, gpu: str = "h100",
            precision: str = "bf16", micro_batch_size: int = 1, global_batch: int = 128,
            cp: int = 1, num_gpus: Optional[int] = None, top: int = 5,
            tps: Iterable[int] = (1, 2, 4, 8), max_pp: int = 32,
            recomputes: Iterable[Optional[str]] = (None, "selective", "full"),
            assumed_mfu: Optional[float] = None, model_name: str = "custom",
            memory_gib: Optional[float] = None,
            workloads: Optional[Sequence[tuple[float, Workload, str]]] = None,
            memory_workloads: Sequence[Workload] = ()) -> list[Plan]:
    """Layouts that fit, best estimated throughput first.

    Searched: TP in ``tps``, PP dividing the layer count (<= ``max_pp``), no VPP or any VPP that
    divides the layers per stage, a smaller first stage when encoders are present (no VPP),
    ``recomputes``; distributed optimizer on, SP on with TP > 1, CP as given. Without
    ``num_gpus`` each layout gets the smallest DP that fits (DP must divide the global batch in
    micro-batches) and only layouts at the smallest fitting GPU count are returned; with
    ``num_gpus`` DP is what that count leaves. With ``workloads`` (:func:`recipe_workloads`)
    every layout is planned over the recipe's row mix (:func:`plan_mix`), and the first-stage
    sizes tried include the one that balances the encoders' cost at that mix
    (:func:`balanced_first_stage_layers`).
    """
    workload = workload or Workload(cfg.data.seq_length)
    llm = cfg.model.llm
    n_layers = llm.num_layers
    has_enc = cfg.model.vision.enabled or cfg.model.audio.enabled
    if global_batch % micro_batch_size:
        raise ConfigError("global batch must be a multiple of the micro batch size")
    rows = global_batch // micro_batch_size
    found: list[Plan] = []
    for tp in tps:
        for pp in [p for p in _divisors(n_layers) if p <= max_pp]:
            if num_gpus is not None:
                if num_gpus % (tp * pp * cp):
                    continue
                dps = [num_gpus // (tp * pp * cp)]
                if rows % dps[0]:
                    continue
            else:
                dps = _divisors(rows)
            options: list[tuple[Optional[int], Optional[int]]] = [(None, None)]
            if pp > 1:
                options += [(vv, None) for vv in _divisors(n_layers // pp) if vv >= 2]
                if has_enc:
                    # The first stage also runs the encoders (give it fewer layers) but the last
                    # runs the LM head (sometimes the heavier one): the nearest sizes each way.
                    even = n_layers // pp
                    ok = [f for f in range(1, n_layers) if (n_layers - f) % (pp - 1) == 0]
                    firsts = [f for f in ok if f < even][-2:] + [f for f in ok if f > even][:1]
                    if workloads:
                        # with a row mix (and its memory-heavy rows) a first stage much lighter
                        # than even may be what fits: try up to 8 lighter sizes as well
                        light = [f for f in ok if f < even]
                        step_ = max(1, len(light) // 8)
                        firsts += [f for f in light[::step_] if f not in firsts]
                        try:
                            bal = balanced_first_stage_layers(
                                cfg, Layout(tp, pp, None, cp, dps[0], micro_batch_size,
                                            global_batch), workloads, gpu, precision)
                        except ConfigError:
                            bal = None
                        if bal is not None and bal not in firsts:
                            firsts.append(bal)
                    options += [(None, f) for f in firsts]
            for vpp, first in options:
                for rec in recomputes:
                    def attempt(dp: int) -> Optional[Plan]:
                        try:
                            lay = Layout(tp, pp, vpp, cp, dp, micro_batch_size, global_batch,
                                         first_stage_num_layers=first, recompute=rec)
                            if workloads:
                                return plan_mix(cfg, lay, workloads, gpu, precision,
                                                memory_workloads, assumed_mfu=assumed_mfu,
                                                model_name=model_name, memory_gib=memory_gib)
                            return plan(cfg, lay, workload, gpu, precision,
                                        assumed_mfu=assumed_mfu, model_name=model_name,
                                        memory_gib=memory_gib)
                        except ConfigError:
                            return None

                    # Memory does not grow with DP: binary search the smallest DP that fits.
                    lo, hi, best = 0, len(dps) - 1, None
                    while lo <= hi:
                        mid = (lo + hi) // 2
                        p = attempt(dps[mid])
                        if p is not None and p.fits:
                            best, hi = p, mid - 1
                        else:
                            lo = mid + 1
                    if best is not None:
                        found.append(best)
    if not found:
        return []
    if num_gpus is None:
        smallest = min(p.layout.num_gpus for p in found)
        found = [p for p in found if p.layout.num_gpus == smallest]
    found.sort(key=lambda p: (-(p.tokens_per_s_per_gpu or 0.0), p.peak_bytes))
    return found[:top]
