"""Trainer in one process with an in-memory data source: NaN/Inf steps are skipped and counted
and stop the run after training.max_nan_steps in a row; TensorBoard gets the documented tags."""

import math

import pytest
from omni_batch import MemoryData, tiny_omni_cfg

from megatron_omni.training.trainer import NanLossError, Trainer


def make_trainer(tmp_path, *extra):
    cfg = tiny_omni_cfg("data.modalities=[text,audio]", "training.log_interval=1",
                        "training.lr=1e-3", f"training.tensorboard_dir={tmp_path / 'tb'}",
                        *extra, vision=False)
    lines = []
    t = Trainer(cfg, data=MemoryData(cfg, vision=None, val_seed=100), printer=lines.append)
    t.setup()
    return t, lines


def poison(trainer, steps):
    """Make the embedding output NaN on the given (1-based) optimizer steps."""
    emb = trainer.chunks[0].llm.embedding

    def hook(module, inputs, output):
        return output * float("nan") if trainer.step + 1 in steps else output

    return emb.register_forward_hook(hook)


def test_nan_steps_are_skipped_then_stop(single_rank, tmp_path):
    t, lines = make_trainer(tmp_path, "training.train_iters=6", "training.max_nan_steps=2")
    poison(t, {2, 4, 5})
    params = {}

    def snapshot():
        return {n: p.detach().clone() for n, p in t.chunks[0].named_parameters()}

    with pytest.raises(NanLossError, match="2 steps in a row had a NaN/Inf loss"):
        orig_step = t.optimizer.step

        def step_and_record():
            out = orig_step()
            params[t.step + 1] = snapshot()
            return out

        t.optimizer.step = step_and_record
        t.train()
    assert t.nan_steps == 3
    # Optimizer stepped at steps 1 and 3 only; step 2 (NaN) left the weights alone.
    assert sorted(params) == [1, 3]
    assert any("NaN/Inf loss" in line and "update skipped" in line for line in lines)


def test_tensorboard_tags_and_log_line(single_rank, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t, lines = make_trainer(
        tmp_path,
        "training.train_iters=5",
        "stage.balance=dynamic",
        "stage.balance_window=3",
        "stage.balance_scale=5.0",
        "stage.balance_interval=1",
        "stage.val_micro_batches=1",
    )
    summary = t.train()
    assert summary.steps_done == 5 and math.isfinite(summary.last_losses["text"])
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    expected = {
        "loss/text",
        "loss/audio",
        "loss/gen_audio",
        "balance/weight/text",
        "balance/weight/audio",
        "val/loss/text",
        "val/loss/audio",
        "lr",
        "grad_norm",
        "throughput/tokens_per_sec",
        "throughput/tflops_per_device",
        "data/skipped",
    }
    assert expected <= tags, expected - tags
    assert len(ea.Scalars("loss/text")) == 5
    step_lines = [line for line in lines if line.strip().startswith("step")]
    assert len(step_lines) == 5
    for key in (
        "lr",
        "loss ",
        "text ",
        "gen_audio",
        "weights text",
        "grad norm",
        "skipped samples",
        "tokens/s",
        "TFLOP/s/dev",
        "step time",
        "ETA",
    ):
        assert key in step_lines[-1], key
    # The trainer's weights are exactly what the balancer makes of the logged validation losses.
    from megatron_omni.training.balance import DynamicBalancer

    ref = DynamicBalancer(["text", "audio"], window=3, scale=5.0)
    val = {m: [e.value for e in ea.Scalars(f"val/loss/{m}")] for m in ("text", "audio")}
    assert len(val["text"]) == 5
    for i in range(5):
        ref.update({m: val[m][i] for m in val})
    assert summary.weights == pytest.approx(ref.weights, rel=1e-5)
    assert t.balancer.num_segments == 5


def test_missing_init_from_is_a_config_error(single_rank, tmp_path):
    from megatron_omni.config import ConfigError

    with pytest.raises(ConfigError, match="stage.init_from=.*does not exist"):
        make_trainer(tmp_path, "training.train_iters=1", f"stage.init_from={tmp_path / 'none'}")


def test_run_logs_and_sends_tensorboard_scalars_to_wandb(single_rank, tmp_path, monkeypatch,
                                                          caplog):
    import logging
    import sys
    import types

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []

    class Run:
        def __init__(self, **kw):
            self.kw, self.logged, self.finished = kw, [], False

        def log(self, data, step=None):
            self.logged.append((dict(data), step))

        def finish(self):
            self.finished = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(Run(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    caplog.set_level(logging.INFO)
    t, lines = make_trainer(tmp_path, "training.train_iters=2", "training.wandb_project=omni",
                            f"training.save={tmp_path / 'save'}", "stage.balance=dynamic",
                            "stage.balance_window=2", "stage.balance_interval=1",
                            "stage.val_micro_batches=1")
    t.train()
    # INFO lines of the process log: the layer implementation and the checkpoint saved.
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("model: local layers (model.transformer_impl=") for m in info), info
    assert any(m.startswith("saved checkpoint ") and "step_00000002" in m for m in info), info
    (run,) = runs
    assert run.finished and run.kw["project"] == "omni" and run.kw["dir"] == str(tmp_path / "save")
    assert run.kw["config"]["training"]["train_iters"] == 2
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tb = {(tag, e.step): e.value for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)}
    wb = {(k, step): v for data, step in run.logged for k, v in data.items()}
    assert set(wb) == set(tb) and ("val/loss/audio", 2) in wb and ("loss/text", 1) in wb
    for key, v in tb.items():
        assert wb[key] == pytest.approx(v, rel=1e-6), key
