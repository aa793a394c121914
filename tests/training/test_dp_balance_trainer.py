"""Encoder-aware balance across data-parallel ranks in the real trainer (``data.dp_balance:
cost``; 2 gloo ranks at DP2, Energon data, three modality groups of 2 micro-batches, pure text
mixed in): micro-batches really move between the ranks, each step trains on exactly the rows of
the unbalanced run (only their rank changes), the per-rank step cost is never more uneven than
without balancing and more even on some step, the losses stay those of the unbalanced run (same
rows and token counts, DP sums in another order), and a balanced run stopped at step 2 and
resumed ends bitwise like the uninterrupted one."""

import json
import math

import pytest
from dist_utils import run_workers, tiny_run_overrides
from tiny_data import prepare_tiny_dataset

from megatron_omni.data.dp_balance import imbalance

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    base = tmp_path_factory.mktemp("dp_balance")
    data = prepare_tiny_dataset(base, 10, seed=9, num_val_per_modality=0,
                                splits={m: ("train",) for m in ("text", "image", "audio")})
    over = tiny_run_overrides(data, "UNUSED", "[text,image,audio]", "data.pure_text_ratio=0.3",
                              "training.lr=3e-3", "training.lr_warmup_iters=1",
                              "training.num_micro_batches=2", f"training.train_iters={STEPS}")
    over = [o for o in over if not o.startswith("training.save=")]
    cost = ["data.dp_balance=cost", "data.dp_balance_target=1.0"]
    runs = [["none", "none", []], ["cost", "cost", cost],
            ["part", "part", [*cost, "training.exit_interval=2"]], ["resumed", "part", cost]]
    return run_workers("trainer_runs.py", 2, [str(base / "runs"), json.dumps(runs), *over],
                       timeout=900)


def test_rows_move_and_steps_get_more_even(result):
    none, cost = result["none"], result["cost"]
    assert [r["dp"] for r in cost] == [0, 1]
    assert sum(r["moved"] for r in cost) > 0 and sum(r["moved"] for r in none) == 0
    for step in range(STEPS):
        rows = {}
        for name, reps in (("none", none), ("cost", cost)):
            got = []
            for r in reps:
                for m, keys in r["names"][3 * step:3 * step + 3]:
                    got += [(m, tuple(k)) for k in keys]
            rows[name] = sorted(got)
        assert rows["none"] == rows["cost"]  # the same rows in the step, same groups
    before = [imbalance([r["costs"][s] for r in none]) for s in range(STEPS)]
    after = [imbalance([r["costs"][s] for r in cost]) for s in range(STEPS)]
    print(f"\nper-rank step cost max/mean: {before} unbalanced, {after} balanced")
    assert all(a <= b + 1e-12 for a, b in zip(after, before)), (before, after)
    assert any(a < b for a, b in zip(after, before)), (before, after)


def test_losses_stay_those_of_the_unbalanced_run(result):
    none, cost = result["none"][0]["history"], result["cost"][0]["history"]
    assert len(none) == len(cost) == STEPS
    assert result["cost"][0]["history"] == result["cost"][1]["history"]
    for a, b in zip(none, cost):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-4), (k, a[k], b[k])
    assert none[0] != none[-1]  # it trains


def test_balanced_resume_is_exact(result):
    cost, part, resumed = result["cost"], result["part"], result["resumed"]
    assert part[0]["last_step"] == 2 and resumed[0]["last_step"] == STEPS
    for r in range(2):
        assert part[r]["history"] + resumed[r]["history"] == cost[r]["history"]
        assert part[r]["batches"] + resumed[r]["batches"] == cost[r]["batches"]
