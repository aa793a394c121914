"""LoRA on megatron-core linears and the DPO step, in one process (real computation).

* B = 0: the adapted model's logits and losses equal the base model's bit for bit;
* DPO loss, rewards, accuracy and the adapters' gradients of ``run_at_step`` (packed rows, the
  reference pass with the adapters off inside the step) equal a direct recomputation with two
  independent forward passes per sequence (adapters on / off) and plain autograd;
* a few AT optimizer steps change the adapters and nothing else (every base, encoder and
  projector weight bit-exact).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from omni_batch import omni_batch, tiny_omni_cfg
from pref_batch import pref_row, random_pairs

from megatron_omni.models.omni import OmniModel, special_token_ids
from megatron_omni.training.dpo import run_at_step, segment_logps
from megatron_omni.training.lora import (
    adapters_disabled,
    apply_lora,
    is_lora_param,
    lora_modules,
    trainable_share,
)
from megatron_omni.training.step import model_inputs


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return OmniModel(cfg)


def _randomize_b(model, seed=5, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def test_zero_b_gives_base_logits_bit_exact(single_rank):
    cfg = tiny_omni_cfg()
    base = _model(cfg)
    adapted = _model(cfg)
    adapted.load_state_dict(base.state_dict())
    n = apply_lora([adapted], rank=4, alpha=8.0)
    assert n > 0 and len(lora_modules(adapted)) == 4 * cfg.model.llm.num_layers
    b = omni_batch(cfg, seed=1)
    args, kwargs = model_inputs(b)
    nolab = dict(kwargs, labels=None)
    with torch.no_grad():
        assert torch.equal(adapted(*args, **nolab), base(*args, **nolab))
        assert torch.equal(adapted(*args, **kwargs), base(*args, **kwargs))
        # non-zero B changes the output; disabling the adapters gives the base back exactly
        _randomize_b(adapted)
        assert not torch.equal(adapted(*args, **nolab), base(*args, **nolab))
        with adapters_disabled([adapted]):
            assert torch.equal(adapted(*args, **nolab), base(*args, **nolab))


def test_lora_param_names_and_share(single_rank):
    cfg = tiny_omni_cfg(vision=False, audio=False)
    m = _model(cfg)
    apply_lora([m], rank=2, alpha=4.0, targets=["linear_qkv", "linear_fc2"])
    names = [n for n, p in m.named_parameters() if is_lora_param(n)]
    assert "llm.decoder.layers.0.self_attention.linear_qkv.lora_A.weight" in names
    assert "llm.decoder.layers.3.mlp.linear_fc2.lora_B.weight" in names
    assert not any("linear_proj.lora" in n for n in names)
    share = trainable_share([m])
    expect = sum(p.numel() for n, p in m.named_parameters() if is_lora_param(n))
    assert share["lora"] == expect
    assert share["share"] == pytest.approx(expect / (sum(p.numel() for p in m.parameters())
                                                     - expect))


def _direct(model, seqs, beta):
    """Per sequence, unpacked: log-prob of the answer tokens with adapters on and off."""
    pol, ref = [], []
    for s, a in seqs:
        ids = torch.tensor(s)[None]
        pos = torch.arange(len(s))[None]
        logits = model.llm(ids, pos)  # [1, n, V] (no labels: logits)
        logp = F.log_softmax(logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        pol.append(logp[a - 1:].sum())
        with torch.no_grad(), adapters_disabled([model]):
            logits = model.llm(ids, pos)
            logp = F.log_softmax(logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            ref.append(logp[a - 1:].sum())
    return pol, ref


def test_dpo_step_matches_direct_recomputation(single_rank):
    cfg = tiny_omni_cfg(vision=False, audio=False)
    sp = special_token_ids(cfg)
    m = _model(cfg, seed=2)
    for p in m.parameters():
        p.requires_grad_(False)
    apply_lora([m], rank=4, alpha=8.0, seed=3)
    _randomize_b(m, seed=9, std=0.2)
    direct = _model(cfg, seed=2)
    for p in direct.parameters():
        p.requires_grad_(False)
    apply_lora([direct], rank=4, alpha=8.0, seed=3)
    direct.load_state_dict(m.state_dict())

    beta = 0.5
    rows = [pref_row(random_pairs(s, 3, sp.base_vocab_size), T=64) for s in (11, 12)]
    ddp = DistributedDataParallel(m.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), m)
    ddp.zero_grad_buffer()
    res = run_at_step(ddp, {"preference": [r[0] for r in rows]}, "preference", sp, beta=beta)
    ddp.finish_grad_sync()

    losses, rc, rr = [], [], []
    for _, seqs in rows:
        pol, ref = _direct(direct, seqs, beta)
        for i in range(0, len(seqs), 2):
            c = beta * (pol[i] - ref[i])
            r = beta * (pol[i + 1] - ref[i + 1])
            losses.append(-F.logsigmoid(c - r))
            rc.append(c)
            rr.append(r)
    loss = torch.stack(losses).mean()
    loss.backward()
    n = len(losses)
    assert res.pairs == n == 6
    assert res.metrics["dpo/loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert res.metrics["dpo/reward_chosen"] == pytest.approx(
        sum(x.item() for x in rc) / n, abs=1e-5)
    assert res.metrics["dpo/reward_rejected"] == pytest.approx(
        sum(x.item() for x in rr) / n, abs=1e-5)
    assert res.metrics["dpo/reward_margin"] == pytest.approx(
        sum(a.item() - b.item() for a, b in zip(rc, rr)) / n, abs=1e-5)
    acc = sum(float(a.item() > b.item()) for a, b in zip(rc, rr)) / n
    assert res.metrics["dpo/accuracy"] == pytest.approx(acc)
    assert 0 < res.metrics["dpo/loss"] and math.isfinite(res.metrics["dpo/loss"])
    grads = dict(direct.named_parameters())
    worst, checked = 0.0, 0
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert is_lora_param(name)
            worst = max(worst, (p.main_grad - grads[name].grad).abs().max().item())
            checked += 1
    assert checked == 2 * 4 * cfg.model.llm.num_layers
    assert worst < 1e-6


def test_segment_logps_worked_example():
    per_tok = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]])
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    assert segment_logps(per_tok, mask, cu).tolist() == [-1.0, -7.0, -6.0]


def test_only_adapters_change_over_at_steps(single_rank):
    from megatron_omni.models.omni import set_trainable
    from megatron_omni.training.optimizer import build_optimizer, wrap_ddp

    cfg = tiny_omni_cfg("training.lr=1e-2", "training.lr_warmup_iters=0")
    sp = special_token_ids(cfg)
    m = _model(cfg, seed=4)
    set_trainable(m, vision=False, audio=False, projectors=False, llm=False)
    apply_lora([m], rank=4, alpha=8.0)
    before = {k: v.detach().clone() for k, v in m.state_dict().items()
              if isinstance(v, torch.Tensor)}
    model = wrap_ddp(cfg, [m])
    opt = build_optimizer(cfg, model)
    pref = [pref_row(random_pairs(21, 2, sp.base_vocab_size), T=48)[0]]
    instr = [omni_batch(cfg, seed=7)]
    for _ in range(3):
        model[0].zero_grad_buffer()
        opt.zero_grad()
        res = run_at_step(model, {"preference": pref, "image": instr}, "preference", sp)
        assert res.finite
        opt.step()
    changed, same = [], []
    for k, v in m.state_dict().items():
        if not isinstance(v, torch.Tensor) or k.endswith("_extra_state"):
            continue
        (changed if not torch.equal(v, before[k]) else same).append(k)
    assert changed and all(is_lora_param(k) for k in changed), changed[:5]
    assert any(k.startswith("vision_model.") for k in same)
    assert any(k.startswith("audio_model.") for k in same)
    assert any(k.startswith("linear_proj") for k in same)
    assert any(".lora_B." in k for k in changed)  # B left zero -> it is what moves first
