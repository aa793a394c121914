"""Encoder-aware balance of packed rows across DP ranks (megatron_omni/data/dp_balance.py).

* the cost model against the FLOP formulas it is derived from (a row by hand);
* on a fixed seed of the realistic mix, the token-only assignment (rank r takes the r-th slice
  of the step's rows) is worse than max/mean 1.05 and the balanced one is within it;
* every sample is used exactly once (emitted, still pending, or skipped by the packer);
* resuming from ``state_dict`` at a step boundary continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import pytest

from megatron_omni.config import load_config
from megatron_omni.data.dp_balance import (
    BalancedSteps,
    CostModel,
    balance_step,
    contiguous_step,
    imbalance,
)
from megatron_omni.data.packing import PackingConfig, SampleInfo, pack_samples, realistic_mix
from megatron_omni.plan import load_model_config
from megatron_omni.training.flops import llm_forward_flops, sanm_forward_flops, vit_forward_flops


@pytest.fixture(scope="module")
def cost9b():
    return CostModel.from_config(load_model_config("9b"), 8192)


def test_cost_model_matches_the_flop_formulas(cost9b):
    m = load_model_config("9b").model
    s = SampleInfo("a", 3000, 2, 32 * 32 + 8 * 16 * 16, "video", (32 * 32,) + (16 * 16,) * 8,
                   (150,))
    other = SampleInfo("b", 1000, 0, 0, "text")
    row = pack_samples([s, other], PackingConfig(8192)).rows[0]
    out = m.vision.merger_hidden_size or m.llm.hidden_size
    want = 3 * (llm_forward_flops(m.llm, [3000, 1000, 8192 - 4000]).total
                - llm_forward_flops(m.llm, [8192 - 4000], lm_head=False).layers_attention
                + vit_forward_flops(m.vision, [(1, 32, 32), (8, 16, 16)], out).total
                + sanm_forward_flops(m.audio, [150]).total)
    got = cost9b.row_cost(row, {"a": s, "b": other})
    assert got == pytest.approx(want, rel=1e-9)


def test_balance_step_deals_exactly_and_evens_loads():
    costs = [10, 1, 1, 1, 9, 2, 3, 3]
    plan = balance_step(costs, 4, 2)
    used = sorted(i for rank in plan for mb in rank for i in mb)
    assert used == list(range(8))
    assert all(len(rank) == 2 and all(len(mb) == 1 for mb in rank) for rank in plan)
    loads = [sum(costs[i] for mb in rank for i in mb) for rank in plan]
    assert max(loads) == 11  # 10+1, 9+2, ... the best possible (sum 30 over 4 ranks)
    # micro-batches of 2 rows inside a rank are balanced too
    plan2 = balance_step([5, 4, 3, 2, 2, 1, 1, 0], 1, 4, 2)
    mbs = [sum([5, 4, 3, 2, 2, 1, 1, 0][i] for i in mb) for mb in plan2[0]]
    assert max(mbs) - min(mbs) <= 1
    assert balance_step(costs, 4, 2) == plan  # deterministic
    with pytest.raises(ValueError, match="needs 6 rows"):
        balance_step(costs, 3, 2)
    assert contiguous_step(8, 4, 2) == [[[0], [1]], [[2], [3]], [[4], [5]], [[6], [7]]]


def _run(samples, cost, balance, ranks=16, micro_batches=2, state_at=None):
    cfg = PackingConfig(8192, 16, 32768, truncate_text=True)
    bs = BalancedSteps(samples, cfg, cost, ranks, micro_batches, buffer_size=512, balance=balance)
    steps, state = [], None
    while (st := bs.next_step()) is not None:
        steps.append(st)
        if state_at is not None and len(steps) == state_at:
            state = bs.state_dict()
    return bs, steps, state


def _ids(steps):
    return [[[r.sample_ids for r in mb] for mb in rank] for st in steps for rank in st]


def test_balanced_beats_token_only_on_a_fixed_seed(cost9b):
    samples = realistic_mix(3000, seed=7)
    infos = {s.id: s for s in samples}

    def worst(steps):
        return max(imbalance([sum(cost9b.row_cost(r, infos) for mb in rank for r in mb)
                              for rank in st]) for st in steps)

    _, plain, _ = _run(samples, cost9b, False)
    bs, bal, _ = _run(samples, cost9b, True)
    print(f"\nmax/mean per step, worst: token-only {worst(plain):.3f}, balanced {worst(bal):.3f}")
    assert worst(plain) > 1.05
    assert worst(bal) <= 1.05
    assert len(bal) == len(plain) >= 5
    # rows are the packer's: same token efficiency
    assert bs.stats.efficiency >= 0.99

    # every sample exactly once: in a step, still pending, or skipped by the packer
    used = [i for st in bal for rank in st for mb in rank for r in mb for i in r.sample_ids]
    pending = [i for _, _, r, _ in bs._pending for i in r.sample_ids]
    skipped = [i for i, _ in bs.skipped]
    assert len(used) == len(set(used))
    assert sorted(used + pending + skipped) == sorted(infos)


def test_resume_is_exact(cost9b):
    samples = realistic_mix(3000, seed=3)
    _, full, _ = _run(samples, cost9b, True)
    first, _, state = _run(samples, cost9b, True, state_at=3)
    cfg = PackingConfig(8192, 16, 32768, truncate_text=True)
    again = BalancedSteps(samples, cfg, cost9b, 16, 2, buffer_size=512)
    again.load_state_dict(state)
    rest = []
    while (st := again.next_step()) is not None:
        rest.append(st)
    assert _ids(full[3:]) == _ids(rest)
    assert len(rest) == len(full) - 3 > 0


def test_cost_model_needs_a_sequence_length():
    with pytest.raises(ValueError, match="seq_length"):
        CostModel.from_config(load_config("examples/tiny_llm.yaml").model)


# ------------------------------------------------------------------ the wired path: RowExchange


def test_batch_cost_of_a_loader_batch_equals_the_row_cost(cost9b):
    import torch

    s = SampleInfo("a", 3000, 2, 32 * 32 + 8 * 16 * 16, "video", (32 * 32,) + (16 * 16,) * 8,
                   (150,))
    other = SampleInfo("b", 1000, 0, 0, "text")
    row = pack_samples([s, other], PackingConfig(8192)).rows[0]
    batch = {"tokens": torch.zeros(1, 8192, dtype=torch.long),
             "num_tokens": torch.tensor([4000]),
             "cu_seqlens": torch.tensor([0, 3000, 4000, 8192], dtype=torch.int32),
             "vision_grid_thw": torch.tensor([[1, 32, 32], [8, 16, 16]]),
             "audio_lengths": torch.tensor([150 * 960 + 17])}
    want = cost9b.row_cost(row, {"a": s, "b": other})
    assert cost9b.batch_cost(batch) == pytest.approx(want, rel=1e-12)
    # two rows in one micro-batch: the sum of both (the second row's padding left out too)
    two = dict(batch, tokens=torch.zeros(2, 8192, dtype=torch.long),
               num_tokens=torch.tensor([4000, 4000]),
               cu_seqlens=torch.tensor([0, 3000, 4000, 8192, 11192, 12192, 16384],
                                       dtype=torch.int32),
               vision_grid_thw=torch.tensor([[1, 32, 32], [8, 16, 16]] * 2),
               audio_lengths=torch.tensor([150 * 960] * 2))
    assert cost9b.batch_cost(two) == pytest.approx(2 * want, rel=1e-12)


def _rank_streams(samples, dp, cfg, buffer_size=512):
    """What Energon + the packer give: rank r packs its own slice, chunk by chunk."""
    out = []
    for r in range(dp):
        mine, rows = samples[r::dp], []
        for a in range(0, len(mine), buffer_size):
            rows += pack_samples(mine[a:a + buffer_size], cfg).rows
        out.append(rows)
    return out


def test_swaps_balance_what_the_ranks_packed_on_a_fixed_seed(cost9b):
    from megatron_omni.data.dp_balance import apply_swaps, swap_plan

    cfg = PackingConfig(8192, 16, 32768, truncate_text=True)
    samples = realistic_mix(4000, seed=5)
    infos = {s.id: s for s in samples}
    dp, per = 8, 8
    streams = _rank_streams(samples, dp, cfg)
    steps = min(len(x) for x in streams) // per
    assert steps >= 5
    worst_before = worst_after = 0.0
    moved = 0
    for st in range(steps):
        rows = [x[st * per:(st + 1) * per] for x in streams]
        groups = [["a", "b"] * (per // 2)] * dp  # two modality groups, alternating slots
        costs = [[cost9b.row_cost(r, infos) for r in rank] for rank in rows]
        plan = swap_plan(costs, groups, target=1.01)
        assert plan == swap_plan(costs, groups, target=1.01)  # every rank plans the same
        after = apply_swaps(rows, plan)
        # every row exactly once, every slot keeps its group, rows themselves unchanged
        assert sorted(id(r) for x in after for r in x) == sorted(id(r) for x in rows for r in x)
        place = {id(r): k for x in rows for k, r in enumerate(x)}
        assert all(groups[0][k] == groups[0][place[id(r)]] for x in after for k, r in
                   enumerate(x))
        moved += sum(a is not b for x, y in zip(rows, after) for a, b in zip(x, y))
        worst_before = max(worst_before, imbalance([sum(c) for c in costs]))
        worst_after = max(worst_after, imbalance(
            [sum(cost9b.row_cost(r, infos) for r in x) for x in after]))
    print(f"\nworst step max/mean: token-only {worst_before:.3f}, swapped {worst_after:.3f}, "
          f"{moved / (steps * dp * per):.1%} of the rows moved")
    assert worst_before > 1.05
    assert worst_after <= 1.05
    assert moved < steps * dp * per / 2  # only what pays moves
