"""The AT step (LoRA + DPO + SFT) at TP2, PP2, TP2+SP, TP2xPP2 and DP4 equals TP=PP=1 in the DPO
metrics, the SFT loss and every adapter gradient (4 gloo ranks, one worker group)."""

import pytest
from dist_utils import run_workers

pytestmark = pytest.mark.slow


def test_at_step_parallel_layouts_match_single_rank():
    r = run_workers("lora_parallel.py", 4)
    assert r["ref_adapter_grad_max"] > 1e-4  # the comparison is not between zeros
    assert 0.0 < r["reference"]["loss"] < 10.0
    for layout in ("dp4", "tp2_dp2", "tp2_sp_dp2", "pp2_dp2", "tp2_pp2"):
        d = r[layout]
        assert d["adapters_checked"] > 0, layout
        for k in ("dpo_loss", "reward_chosen", "reward_rejected", "sft"):
            assert d[k] < 2e-5, (layout, k, d)
        assert d["accuracy"] < 1e-9, (layout, d)
        assert d["adapter_grads"] < 2e-6, (layout, d)
