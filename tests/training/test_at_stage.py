"""The alignment stage end to end on Energon shards of the synthetic dataset (2 gloo ranks):
an instruction stage, then AT (LoRA + DPO + 0.3 x SFT, preference pairs mixed 1 : 1) from its
checkpoint at TP=2 and at PP=2; exact resume inside AT; only the adapters change; the export
merges them into weights whose logits equal the adapted model's."""

import json
from pathlib import Path

import pytest
from dist_utils import run_workers, tiny_run_overrides
from tiny_data import prepare_tiny_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_dataset(
        tmp_path_factory.mktemp("at"), 10, seed=4, num_val_per_modality=5, preference=True,
        splits={m: ("train", "val") for m in ("text", "image", "preference")}, media_root=True)


def common(data, save, *extra):
    return tiny_run_overrides(data, save, "[text,image]", "training.lr=3e-3",
                              "training.lr_warmup_iters=1", *extra)


def at(data, save, init, *extra):
    return common(data, save, "stage.name=at", f"stage.init_from={init}",
                  "stage.train_llm=false", "stage.train_vision=false",
                  "stage.train_audio=false", "stage.train_projectors=false",
                  "stage.val_micro_batches=2", "alignment.lora_rank=4",
                  "alignment.lora_alpha=8", "alignment.dpo_beta=0.5", *extra)


def history(save):
    return [json.loads(line) for line in (Path(save) / "losses.jsonl").read_text().splitlines()]


def test_at_stage_end_to_end(data, tmp_path):
    tp2 = "parallel.tensor_model_parallel_size=2"
    it = tmp_path / "it3"
    run_workers("trainer_run.py", 2, common(data, it, tp2, "training.train_iters=2"))

    straight = tmp_path / "at_straight"
    res = run_workers("trainer_run.py", 2, at(data, straight, it, tp2, "training.train_iters=4"))
    h = history(straight)
    assert [r["step"] for r in h] == [1, 2, 3, 4]
    assert {"text", "image", "dpo"} <= set(h[0]["losses"])
    summary = json.loads((straight / "summary.json").read_text())
    ev = summary["preference_eval"]
    assert set(ev["start"]) >= {"dpo/loss", "dpo/accuracy", "dpo/reward_margin"}
    # Step 0: adapters are zero, policy == reference: every reward is 0, loss log 2.
    assert ev["start"]["dpo/reward_margin"] == 0.0
    assert abs(ev["start"]["dpo/loss"] - 0.6931471805599453) < 1e-6
    assert ev["end"]["dpo/reward_margin"] != 0.0
    assert res["last_step"] == 4

    # Exact resume inside AT: 2 steps, stop, resume to 4 == 4 straight steps, bitwise.
    resumed = tmp_path / "at_resumed"
    first = run_workers("trainer_run.py", 2, at(data, resumed, it, tp2, "training.train_iters=4",
                                               "training.exit_interval=2"))
    assert first["last_step"] == 2
    second = run_workers("trainer_run.py", 2, at(data, resumed, it, tp2,
                                                "training.train_iters=4"))
    assert second["steps_done"] == 2 and second["last_step"] == 4
    for ra, rb in zip(h, history(resumed)):
        assert ra["losses"] == rb["losses"] and ra["lr"] == rb["lr"], (ra, rb)

    # The same AT start at PP=2 (same data: DP=1 in both): first-step losses agree.
    pp = tmp_path / "at_pp2"
    run_workers("trainer_run.py", 2, at(data, pp, it, "parallel.pipeline_model_parallel_size=2",
                                        "training.train_iters=4", "training.exit_interval=1"))
    for k, v in h[0]["losses"].items():
        assert abs(history(pp)[0]["losses"][k] - v) < 1e-4, k

    # Only adapters changed; the export merges them.
    out = run_workers("at_check.py", 1, [str(it), str(straight), str(tmp_path / "release"), "--",
                                         *at(data, tmp_path / "unused", it)])
    assert out["equal"] == {"llm": True, "vision": True, "audio": True, "projectors": True}, out
    assert out["adapter_b_max"] > 0 and out["adapters"] == 2 * 4 * 2
    assert out["base_vs_adapted"] > 1e-4
    assert out["merged_vs_adapted"] < 1e-5, out
    assert out["lora_merged"] == 4 * 2
    assert out["release_q_proj_diff"] < 1e-6, out
