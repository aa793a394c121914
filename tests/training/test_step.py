"""A step with modality groups equals the sum of the separately weighted per-modality gradients."""

import math

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from omni_batch import omni_batch, tiny_omni_cfg

from megatron_omni.models.omni import OmniModel, special_token_ids, token_kinds
from megatron_omni.training.step import model_inputs, run_group_step


def groups_for(cfg):
    text = [omni_batch(cfg, seed=s, vision=False, audio=False) for s in (1, 2)]
    audio = [omni_batch(cfg, seed=3, vision=False, audio=True)]
    return {"text": text, "audio": audio}


def test_group_step_equals_weighted_sum_of_modality_gradients(single_rank):
    cfg = tiny_omni_cfg(vision=False)
    sp = special_token_ids(cfg)
    torch.manual_seed(0)
    ref = OmniModel(cfg)
    model = OmniModel(cfg)
    model.load_state_dict(ref.state_dict())
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), model)
    groups = groups_for(cfg)
    weights = {"text": 2.5, "audio": 0.4}
    ddp.zero_grad_buffer()
    res = run_group_step(ddp, groups, weights, sp, gen_audio_weight=0.7)
    ddp.finish_grad_sync()

    # Reference: each modality's mean token loss over its micro-batches, weighted, plus the
    # speech-output loss over the whole step, by plain autograd.
    total_ga = sum(float((b["loss_mask"] * token_kinds(b["labels"], sp)["gen_audio"]).sum())
                   for bs in groups.values() for b in bs)
    assert total_ga > 0
    losses = {}
    ga_sum = 0.0
    loss_total = 0.0
    for name, bs in groups.items():
        n_text = sum(float((b["loss_mask"] * ~token_kinds(b["labels"], sp)["gen_audio"]).sum())
                     for b in bs)
        s_text = 0.0
        for b in bs:
            args, kwargs = model_inputs(b)
            per_tok = ref(*args, **kwargs)
            kinds = token_kinds(b["labels"], sp)
            tm = b["loss_mask"] * (~kinds["gen_audio"]).float()
            gm = b["loss_mask"] * kinds["gen_audio"].float()
            s = (per_tok * tm).sum()
            g = (per_tok * gm).sum()
            (weights[name] * s / n_text + 0.7 * g / total_ga).backward()
            s_text += s.item()
            ga_sum += g.item()
        losses[name] = s_text / n_text
        loss_total += weights[name] * losses[name]
    loss_total += 0.7 * ga_sum / total_ga
    for name in groups:
        assert math.isclose(res.losses[name], losses[name], rel_tol=1e-6)
    assert math.isclose(res.losses["gen_audio"], ga_sum / total_ga, rel_tol=1e-6)
    assert math.isclose(res.weighted_loss, loss_total, rel_tol=1e-6)
    assert res.finite
    worst = 0.0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        worst = max(worst, (p.main_grad - q.grad).abs().max().item())
    assert worst < 1e-6
    # The weights matter: different weights give different gradients.
    ddp.zero_grad_buffer()
    run_group_step(ddp, groups, {"text": 1.0, "audio": 1.0}, sp, gen_audio_weight=0.7)
    ddp.finish_grad_sync()
    assert max((p.main_grad - q.grad).abs().max().item()
               for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters())) > 1e-4
