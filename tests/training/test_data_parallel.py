"""The real trainer at several data-parallel sizes (gloo ranks, Energon data): each DP rank reads
its own slice (disjoint sample keys whose union is what a DP=1 run reads, also at TP=2 x DP=2,
where both TP ranks of a DP rank read the same samples), and a resume at another DP size is
refused with what to do instead of silently restarting the data stream (DP2 -> DP1, DP1 -> DP2),
unless training.on_dp_change=restart_data accepts the restart."""

import json
from collections import defaultdict
from pathlib import Path

import pytest
from dist_utils import run_workers, tiny_run_overrides
from tiny_data import prepare_tiny_dataset

from megatron_omni.training.ckpt_integrity import verify_checkpoint

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = prepare_tiny_dataset(tmp_path_factory.mktemp("dp"), 8, seed=7, num_val_per_modality=2,
                             splits={"text": ("train",), "audio": ("train",)})
    d["written"] = {m: d["report"].stats[m]["train"].written for m in ("text", "audio")}
    return d


def overrides(data, save, *extra):
    return tiny_run_overrides(data, save, "[text,audio]", "training.lr=1e-3",
                              f"training.train_iters={STEPS}", *extra, vision=False,
                              buffers=(3, 2))


def read_keys(keys_dir: Path) -> dict[int, dict]:
    out = {}
    for f in keys_dir.glob("rank*.json"):
        out[int(f.stem[4:])] = json.loads(f.read_text())
    return out


def keys_by_modality(rows) -> dict[str, set]:
    got = defaultdict(set)
    for modality, keys in rows:
        got[modality].update(keys)
    return got


def run_with_keys(data, tmp_path, name, world, *extra):
    keys = tmp_path / f"keys_{name}"
    keys.mkdir()
    run_workers("trainer_run.py", world, overrides(data, tmp_path / name, *extra) +
                [f"--keys={keys}"])
    return read_keys(keys)


@pytest.fixture(scope="module")
def dp1(data, tmp_path_factory):
    """A DP=1 run: what every layout must read in total (and a DP=1 checkpoint)."""
    base = tmp_path_factory.mktemp("dp1")
    keys = run_with_keys(data, base, "dp1", 1)
    return {"read": keys_by_modality(keys[0]["read"]), "save": base / "dp1"}


def test_dp_ranks_read_disjoint_slices_and_resize_is_refused(data, dp1, tmp_path):
    dp2 = run_with_keys(data, tmp_path, "dp2", 2)
    one = dp1["read"]
    # STEPS steps cover more than an epoch of the small dataset: every training sample.
    assert {m: len(k) for m, k in one.items()} == data["written"]
    assert sorted(r["dp_rank"] for r in dp2.values()) == [0, 1]
    # Both ranks' checkpoint files carry the checksums their ranks computed, and verify.
    step = tmp_path / "dp2" / f"step_{STEPS:08d}"
    files = json.loads((step / "complete.json").read_text())["files"]
    assert {"rank_state/rank_00000.json", "rank_state/rank_00001.json"} <= set(files)
    assert any(f.startswith("__1_") for f in files) and any(f.startswith("__0_") for f in files)
    assert verify_checkpoint(step) == []
    a, b = (keys_by_modality(dp2[r]["read"]) for r in (0, 1))
    for m in one:
        assert a[m] and b[m] and not (a[m] & b[m]), (m, a[m] & b[m])  # disjoint slices
        assert a[m] | b[m] == one[m], m  # together: what DP=1 reads

    # Resume at another DP size: refused with the way forward, nothing trained or saved.
    for save, world in ((tmp_path / "dp2", 1), (dp1["save"], 2)):
        before = sorted(p.name for p in save.iterdir())
        with pytest.raises(AssertionError) as e:
            run_workers("trainer_run.py", world, overrides(
                data, save, f"training.train_iters={STEPS + 2}"))
        msg = str(e.value)
        assert f"saved at data-parallel size {3 - world}; this run has {world}" in msg, msg[-3000:]
        assert "training.on_dp_change=restart_data" in msg and f"DP={3 - world}" in msg
        assert sorted(p.name for p in save.iterdir()) == before
    # ... unless the restart of the data stream is accepted explicitly.
    res = run_workers("trainer_run.py", 1, overrides(
        data, tmp_path / "dp2", f"training.train_iters={STEPS + 1}",
        "training.on_dp_change=restart_data"))
    assert res["last_step"] == STEPS + 1 and res["steps_done"] == 1


def test_tp2_dp2_ranks_read_disjoint_slices(data, dp1, tmp_path):
    got = run_with_keys(data, tmp_path, "tp2dp2", 4, "parallel.tensor_model_parallel_size=2")
    one = dp1["read"]
    by_dp = defaultdict(list)
    for r in got.values():
        by_dp[r["dp_rank"]].append(r["read"])
    assert sorted(by_dp) == [0, 1] and all(len(v) == 2 for v in by_dp.values())
    for reads in by_dp.values():
        assert reads[0] == reads[1]  # the TP ranks of one DP rank read the same batches
    a, b = (keys_by_modality(by_dp[d][0]) for d in (0, 1))
    for m in one:
        assert not (a[m] & b[m]) and a[m] | b[m] == one[m], m
