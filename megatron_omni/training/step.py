"""One optimizer step with modality groups (docs/recipe.md sections 3-4).

Every micro-batch holds one modality. A step runs ONE megatron-core schedule call over the
micro-batches of all modality groups (gradients accumulate), then the caller makes ONE optimizer
update. The loss of a step is

    L = sum_i w_i * L_i  +  w_ga * L_gen_a

where L_i is the mean token loss of modality i's text-kind tokens over ALL its micro-batches and
data-parallel ranks, and L_gen_a the mean loss of the speech-output tokens (``<gen_audio>`` spans)
over the whole step. To make the gradient exactly that, each micro-batch's loss is its token-loss
sum divided by the GLOBAL token count of its group (all-reduced over data parallel before the
schedule runs, since the batches are fetched up front), multiplied by the data-parallel size
(megatron-core's DDP averages gradients over DP) and by the number of micro-batches (the schedule
divides every micro-batch loss by it). The reported losses are the unweighted L_i and L_gen_a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..data.special_tokens import SpecialTokenIds
from ..models.attention import packed_seq_params
from ..models.omni import token_kinds
from ..parallel.device import comm_device

GEN_AUDIO = "gen_audio"


@dataclass
class StepResult:
    """What one step reports (identical on every rank)."""

    losses: dict[str, float]
    """Unweighted mean token loss per modality, plus ``gen_audio`` when present."""
    weighted_loss: float
    """sum_i w_i L_i + w_ga L_gen_a: what the gradient is of."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Loss tokens per group over all DP ranks."""
    finite: bool = True
    """False when any reported loss was NaN/Inf on any rank."""


def _masks(b: dict, special: SpecialTokenIds) -> tuple[torch.Tensor, torch.Tensor]:
    kinds = token_kinds(b["labels"], special)
    mask = b["loss_mask"].float()
    return mask * (~kinds["gen_audio"]).float(), mask * kinds["gen_audio"].float()


def global_token_counts(groups: dict[str, Sequence[dict]], special: SpecialTokenIds
                        ) -> dict[str, float]:
    """Loss tokens per modality group and of gen_audio, summed over data-parallel ranks."""
    names = sorted(groups)
    local = []
    for name in names:
        local.append(sum(float(_masks(b, special)[0].sum()) for b in groups[name]))
    local.append(sum(float(_masks(b, special)[1].sum()) for bs in groups.values() for b in bs))
    t = torch.tensor(local, dtype=torch.float64, device=comm_device())
    if ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    vals = t.tolist()
    out = dict(zip(names, vals[:-1]))
    out[GEN_AUDIO] = vals[-1]
    return out


def model_inputs(b: dict) -> tuple[tuple, dict]:
    """Positional and keyword arguments of ``OmniModel.forward`` for a batch dict."""
    kwargs = dict(labels=b["labels"], packed_seq_params=packed_seq_params(b["cu_seqlens"],
                                                                          b.get("max_seqlen")),
                  vision_patches=b.get("vision_patches"),
                  vision_grid_thw=b.get("vision_grid_thw"),
                  audio_waveforms=b.get("audio_waveforms"),
                  sample_names=b.get("sample_names"))
    return (b["tokens"], b["position_ids"]), kwargs


def run_group_step(model, groups: dict[str, Sequence[dict]], weights: dict[str, float],
                   special: SpecialTokenIds, gen_audio_weight: float = 1.0,
                   forward_only: bool = False) -> StepResult:
    """Forward/backward all modality groups in one schedule call (no optimizer update).

    ``model``: the DDP-wrapped chunk list (or one chunk). ``groups``: modality -> its
    micro-batches (each a packed row dict, see ``model_inputs``). ``weights``: w_i per modality.
    """
    chunks = model if isinstance(model, list) else [model]
    order = [(name, b) for name in sorted(groups) for b in groups[name]]
    if not order:
        raise ValueError("run_group_step got no micro-batches")
    counts = global_token_counts(groups, special)
    num_mb = len(order)
    dp = ps.get_data_parallel_world_size()
    cp = ps.get_context_parallel_world_size()
    scale = dp * num_mb / cp

    def forward_step(data_iterator, m):
        name, b = next(data_iterator)
        args, kwargs = model_inputs(b)
        out = m(*args, **kwargs)

        def loss_func(per_token):
            text_m, ga_m = _masks(b, special)
            s_text = (per_token.float() * text_m).sum()
            s_ga = (per_token.float() * ga_m).sum()
            loss = s_text * (weights.get(name, 1.0) / max(counts[name], 1.0))
            if counts[GEN_AUDIO] > 0:
                loss = loss + s_ga * (gen_audio_weight / counts[GEN_AUDIO])
            # Clones: the schedule divides the returned loss in place.
            return loss * scale, {"name": name, "sum_text": s_text.detach().clone(),
                                  "sum_ga": s_ga.detach().clone()}

        return out, loss_func

    iters = [iter(order) for _ in chunks]
    seq_length = order[0][1]["tokens"].shape[1]
    store = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_mb, seq_length=seq_length, micro_batch_size=1,
        forward_only=forward_only)
    return _reduce_report(store, groups, counts, weights, gen_audio_weight)


def _reduce_report(store, groups, counts, weights, gen_audio_weight) -> StepResult:
    """Sum the last stage's per-micro-batch sums, average over DP, share with every rank."""
    names = sorted(groups)
    local = [0.0] * (len(names) + 1)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for d in store:
            local[names.index(d["name"])] += float(d["sum_text"])
            local[-1] += float(d["sum_ga"])
    # Collectives need their tensors on the communication device (the GPU under NCCL).
    sums = torch.tensor(local, dtype=torch.float64, device=comm_device())
    if ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(sums, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # Only the last stage computed losses; the others contribute zeros.
        torch.distributed.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    sums = sums.tolist()
    losses, tokens = {}, {}
    for i, name in enumerate(names):
        tokens[name] = int(counts[name])
        losses[name] = sums[i] / counts[name] if counts[name] > 0 else float("nan")
    if counts[GEN_AUDIO] > 0:
        tokens[GEN_AUDIO] = int(counts[GEN_AUDIO])
        losses[GEN_AUDIO] = sums[-1] / counts[GEN_AUDIO]
    weighted = sum(weights.get(n, 1.0) * losses[n] for n in names if counts[n] > 0)
    if GEN_AUDIO in losses:
        weighted += gen_audio_weight * losses[GEN_AUDIO]
    finite = all(math.isfinite(v) for n, v in losses.items() if tokens.get(n, 0) > 0)
    flag = torch.tensor([0.0 if finite else 1.0], device=comm_device())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return StepResult(losses=losses, weighted_loss=weighted, tokens=tokens,
                      finite=bool(flag.item() == 0.0))
