"""Load once per model-parallel group (megatron_omni/data/mp_broadcast.py), at TP2 x PP2 on gloo.

Only TP rank 0 of each pipeline stage opens a loader; its TP peer receives the batch bit for bit;
the first stage holds tokens and media but no labels, the last labels and loss mask but no media,
both the positions and cu_seqlens. The received values equal a batch built directly. The
trainer / loader hook is not wired yet (see the module docstring).
"""

from __future__ import annotations

import pytest
from dist_utils import run_workers


@pytest.mark.slow
def test_one_reader_per_tp_group_and_identical_batches():
    from workers.mp_broadcast import digest, make_batch  # the worker's own batch builder

    from megatron_omni.data.mp_broadcast import stage_batch

    res = run_workers("mp_broadcast.py", 4, timeout=300)
    by_rank = {r["rank"]: r for r in res}
    assert [by_rank[r]["loaders"] for r in range(4)] == [1, 0, 1, 0]
    for pp in (0, 1):
        a, b = by_rank[2 * pp], by_rank[2 * pp + 1]
        assert a["steps"] == b["steps"]  # the TP peer got exactly the reader's batch
        for step, got in enumerate(a["steps"]):
            want = {k: digest(v) for k, v in stage_batch(make_batch(step), pp, 2).items()}
            assert got == want
    first, last = by_rank[0]["steps"][0], by_rank[2]["steps"][0]
    assert {"tokens", "vision_patches", "audio_waveforms"} <= set(first)
    assert "labels" not in first and "loss_mask" not in first
    assert {"labels", "loss_mask", "position_ids", "cu_seqlens"} <= set(last)
    assert "tokens" not in last and "vision_patches" not in last


def test_stage_keys_without_processes():
    from megatron_omni.data.mp_broadcast import reads_data, stage_keys

    keys = ["tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "vision_patches"]
    assert stage_keys(keys, 0, 1) == keys
    assert stage_keys(keys, 1, 3) == ["position_ids", "cu_seqlens"]
    assert reads_data(0) and not reads_data(1) and not reads_data(0, cp_rank=1)
