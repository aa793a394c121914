"""Process logging (timestamp, rank, level; rank 0 at INFO, the others at WARNING), the GPU
memory part of the step line, and optional Weights & Biases logging with the TensorBoard scalars
(a fake ``wandb`` module stands in for the package, which is not a dependency)."""

from __future__ import annotations

import io
import logging
import re
import sys
import types

import pytest
import torch

from megatron_omni.config import ConfigError, load_config
from megatron_omni.training.logging import (
    GIB,
    StepStats,
    TrainLogger,
    format_line,
    gpu_memory_stats,
    launcher_rank,
    setup_logging,
    step_scalars,
)

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank (\d+)\] (\w+) ([\w.]+): (.*)$")


@pytest.fixture
def root_logger():
    """Restore the root logger's handlers and level after the test."""
    root, mc = logging.getLogger(), logging.getLogger("megatron.core")
    handlers, level, mc_level = list(root.handlers), root.level, mc.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    mc.setLevel(mc_level)


def emit(stream):
    log = logging.getLogger("megatron_omni.training.checkpoint")
    log.info("saved checkpoint %s", "runs/x/step_00000010")
    log.warning("could not delete old checkpoints")
    return [LINE.match(s) for s in stream.getvalue().splitlines()]


def test_rank0_logs_info_with_time_rank_level(root_logger):
    stream = io.StringIO()
    assert setup_logging(rank=0, stream=stream) == logging.INFO
    lines = emit(stream)
    assert all(lines), stream.getvalue()
    assert [m.groups() for m in lines] == [
        ("0", "INFO", "megatron_omni.training.checkpoint", "saved checkpoint runs/x/step_00000010"),
        ("0", "WARNING", "megatron_omni.training.checkpoint", "could not delete old checkpoints")]


def test_other_ranks_warn_only_unless_told(root_logger):
    stream = io.StringIO()
    setup_logging(rank=3, stream=stream)
    lines = emit(stream)
    assert [(m.group(1), m.group(2)) for m in lines] == [("3", "WARNING")]
    stream = io.StringIO()
    setup_logging(rank=3, other_ranks_level="info", stream=stream)  # replaces the handler
    assert [(m.group(1), m.group(2)) for m in emit(stream)] == [("3", "INFO"), ("3", "WARNING")]
    assert sum(type(h).__name__ == "_Handler" for h in root_logger.handlers) == 1
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging(rank=0, level="LOUD")


def test_megatron_core_held_at_warning(root_logger):
    stream = io.StringIO()
    setup_logging(rank=0, stream=stream)
    child = logging.getLogger("megatron.core.optimizer")
    child.info("Setting up optimizer with config ...")
    child.warning("something to know")
    assert [m.group(2) for m in map(LINE.match, stream.getvalue().splitlines())] == ["WARNING"]
    setup_logging(rank=0, megatron_level="INFO", stream=stream)
    child.info("Setting up optimizer with config ...")
    assert stream.getvalue().splitlines()[-1].endswith("Setting up optimizer with config ...")


def test_launcher_rank():
    assert launcher_rank({"RANK": "5", "WORLD_SIZE": "8", "SLURM_PROCID": "1",
                          "SLURM_NTASKS": "2"}) == 5  # torchrun wins, as in parallel.runtime
    assert launcher_rank({"SLURM_PROCID": "7", "SLURM_NTASKS": "8"}) == 7
    assert launcher_rank({}) == 0


def stats(**kw):
    base = dict(step=3, total_steps=10, lr=1e-4, losses={"text": 2.5, "image": 3.0},
                weights={"text": 1.0, "image": 0.5}, grad_norm=0.7, tokens=4096, step_time=2.0,
                flops=4e12, num_devices=2, skipped_samples=1, nan_steps=0,
                extra={"dpo/loss": 0.69})
    base.update(kw)
    return StepStats(**base)


def test_memory_in_the_step_line():
    mem = {"allocated": int(1.5 * GIB), "reserved": 2 * GIB, "peak": int(3.25 * GIB)}
    line = format_line(stats(memory=mem), 60.0)
    assert line.endswith("ETA 00:01:00 | GPU mem alloc 1.50 reserved 2.00 peak 3.25 GiB"), line
    assert step_scalars(stats(memory=mem))["memory/peak_gib"] == pytest.approx(3.25)
    cpu = format_line(stats(), 60.0)
    assert "GPU mem" not in cpu and cpu.endswith("ETA 00:01:00")
    assert not any(k.startswith("memory/") for k in step_scalars(stats()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_no_memory_stats_on_cpu():
    assert gpu_memory_stats() is None


class FakeRun:
    def __init__(self, **kw):
        self.init = kw
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def log(self, data, step=None):
        self.logged.append((dict(data), step))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.runs = []

    def init(**kw):
        run = FakeRun(**kw)
        mod.runs.append(run)
        return run

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def tensorboard_scalars(logdir) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return {(tag, e.step): e.value for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)}


def wandb_scalars(run) -> dict[tuple[str, int], float]:
    return {(k, step): v for data, step in run.logged for k, v in data.items()}


def test_wandb_gets_the_tensorboard_scalars(fake_wandb, tmp_path):
    mem = {"allocated": GIB, "reserved": 2 * GIB, "peak": 3 * GIB}
    lines = []
    lg = TrainLogger(str(tmp_path / "tb"), enabled=True, printer=lines.append,
                     wandb_project="omni", wandb_run_name="it3-test",
                     wandb_dir=str(tmp_path / "save"), wandb_config={"stage": {"name": "it3"}})
    lg.log_step(stats(step=1))
    lg.log_step(stats(step=2, grad_norm=None, memory=mem))
    lg.log_validation(2, {"text": 2.4, "image": 2.9})
    lg.log_scalars({"val/dpo/accuracy": 0.75}, 2)
    lg.close()
    (run,) = fake_wandb.runs
    assert run.init == {"project": "omni", "name": "it3-test", "dir": str(tmp_path / "save"),
                        "config": {"stage": {"name": "it3"}}}
    assert run.finished and (tmp_path / "save").is_dir()
    tb, wb = tensorboard_scalars(tmp_path / "tb"), wandb_scalars(run)
    assert set(wb) == set(tb)
    for key, v in tb.items():
        assert wb[key] == pytest.approx(v, rel=1e-6), key  # TensorBoard stores float32
    assert {("loss/text", 1), ("grad_norm", 1), ("val/loss/image", 2), ("dpo/loss", 2),
            ("memory/reserved_gib", 2), ("val/dpo/accuracy", 2)} <= set(wb)
    assert ("grad_norm", 2) not in wb and ("memory/reserved_gib", 1) not in wb


def test_wandb_only_on_the_logging_rank(fake_wandb):
    lg = TrainLogger(None, enabled=False, wandb_project="omni")
    lg.log_step(stats())
    lg.close()
    assert fake_wandb.runs == []


def test_wandb_missing_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # "import wandb" raises ImportError
    with pytest.raises(ConfigError, match=r"training.wandb_project.*pip install wandb"):
        load_config(None, ["training.wandb_project=omni"])
    with pytest.raises(ConfigError, match="pip install wandb"):
        TrainLogger(None, enabled=True, wandb_project="omni")
    load_config(None, [])  # off by default: never required
    with pytest.raises(ConfigError, match="training.wandb_run_name is set but"):
        load_config(None, ["training.wandb_run_name=x"])


def test_wandb_present_passes_validation(fake_wandb):
    cfg = load_config(None, ["training.wandb_project=omni", "training.wandb_run_name=r1"])
    assert cfg.training.wandb_project == "omni" and cfg.training.wandb_run_name == "r1"
