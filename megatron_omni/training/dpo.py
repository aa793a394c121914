"""One alignment (AT) step: DPO on preference pairs + ``sft_weight`` x SFT on instruction groups.

    L = L_dpo + sft_weight * L_sft
    L_dpo = mean over the step's pairs of  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    L_sft = sum_i w_i L_i + w_ga L_gen_a   (w_i = 1/M over the M instruction groups by default)

``pi_c`` / ``pi_r``: log-probability of the chosen / rejected answer under the trained model, the
SUM of the per-token log-probs over the answer tokens (``loss_mask``: the answer and its
``<|eot_id|>``) of that sample's segment of the packed row (``cu_seqlens``). A preference row
holds whole pairs: ``batch["dpo_pairs"]`` is a ``[P, 2]`` tensor of (chosen, rejected) segment
indices (``data/preference.py`` builds it), so a pair never spans micro-batches or DP ranks.
``ref_c`` / ``ref_r``: the same sums under the reference model = the SAME network with its LoRA
adapters switched off (:func:`~megatron_omni.training.lora.adapters_disabled`): no second copy of
the LLM. They are computed in the same step by a forward-only schedule call (no autograd graph,
adapters off) before the training schedule; ``bench/bench_dpo_reference.py`` measures what that
costs against reference log-probs precomputed once (see BENCHMARKS.md).

Pipeline parallelism: the per-token losses exist on the last stage only; the segment sums are
formed there, from the per-token losses, exactly as the token-loss sums of ``training/step.py``,
and so are the reference sums of the forward-only pass (the last stage keeps them per
micro-batch). Nothing extra crosses the pipeline. Tensor parallelism: the vocab-parallel
cross-entropy gives every TP rank the full per-token loss, so every TP rank forms the same sums.

Gradient scaling follows ``training/step.py``: a micro-batch's loss is its sum divided by the
GLOBAL count (pairs, or loss tokens of its group, all-reduced over DP before the schedule runs),
times DP size (DDP averages) and the number of micro-batches (the schedule divides by it).

Reported (identical on every rank): ``dpo/loss``, ``dpo/reward_chosen`` (mean of
``beta (pi_c - ref_c)``), ``dpo/reward_rejected``, ``dpo/reward_margin`` (their difference),
``dpo/accuracy`` (share of pairs with reward_chosen > reward_rejected), ``loss/sft`` (L_sft) and
the per-group token losses like an ordinary step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..data.special_tokens import SpecialTokenIds
from .lora import adapters_disabled
from .step import GEN_AUDIO, StepResult, _masks, global_token_counts, model_inputs

DPO_KEYS = ("dpo/loss", "dpo/reward_chosen", "dpo/reward_rejected", "dpo/reward_margin",
            "dpo/accuracy")


@dataclass
class ATResult(StepResult):
    """A :class:`StepResult` plus the DPO metrics (``DPO_KEYS``, ``loss/sft``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    pairs: int = 0


def segment_logps(per_token_loss: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor
                  ) -> torch.Tensor:
    """Sum of ``-loss * mask`` per segment of a packed row: ``[num_segments]`` (float32).

    ``per_token_loss``/``mask``: ``[1, T]`` (or ``[T]``); ``cu_seqlens``: ``[0, ..., T]``."""
    x = (per_token_loss.float() * mask.float()).reshape(-1)
    cu = cu_seqlens.to(torch.long).to(x.device)
    seg = torch.searchsorted(cu[1:], torch.arange(x.numel(), device=x.device), right=True)
    return -torch.zeros(cu.numel() - 1, dtype=x.dtype, device=x.device).index_add_(0, seg, x)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, pairs: torch.Tensor, beta: float
              ) -> dict[str, torch.Tensor]:
    """Per-pair DPO quantities from per-segment log-probs. ``pairs``: ``[P, 2]`` segment indices
    (chosen, rejected)."""
    pairs = pairs.to(torch.long).to(policy.device)
    reference = reference.to(policy.device)
    rc = beta * (policy[pairs[:, 0]] - reference[pairs[:, 0]])
    rr = beta * (policy[pairs[:, 1]] - reference[pairs[:, 1]])
    return {"loss": -F.logsigmoid(rc - rr), "reward_chosen": rc, "reward_rejected": rr,
            "correct": (rc > rr).float()}


def _pair_count(batches: Sequence[dict]) -> float:
    t = torch.tensor([float(sum(len(b["dpo_pairs"]) for b in batches))], dtype=torch.float64)
    if ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    return t.item()


def _run_schedule(model, order, forward_step, forward_only: bool):
    chunks = model if isinstance(model, list) else [model]
    iters = [iter(order) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(order), seq_length=order[0][1]["tokens"].shape[1],
        micro_batch_size=1, forward_only=forward_only)


def reference_logps(model, batches: Sequence[dict]) -> Optional[list[torch.Tensor]]:
    """Per-segment log-probs of every preference micro-batch under the reference model (the
    adapters switched off), no autograd graph. A list (one tensor per micro-batch) on the last
    pipeline stage, None elsewhere."""
    if not batches:
        return []
    order = [("ref", b) for b in batches]

    def forward_step(data_iterator, m):
        _, b = next(data_iterator)
        args, kwargs = model_inputs(b)
        out = m(*args, **kwargs)

        def loss_func(per_token):
            lp = segment_logps(per_token, b["loss_mask"], b["cu_seqlens"]).detach()
            return per_token.new_zeros(()), {"logps": lp}

        return out, loss_func

    with torch.no_grad(), adapters_disabled(model):
        store = _run_schedule(model, order, forward_step, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return [d["logps"] for d in store]


def run_at_step(model, groups: dict[str, Sequence[dict]], preference_group: str,
                special: SpecialTokenIds, *, beta: float = 0.1, sft_weight: float = 0.3,
                weights: Optional[dict[str, float]] = None, gen_audio_weight: float = 1.0,
                forward_only: bool = False,
                reference: Optional[list[torch.Tensor]] = None) -> ATResult:
    """Forward/backward one AT step in one schedule call (no optimizer update).

    ``groups``: group name -> micro-batches; ``groups[preference_group]`` are preference rows
    (with ``dpo_pairs``), the other groups instruction rows. ``weights``: w_i of the instruction
    groups inside L_sft (default 1/M each). ``reference``: per-segment reference log-probs per
    preference micro-batch (last stage); computed here with the adapters off when None.
    """
    pref = list(groups.get(preference_group, []))
    instr = {n: list(bs) for n, bs in groups.items() if n != preference_group and bs}
    if not pref and not instr:
        raise ValueError("run_at_step got no micro-batches")
    names = sorted(instr)
    if weights is None:
        weights = {n: 1.0 / max(1, len(names)) for n in names}
    counts = global_token_counts(instr, special) if instr else {GEN_AUDIO: 0.0}
    n_pairs = _pair_count(pref) if pref else 0.0
    if pref and reference is None:
        reference = reference_logps(model, pref)
    order = [(n, b, -1) for n in names for b in instr[n]] + \
        [(preference_group, b, i) for i, b in enumerate(pref)]
    dp = ps.get_data_parallel_world_size()
    cp = ps.get_context_parallel_world_size()
    scale = dp * len(order) / cp

    def forward_step(data_iterator, m):
        name, b, idx = next(data_iterator)
        args, kwargs = model_inputs(b)
        out = m(*args, **kwargs)

        def loss_func(per_token):
            if idx >= 0:
                lp = segment_logps(per_token, b["loss_mask"], b["cu_seqlens"])
                t = dpo_terms(lp, reference[idx], b["dpo_pairs"], beta)
                loss = t["loss"].sum() / max(n_pairs, 1.0)
                stats = torch.stack([t["loss"].sum(), t["reward_chosen"].sum(),
                                     t["reward_rejected"].sum(), t["correct"].sum()]).detach()
                return loss * scale, {"name": name, "dpo": stats.clone()}
            text_m, ga_m = _masks(b, special)
            s_text = (per_token.float() * text_m).sum()
            s_ga = (per_token.float() * ga_m).sum()
            loss = s_text * (sft_weight * weights.get(name, 1.0) / max(counts[name], 1.0))
            if counts[GEN_AUDIO] > 0:
                loss = loss + s_ga * (sft_weight * gen_audio_weight / counts[GEN_AUDIO])
            return loss * scale, {"name": name, "sum_text": s_text.detach().clone(),
                                  "sum_ga": s_ga.detach().clone()}

        return out, loss_func

    store = _run_schedule(model, order, forward_step, forward_only)
    return _reduce(store, names, counts, n_pairs, weights, gen_audio_weight, sft_weight)


def _reduce(store, names, counts, n_pairs, weights, gen_audio_weight, sft_weight) -> ATResult:
    k = len(names)
    sums = torch.zeros(k + 1 + 4, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for d in store:
            if "dpo" in d:
                sums[k + 1:] += d["dpo"].double().cpu()
            else:
                sums[names.index(d["name"])] += float(d["sum_text"])
                sums[k] += float(d["sum_ga"])
    if ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(sums, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    losses, tokens = {}, {}
    for i, n in enumerate(names):
        tokens[n] = int(counts[n])
        losses[n] = sums[i].item() / counts[n] if counts[n] > 0 else float("nan")
    if counts[GEN_AUDIO] > 0:
        tokens[GEN_AUDIO] = int(counts[GEN_AUDIO])
        losses[GEN_AUDIO] = sums[k].item() / counts[GEN_AUDIO]
    sft = sum(weights.get(n, 1.0) * losses[n] for n in names if counts[n] > 0)
    if GEN_AUDIO in losses:
        sft += gen_audio_weight * losses[GEN_AUDIO]
    metrics = {"loss/sft": sft}
    if n_pairs > 0:
        loss_s, rc_s, rr_s, acc_s = (sums[k + 1 + j].item() / n_pairs for j in range(4))
        metrics.update({"dpo/loss": loss_s, "dpo/reward_chosen": rc_s,
                        "dpo/reward_rejected": rr_s, "dpo/reward_margin": rc_s - rr_s,
                        "dpo/accuracy": acc_s})
    weighted = metrics.get("dpo/loss", 0.0) + sft_weight * sft
    check = [v for n, v in losses.items() if tokens.get(n, 0) > 0] + list(metrics.values())
    finite = all(math.isfinite(v) for v in check)
    flag = torch.tensor([0.0 if finite else 1.0])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return ATResult(losses=losses, weighted_loss=weighted, tokens=tokens,
                    finite=bool(flag.item() == 0.0), metrics=metrics, pairs=int(n_pairs))
