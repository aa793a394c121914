"""The real training loop end to end on Energon shards of the synthetic omni dataset (2 gloo
ranks): exact resume at TP=2 and PP=2 with loader and balancer state, step-balance calibration,
stage chaining with frozen parts."""

import json
import math
from pathlib import Path

import pytest
from dist_utils import run_workers, tiny_run_overrides
from tiny_data import prepare_tiny_dataset

pytestmark = pytest.mark.slow
MODALITIES = "[text,image,audio]"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_dataset(tmp_path_factory.mktemp("trainer"), 12, seed=3,
                                num_val_per_modality=4)


def overrides(data, save, *extra):
    return tiny_run_overrides(data, save, MODALITIES, "data.pure_text_ratio=0.3",
                              "training.lr=3e-3", "training.lr_warmup_iters=2", *extra)


def history(save):
    return [json.loads(line) for line in (Path(save) / "losses.jsonl").read_text().splitlines()]


def dynamic(steps):
    return ["stage.balance=dynamic", "stage.balance_window=2", "stage.balance_interval=2",
            "stage.val_micro_batches=1", "stage.balance_scale=3.0",
            f"training.train_iters={steps}"]


@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=2"],
                                    ["parallel.pipeline_model_parallel_size=2"]],
                         ids=["tp2", "pp2"])
def test_exact_resume_with_loader_and_balancer_state(data, tmp_path, layout):
    straight = tmp_path / "straight"
    run_workers("trainer_run.py", 2, overrides(data, straight, *layout, *dynamic(6)))
    resumed = tmp_path / "resumed"
    first = run_workers("trainer_run.py", 2, overrides(data, resumed, *layout, *dynamic(6),
                                                       "training.exit_interval=3"))
    assert first["last_step"] == 3
    second = run_workers("trainer_run.py", 2, overrides(data, resumed, *layout, *dynamic(6)))
    assert second["steps_done"] == 3 and second["last_step"] == 6
    a, b = history(straight), history(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["losses"] == rb["losses"], (ra, rb)  # bitwise: same floats
        assert ra["weights"] == rb["weights"] and ra["lr"] == rb["lr"]
        assert ra.get("val") == rb.get("val")
    # The validation losses of the balance updates (every 2 steps) are in the history too.
    assert [r["step"] for r in a if "val" in r] == [2, 4, 6]
    assert set(a[1]["val"]) == {"text", "image", "audio"}
    # The dynamic balancer really moved (so its restored state mattered).
    assert any(w != 1.0 for w in a[-1]["weights"].values())


def test_calibration_then_step_balanced_stage_then_frozen_stage(data, tmp_path):
    weights_file = tmp_path / "balance.json"
    cal = run_workers("trainer_run.py", 2, overrides(
        data, tmp_path / "cal", "parallel.tensor_model_parallel_size=2",
        "stage.calibration_max_steps=12", "stage.plateau_window=2", "stage.plateau_rel_tol=0.01",
        f"--calibrate={weights_file}"))
    saved = json.loads(weights_file.read_text())
    assert set(saved["weights"]) == {"text", "image", "audio"}
    assert abs(sum(saved["weights"].values()) - 10.0) < 1e-6
    assert cal["weights"] == pytest.approx(saved["weights"])
    # Each modality really trained alone: L* is well below the loss of the random model (ln V).
    for m, loss in saved["converged_losses"].items():
        assert loss < math.log(data["vocab"]) - 0.2, (m, loss)
    # PT-3-like stage with those weights.
    pt3 = tmp_path / "pt3"
    res = run_workers("trainer_run.py", 2, overrides(
        data, pt3, "parallel.tensor_model_parallel_size=2", "stage.balance=step",
        f"stage.step_balance_file={weights_file}", "training.train_iters=4"))
    assert res["weights"] == pytest.approx(saved["weights"])
    assert history(pt3)[0]["weights"] == pytest.approx(saved["weights"])
    # A next stage started from that checkpoint, at another layout (PP=2): with no steps its
    # checkpoint equals PT-3's in every part (all weights were loaded) ...
    nxt0 = tmp_path / "next0"
    run_workers("trainer_run.py", 2, overrides(
        data, nxt0, "parallel.pipeline_model_parallel_size=2", f"stage.init_from={pt3}",
        "training.train_iters=0", "training.lr_warmup_iters=0"))
    base = overrides(data, tmp_path / "unused")
    out = run_workers("compare_checkpoints.py", 1, [str(pt3), str(nxt0), "--", *base])
    assert all(out["equal"].values()) and set(out["equal"]) == {"llm", "vision", "audio",
                                                               "projectors"}, out
    # ... and training only the projectors keeps every frozen weight exactly.
    nxt = tmp_path / "next"
    run_workers("trainer_run.py", 2, overrides(
        data, nxt, "parallel.pipeline_model_parallel_size=2", f"stage.init_from={pt3}",
        "stage.train_llm=false", "stage.train_vision=false", "stage.train_audio=false",
        "training.train_iters=2", "training.lr_warmup_iters=0"))
    out = run_workers("compare_checkpoints.py", 1, [str(pt3), str(nxt), "--", *base])
    assert out["equal"] == {"llm": True, "vision": True, "audio": True, "projectors": False}, out
