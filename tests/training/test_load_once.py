"""Load and decode once per model-parallel group, wired into the real trainer (TP2 x PP2, 4 gloo
ranks, Energon data, dynamic balance with validation segments, pure text mixed in, one loader
worker process per loader): only the first stage's TP rank 0 builds loaders and runs worker
processes; both ranks of a TP group draw identical batches, the later stage the same batches
without the media; the losses equal the run where every rank reads (bitwise), skip counts agree
on every rank, and a load-once run stopped at step 2 and resumed ends bitwise like the
uninterrupted one. With deferred decoding (images/videos decoded in the training process) only
the reader decodes, before the broadcast, and the losses are those of worker decoding."""

import json

import pytest
from dist_utils import run_workers, tiny_run_overrides
from tiny_data import prepare_tiny_dataset

from megatron_omni.data.mp_broadcast import FIRST_STAGE_ONLY

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    base = tmp_path_factory.mktemp("load_once")
    data = prepare_tiny_dataset(base, 8, seed=5, num_val_per_modality=2)
    over = tiny_run_overrides(data, "UNUSED", "[text,image,audio]", "data.pure_text_ratio=0.3",
                              "data.num_workers=1", "training.lr=3e-3",
                              "training.lr_warmup_iters=1", f"training.train_iters={STEPS}",
                              "stage.balance=dynamic", "stage.balance_window=2",
                              "stage.balance_interval=2", "stage.val_micro_batches=1",
                              "stage.balance_scale=3.0", "parallel.tensor_model_parallel_size=2",
                              "parallel.pipeline_model_parallel_size=2")
    over = [o for o in over if not o.startswith("training.save=")]
    runs = [["off", "off", ["data.load_once_per_mp_group=false"]], ["on", "on", []],
            ["part", "part", ["training.exit_interval=2"]], ["part_resumed", "part", []],
            ["deferred", "deferred", ["data.media_backend=deferred", "training.exit_interval=2"]]]
    return run_workers("trainer_runs.py", 4, [str(base / "runs"), json.dumps(runs), *over],
                       timeout=900)


def by_rank(reports):
    return {r["rank"]: r for r in reports}


def test_only_the_reader_opens_loaders_and_runs_workers(result):
    off, on = by_rank(result["off"]), by_rank(result["on"])
    assert [(on[r]["pp"], on[r]["tp"]) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [off[r]["loaders"] for r in range(4)] == [1, 1, 1, 1]
    assert [on[r]["loaders"] for r in range(4)] == [1, 0, 0, 0]
    assert [on[r]["reads"] for r in range(4)] == [True, False, False, False]
    assert all(off[r]["workers"] > 0 for r in range(4))
    assert on[0]["workers"] == off[0]["workers"] > 0
    assert [on[r]["workers"] for r in (1, 2, 3)] == [0, 0, 0]


def test_identical_batches_in_a_tp_group_and_as_read_by_every_rank(result):
    off, on = by_rank(result["off"]), by_rank(result["on"])
    assert on[0]["batches"] == on[1]["batches"] == off[0]["batches"] == off[1]["batches"]
    assert on[2]["batches"] == on[3]["batches"]
    n = len(off[0]["batches"])
    assert n > STEPS and len(on[2]["batches"]) == n
    for full, later, own in zip(off[0]["batches"], on[2]["batches"], off[2]["batches"]):
        assert later == {k: v for k, v in full.items() if k not in FIRST_STAGE_ONLY}
        assert later == {k: v for k, v in own.items() if k not in FIRST_STAGE_ONLY}
        assert set(full) - set(later) == set(FIRST_STAGE_ONLY) & set(full)
    assert {"vision_patches", "audio_waveforms"} <= set(off[0]["batches"][0])


def test_losses_and_skip_counts_equal_every_rank_reading(result):
    off, on = by_rank(result["off"]), by_rank(result["on"])
    assert len(on[3]["history"]) == STEPS
    for r in range(4):
        assert on[r]["history"] == off[r]["history"] == off[3]["history"]  # bitwise floats
        assert on[r]["skipped"] == off[r]["skipped"] == off[0]["skipped"]


def test_resume_is_exact(result):
    on, part, resumed = (by_rank(result[k]) for k in ("on", "part", "part_resumed"))
    assert part[3]["last_step"] == 2 and resumed[3]["last_step"] == STEPS
    assert [resumed[r]["loaders"] for r in range(4)] == [1, 0, 0, 0]
    for r in range(4):
        assert part[r]["history"] + resumed[r]["history"] == on[r]["history"]
    assert resumed[0]["batches"] == on[0]["batches"][len(part[0]["batches"]):]


def test_deferred_decoding_runs_on_the_reader_only(result):
    on, deferred = by_rank(result["on"]), by_rank(result["deferred"])
    assert [deferred[r]["decoder"] for r in range(4)] == [True, False, False, False]
    assert [deferred[r]["loaders"] for r in range(4)] == [1, 0, 0, 0]
    for r in range(4):
        assert deferred[r]["history"] == on[r]["history"][:2]  # bitwise: same pixels
