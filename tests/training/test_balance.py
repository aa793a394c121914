"""Step balance and dynamic adaptive balance (docs/recipe.md sections 3 and 4).

Expected values come from the worked examples in docs/recipe.md or are computed here by hand / with
an independent numpy reference (polyfit for the least-squares slope), never from the code under
test.
"""

import json
import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megatron_omni.training.balance import (
    DynamicBalancer,
    PlateauDetector,
    adaptive_weights,
    all_reduce_mean_losses,
    normalized_slopes,
    read_step_balance_file,
    step_balance_weights,
    write_step_balance_file,
)

REPO = Path(__file__).resolve().parents[2]
EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# independent reference (numpy), written from the formulas in docs/recipe.md section 4


def ref_slope(window, eps=EPS):
    y = np.asarray(window, dtype=np.float64)
    lhat = (y - y.min()) / (y.max() - y.min() + eps)
    return float(np.polyfit(np.arange(len(y)), lhat, 1)[0])


def ref_w(slopes, f):
    a = np.asarray(slopes, dtype=np.float64)
    m = len(a)
    a_tilde = m * a / np.abs(a).sum()
    p = np.exp(a_tilde) / np.exp(a_tilde).sum()
    s = p * (-a_tilde)
    q = np.exp(f * s) / np.exp(f * s).sum()
    return m * q


def segments(n, mods=("text", "image", "video")):
    """Deterministic per-modality validation losses with different curve shapes."""
    curves = {
        "text": lambda t: 2.0 - 0.1 * t + 0.15 * math.sin(1.3 * t),  # falling, noisy
        "image": lambda t: 1.0 + 2.0 * math.exp(-0.6 * t),           # fast, then plateau
        "audio": lambda t: 3.0 - 0.05 * t,                           # steady linear fall
        "video": lambda t: 1.5 + 0.02 * t + 0.01 * math.cos(t),      # slowly rising
    }
    return [{m: curves[m](t) for m in mods} for t in range(n)]


# ---------------------------------------------------------------------------------------------
# dynamic adaptive balance: the formula


def test_worked_example_from_spec():
    slopes = [-0.1, -0.05, -0.01, -0.2]
    expected = [1.06, 1.03, 0.92, 0.99]  # docs/recipe.md section 4, rounded, before EMA
    # By hand: sum|a| = 0.36, a_tilde = 4 a / 0.36
    a_tilde = [4 * a / 0.36 for a in slopes]
    assert a_tilde == pytest.approx([-1.1111, -0.5556, -0.1111, -2.2222], abs=1e-4)
    ex = [math.exp(x) for x in a_tilde]
    p = [e / sum(ex) for e in ex]
    s = [pi * -x for pi, x in zip(p, a_tilde)]
    assert s == pytest.approx([0.1919, 0.1672, 0.0522, 0.1264], abs=1e-3)
    es = [math.exp(x) for x in s]
    hand = [4 * e / sum(es) for e in es]
    assert hand == pytest.approx(expected, abs=0.01)

    w = adaptive_weights(slopes, 1.0)
    assert w == pytest.approx(expected, abs=0.01)
    assert w == pytest.approx(hand, abs=1e-12)
    assert sum(w) == pytest.approx(4.0, abs=1e-12)
    wd = adaptive_weights(dict(zip(["text", "image", "audio", "video"], slopes)), 1.0)
    assert list(wd) == ["text", "image", "audio", "video"]
    assert list(wd.values()) == pytest.approx(hand, abs=1e-12)


def test_scale_factor_sharpens_and_zero_scale_is_uniform():
    slopes = [-0.1, -0.05, -0.01, -0.2]
    assert adaptive_weights(slopes, 0.0) == pytest.approx([1.0] * 4, abs=1e-12)
    w1, w5 = adaptive_weights(slopes, 1.0), adaptive_weights(slopes, 5.0)
    assert w5 == pytest.approx(list(ref_w(slopes, 5.0)), abs=1e-12)
    assert max(w5) - min(w5) > max(w1) - min(w1)


def test_all_flat_slopes_give_none():
    assert adaptive_weights([0.0, 0.0, 0.0], 2.0) is None


def test_normalized_slopes_by_hand_and_vs_polyfit():
    # Linear window 5,4,3,2,1: Lhat = (L-1)/(4+eps) -> slope -1/(4+eps).
    s = normalized_slopes([[5, 4, 3, 2, 1]])
    assert s[0] == pytest.approx(-1 / (4 + EPS), rel=1e-12)
    # Drop then plateau [3,1,1,1,1] -> Lhat ~ [1,0,0,0,0]: slope = -2/10 (x - xbar = -2..2).
    assert normalized_slopes({"a": [3, 1, 1, 1, 1]})["a"] == pytest.approx(-0.2, rel=1e-6)
    # Constant window: slope exactly 0.
    assert normalized_slopes([[2.5] * 6]) == [0.0]
    rng = random.Random(3)
    for _ in range(5):
        win = [rng.uniform(0.5, 3.0) for _ in range(7)]
        assert normalized_slopes([win])[0] == pytest.approx(ref_slope(win), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# dynamic adaptive balance: the balancer


def test_warmup_then_ema():
    H = 4
    segs = segments(6)
    b = DynamicBalancer(["text", "image", "video"], window=H, scale=2.0)
    assert b.weights == {"text": 1.0, "image": 1.0, "video": 1.0}
    for t in range(H - 1):  # fewer than H segments seen: exactly 1, no EMA step
        assert b.update(segs[t]) == {"text": 1.0, "image": 1.0, "video": 1.0}
        assert b.loss_weights_for_step() == {"text": 1.0, "image": 1.0, "video": 1.0}
        assert b.last_raw_weights is None
    # H-th segment: the window is full, first adaptive update: w_ema = 0.9 * 1 + 0.1 * w.
    b.update(segs[H - 1])
    mods = ["text", "image", "video"]
    w1 = ref_w([ref_slope([segs[t][m] for t in range(0, H)]) for m in mods], 2.0)
    got = b.loss_weights_for_step()
    assert [got[m] for m in mods] == pytest.approx(list(0.9 + 0.1 * w1), abs=1e-12)
    assert sum(got.values()) == pytest.approx(3.0, abs=1e-12)  # EMA of sum-M vectors
    assert any(abs(v - 1.0) > 1e-3 for v in got.values())
    # Next segment: the window slides by one, w_ema = 0.9 * w_ema + 0.1 * w.
    b.update(segs[H])
    w2 = ref_w([ref_slope([segs[t][m] for t in range(1, H + 1)]) for m in mods], 2.0)
    got2 = b.weights
    assert [got2[m] for m in mods] == pytest.approx(list(0.9 * (0.9 + 0.1 * w1) + 0.1 * w2),
                                                    abs=1e-12)


def test_rising_loss_is_down_weighted():
    H = 5
    b = DynamicBalancer(["text", "image", "audio"], window=H, scale=3.0)
    for t in range(H + 3):
        b.update({"text": 3.0 - 0.2 * t, "image": 2.0 * 0.8 ** t, "audio": 1.0 + 0.05 * t})
    raw, w = b.last_raw_weights, b.weights
    for ws in (raw, w):
        assert ws["audio"] < 1.0
        assert ws["audio"] < ws["text"] and ws["audio"] < ws["image"]
        assert ws["text"] > 1.0 and ws["image"] > 1.0


def test_flat_converged_modality_loses_weight():
    H = 5
    b = DynamicBalancer(["text", "image", "audio"], window=H, scale=2.0)
    for t in range(H + 2):
        b.update({"text": 0.7,                          # converged: constant
                  "image": 0.9 + 1e-9 * (t % 2),        # changes far below eps: flat too
                  "audio": 4.0 - 0.3 * t})              # steep
    raw, w = b.last_raw_weights, b.weights
    # By hand: slopes (0, ~0, -1/(4+eps/1.2)) -> a_tilde = (0, ~0, -3); p = e^a/sum;
    # s = (0, ~0, 3 p_audio); w = 3 softmax(2 s).
    p_audio = math.exp(-3) / (2 + math.exp(-3))
    e = [1.0, 1.0, math.exp(2 * 3 * p_audio)]
    hand = [3 * x / sum(e) for x in e]
    assert [raw[m] for m in ("text", "image", "audio")] == pytest.approx(hand, abs=1e-3)
    for ws in (raw, w):
        assert ws["text"] < 1.0 and ws["image"] < 1.0 < ws["audio"]


def test_minmax_normalisation_makes_weights_scale_free():
    segs = segments(12)
    a = DynamicBalancer(["text", "image", "video"], window=5, scale=3.0)
    b = DynamicBalancer(["text", "image", "video"], window=5, scale=3.0)
    for s in segs:
        wa = a.update(s)
        wb = b.update({**s, "image": 7.0 * s["image"] + 2.0})  # scale + shift one modality
        for m in wa:
            assert wb[m] == pytest.approx(wa[m], abs=1e-5)
    assert abs(a.weights["image"] - 1.0) > 1e-2  # the run did move the weights


def test_all_flat_windows_keep_weights():
    b = DynamicBalancer(["text", "image"], window=3, scale=1.0)
    for t in range(4):
        b.update({"text": 2.0 - 0.5 * t, "image": 1.0 + 0.1 * t})
    for _ in range(2):  # constant losses from here on; windows still hold older values
        b.update({"text": 1.0, "image": 1.0})
    before = b.weights
    assert before != {"text": 1.0, "image": 1.0}
    for _ in range(3):  # now every window is flat: sum|a| = 0, weights unchanged
        assert b.update({"text": 1.0, "image": 1.0}) == before
    assert b.weights == before


def test_state_dict_round_trip_continues_identically():
    segs = segments(14, ("text", "image", "audio", "video"))
    mods = ["text", "image", "audio", "video"]
    ref = DynamicBalancer(mods, window=5, scale=2.5)
    ref_trace = [ref.update(s) for s in segs]

    first = DynamicBalancer(mods, window=5, scale=2.5)
    for s in segs[:7]:
        first.update(s)
    state = json.loads(json.dumps(first.state_dict()))  # plain Python types only
    resumed = DynamicBalancer(mods, window=5, scale=2.5)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    assert first.last_raw_weights is not None
    assert resumed.last_raw_weights == first.last_raw_weights
    trace = [resumed.update(s) for s in segs[7:]]
    assert trace == ref_trace[7:]  # bit-identical continuation

    with pytest.raises(ValueError, match="modalities"):
        DynamicBalancer(["text", "image"], window=5, scale=2.5).load_state_dict(state)
    with pytest.raises(ValueError, match="scale"):
        DynamicBalancer(mods, window=5, scale=1.0).load_state_dict(state)
    loose = DynamicBalancer(mods, window=5, scale=1.0)
    loose.load_state_dict(state, strict=False)
    assert loose.weights == first.weights and loose.scale == 1.0


def test_balancer_rejects_bad_input():
    with pytest.raises(ValueError, match="window"):
        DynamicBalancer(["text"], window=1)
    with pytest.raises(ValueError, match="duplicate"):
        DynamicBalancer(["text", "text"])
    b = DynamicBalancer(["text", "image"], window=3)
    with pytest.raises(ValueError, match="missing"):
        b.update({"text": 1.0})
    with pytest.raises(ValueError, match="unexpected"):
        b.update({"text": 1.0, "image": 1.0, "audio": 1.0})
    with pytest.raises(ValueError, match="finite"):
        b.update({"text": float("nan"), "image": 1.0})
    assert b.num_segments == 0


# ---------------------------------------------------------------------------------------------
# step balance


def test_step_balance_worked_example():
    w = step_balance_weights({"text": 1.0, "image": 2.0, "audio": 4.0})
    hand = [10 * 1.0 / 1.75, 10 * 0.5 / 1.75, 10 * 0.25 / 1.75]
    assert list(w) == ["text", "image", "audio"]
    assert list(w.values()) == pytest.approx(hand, rel=1e-12)
    assert sum(w.values()) == pytest.approx(10.0, rel=1e-12)
    w2 = step_balance_weights({"text": 0.8, "image": 1.3, "video": 2.1, "audio": 3.7}, alpha=4.0)
    assert sum(w2.values()) == pytest.approx(4.0, rel=1e-12)
    assert w2["text"] / w2["audio"] == pytest.approx(3.7 / 0.8, rel=1e-12)


@pytest.mark.parametrize("losses", [
    {"text": 1.0, "image": 0.0}, {"text": -1.0}, {"text": float("nan")},
    {"text": float("inf")}, {}, {"text": "1.0"}, {"bad name": 1.0},
])
def test_step_balance_rejects_bad_losses(losses):
    with pytest.raises(ValueError):
        step_balance_weights(losses)


def test_step_balance_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        step_balance_weights({"text": 1.0}, alpha=0.0)


# ---------------------------------------------------------------------------------------------
# plateau detector (calibration runs)


def test_plateau_detects_after_knee_of_exponential_decay():
    rng = random.Random(0)
    tau, asym = 100.0, 2.0
    curve = [asym + 3.0 * math.exp(-t / tau) + rng.gauss(0.0, 0.02) for t in range(3000)]
    det = PlateauDetector(window=50, rel_tol=0.005, min_steps=100)
    hit = next((t + 1 for t, v in enumerate(curve) if det.update(v)), None)
    assert hit is not None
    # After the knee: by 3 tau the excess 3 e^-3 = 0.15 is still falling ~0.2% per step.
    assert 3 * tau < hit < 10 * tau
    assert det.converged and det.converged_step == hit
    assert abs(det.converged_loss - asym) < 0.05
    # L* is the mean of the final window.
    assert det.converged_loss == pytest.approx(sum(curve[hit - 50:hit]) / 50, rel=1e-12)
    assert det.update(100.0) and det.converged_step == hit  # latched


def test_plateau_never_on_steadily_falling_or_rising_line():
    rng = random.Random(1)
    fall = PlateauDetector(window=50, rel_tol=0.005, min_steps=100)
    rise = PlateauDetector(window=50, rel_tol=0.005, min_steps=100)
    for t in range(2000):
        # falling 0.2 per window from 10 to 2: relative change >= 0.2/10 = 2% per window
        assert not fall.update(10.0 - 0.004 * t + rng.gauss(0.0, 0.02))
        assert not rise.update(2.0 + 0.004 * t + rng.gauss(0.0, 0.02))
    assert fall.converged_loss is None and not rise.converged


def test_plateau_min_steps_and_bad_loss():
    det = PlateauDetector(window=5, rel_tol=0.01, min_steps=40)
    flags = [det.update(1.0) for _ in range(40)]
    assert not any(flags[:39]) and flags[39] and det.converged_loss == 1.0
    with pytest.raises(ValueError, match="finite"):
        PlateauDetector(window=5).update(float("nan"))
    with pytest.raises(ValueError, match="window"):
        PlateauDetector(window=0)


# ---------------------------------------------------------------------------------------------
# the step-balance weights file


def test_weights_file_round_trip(tmp_path):
    losses = {"text": 1.0, "image": 2.0, "audio": 4.0}
    w = step_balance_weights(losses)
    path = tmp_path / "step_balance.json"
    write_step_balance_file(path, w, losses, {"alpha": 10.0, "steps": {"text": 500}})
    assert read_step_balance_file(path) == w
    got = read_step_balance_file(str(path), modalities=["audio", "text", "image"])
    assert list(got) == ["audio", "text", "image"] and got == w
    doc = json.loads(path.read_text())
    assert doc["converged_losses"] == losses and doc["meta"]["steps"] == {"text": 500}


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


GOOD = {"format": "megatron-omni/step-balance", "version": 1, "weights": {"text": 5.0}}


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({**GOOD, "format": "other"}, "format"),
    ({**GOOD, "version": 99}, "version"),
    ({k: v for k, v in GOOD.items() if k != "weights"}, "no 'weights'"),
    ({**GOOD, "weights": {}}, "non-empty"),
    ({**GOOD, "weights": [5.0]}, "mapping"),
    ({**GOOD, "weights": {"text": -1.0}}, "> 0"),
    ({**GOOD, "weights": {"text": 0.0}}, "> 0"),
    ('{"format": "megatron-omni/step-balance", "version": 1, "weights": {"text": NaN}}',
     "finite"),
    ({**GOOD, "weights": {"text": "5"}}, "number"),
    ({**GOOD, "weights": {"te xt": 5.0}}, "modality name"),
    ({**GOOD, "weights": {"": 5.0}}, "modality name"),
])
def test_bad_weights_files(tmp_path, content, match):
    path = _write(tmp_path / "w.json", content)
    with pytest.raises(ValueError, match=match) as e:
        read_step_balance_file(path)
    assert "w.json" in str(e.value)


def test_weights_file_modality_mismatch_and_missing(tmp_path):
    path = _write(tmp_path / "w.json", {**GOOD, "weights": {"text": 5.0, "image": 5.0}})
    with pytest.raises(ValueError, match=r"missing \['audio'\]"):
        read_step_balance_file(path, modalities=["text", "image", "audio"])
    with pytest.raises(ValueError, match=r"unexpected \['image'\]"):
        read_step_balance_file(path, modalities=["text"])
    with pytest.raises(FileNotFoundError):
        read_step_balance_file(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="> 0"):
        write_step_balance_file(tmp_path / "x.json", {"text": -2.0})
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------------------------------------
# data-parallel averaging


def test_all_reduce_is_identity_without_distributed():
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        pytest.skip("a multi-rank process group is active")
    assert all_reduce_mean_losses({"text": 1.5, "audio": 0.25}) == {"text": 1.5, "audio": 0.25}


WORKER = textwrap.dedent("""
    import json, math, sys
    import torch.distributed as dist
    from megatron_omni.training.balance import DynamicBalancer, all_reduce_mean_losses
    out, port, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    local = json.loads(sys.argv[4])[rank]
    # Each rank lists the modalities in a different order: the reduce must not care.
    mods = ["text", "image", "video"] if rank == 0 else ["video", "text", "image"]
    b = DynamicBalancer(["text", "image", "video"], window=4, scale=3.0)
    reduced, weights = [], []
    for seg in local:
        r = all_reduce_mean_losses({m: seg[m] for m in mods})
        reduced.append(r)
        weights.append(b.update(r))
    err = None
    try:
        all_reduce_mean_losses({"text": 1.0, "image": 1.0, ("video" if rank else "audio"): 1.0})
    except RuntimeError as e:
        err = str(e)
    dist.destroy_process_group()
    json.dump({"reduced": reduced, "weights": weights, "state": b.state_dict(), "err": err},
              open(f"{out}/rank{rank}.json", "w"))
""")


@pytest.mark.slow
def test_identical_weights_on_every_rank(tmp_path):
    from dist_utils import free_port

    rng = random.Random(5)
    mods = ["text", "image", "video"]
    base = segments(9, mods)
    # Rank-local validation losses differ (different shards of the held-out set).
    local = [[{m: v + rng.uniform(-0.3, 0.3) for m, v in s.items()} for s in base]
             for _ in range(2)]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), port, str(r),
                               json.dumps(local)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    for p in procs:
        log = p.communicate(timeout=60)[0].decode()
        assert p.returncode == 0, log[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    assert res[0]["weights"] == res[1]["weights"]  # bit-identical on every rank
    assert res[0]["state"] == res[1]["state"]
    single = DynamicBalancer(mods, window=4, scale=3.0)
    for t in range(len(base)):
        avg = {m: (local[0][t][m] + local[1][t][m]) / 2 for m in mods}
        for r in range(2):
            assert res[r]["reduced"][t] == pytest.approx(avg, abs=1e-12)
        want = single.update(avg)
        for r in range(2):
            assert res[r]["weights"][t] == pytest.approx(want, abs=1e-12)
    assert any(abs(v - 1.0) > 1e-2 for v in res[0]["weights"][-1].values())
    assert all("disagree" in res[r]["err"] for r in range(2))
