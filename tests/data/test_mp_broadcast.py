"""Load once per model-parallel group (megatron_omni/data/mp_broadcast.py), at TP2 x PP2 on gloo.

Only TP rank 0 of the first pipeline stage opens a loader; its TP peer receives the batch bit for
bit (every value, dtype, shape and device kind, nested lists/tuples and plain values included);
the last stage gets everything but the media (labels, masks, positions, cu_seqlens, grids,
counts), equal to the reader's values. A read that fails on the reader raises on every rank
instead of leaving them waiting. The trainer-level wiring is tested in
tests/training/test_load_once.py.
"""

from __future__ import annotations

import pytest
from dist_utils import run_workers


@pytest.mark.slow
def test_one_reader_per_model_parallel_group_and_identical_batches():
    from workers.mp_broadcast import digest, make_batch  # the worker's own batch builder

    from megatron_omni.data.mp_broadcast import FIRST_STAGE_ONLY, stage_batch

    res = run_workers("mp_broadcast.py", 4, timeout=300)
    by_rank = {r["rank"]: r for r in res}
    assert [by_rank[r]["loaders"] for r in range(4)] == [1, 0, 0, 0]
    assert [by_rank[r]["reader"] for r in range(4)] == [True, False, False, False]
    assert {by_rank[r]["src"] for r in range(4)} == {0}
    assert [(by_rank[r]["pp"], by_rank[r]["tp"]) for r in range(4)] == \
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in range(4):
        pp = by_rank[r]["pp"]
        for step, got in enumerate(by_rank[r]["steps"]):
            want = digest(stage_batch(make_batch(step), pp, 2))
            assert got == want, (r, step)
    first, last = by_rank[1]["steps"][0], by_rank[3]["steps"][0]
    assert by_rank[0]["steps"] == by_rank[1]["steps"]  # the TP peer: exactly the reader's batch
    assert by_rank[2]["steps"] == by_rank[3]["steps"]
    assert {"tokens", "vision_patches", "audio_waveforms", "labels", "loss_mask"} <= set(first)
    assert not set(FIRST_STAGE_ONLY) & set(last)
    assert {"labels", "loss_mask", "position_ids", "cu_seqlens", "tokens",
            "audio_lengths", "vision_grid_thw", "skipped"} <= set(last)
    assert all(by_rank[r]["shared"] == {"state": [1, 2]} for r in range(4))
    assert by_rank[0]["failed"] == "ValueError: damaged shard"
    for r in (1, 2, 3):
        assert "data-reading rank 0" in by_rank[r]["failed"]
        assert "damaged shard" in by_rank[r]["failed"]


def test_stage_keys_without_processes():
    from megatron_omni.data.mp_broadcast import reads_data, stage_keys

    keys = ["tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "vision_patches"]
    assert stage_keys(keys, 0, 1) == keys
    assert stage_keys(keys, 1, 3) == keys[:5]  # every stage: all but the media
    assert stage_keys(keys, 2, 3) == keys[:5]
    assert reads_data(0) and not reads_data(1) and not reads_data(0, cp_rank=1)
    assert not reads_data(0, pp_rank=1)
