"""Training log: a Megatron-style line every N steps and TensorBoard scalars.

Tags (stable; dashboards depend on them): ``loss/<modality>``, ``loss/gen_audio``,
``balance/weight/<modality>``, ``val/loss/<modality>``, ``lr``, ``grad_norm``,
``throughput/tokens_per_sec``, ``throughput/tflops_per_device``, ``data/skipped``,
``train/nan_steps``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class StepStats:
    """What one logged step reports."""

    step: int
    total_steps: int
    lr: float
    losses: dict[str, float]
    weights: dict[str, float]
    grad_norm: Optional[float]
    tokens: int
    step_time: float
    flops: float
    num_devices: int
    skipped_samples: int = 0
    nan_steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.step_time if self.step_time > 0 else 0.0

    @property
    def tflops_per_device(self) -> float:
        if self.step_time <= 0:
            return 0.0
        return self.flops / self.step_time / self.num_devices / 1e12


def format_line(s: StepStats, eta_seconds: float) -> str:
    losses = " ".join(f"{k} {v:.4f}" for k, v in s.losses.items())
    weights = " ".join(f"{k} {v:.3f}" for k, v in s.weights.items())
    gn = f"{s.grad_norm:.3f}" if s.grad_norm is not None else "n/a"
    return (f" step {s.step:6d}/{s.total_steps} | lr {s.lr:.3E} | loss {losses} | "
            f"weights {weights} | grad norm {gn} | skipped samples {s.skipped_samples} | "
            f"nan steps {s.nan_steps} | tokens/s {s.tokens_per_sec:,.0f} | "
            f"TFLOP/s/dev {s.tflops_per_device:.4f} | step time {s.step_time:.3f} s | "
            f"ETA {format_eta(eta_seconds)}")


class TrainLogger:
    """Prints the log line (on the logging rank) and writes TensorBoard scalars."""

    def __init__(self, tensorboard_dir: Optional[str], enabled: bool, printer=print):
        self.enabled = enabled
        self.printer = printer
        self.writer = None
        self._times: list[float] = []
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def log_step(self, s: StepStats) -> None:
        self._times = (self._times + [s.step_time])[-20:]
        if not self.enabled:
            return
        eta = (s.total_steps - s.step) * (sum(self._times) / len(self._times))
        self.printer(format_line(s, eta))
        if self.writer is not None:
            w, step = self.writer, s.step
            for k, v in s.losses.items():
                w.add_scalar(f"loss/{k}", v, step)
            for k, v in s.weights.items():
                w.add_scalar(f"balance/weight/{k}", v, step)
            w.add_scalar("lr", s.lr, step)
            if s.grad_norm is not None:
                w.add_scalar("grad_norm", s.grad_norm, step)
            w.add_scalar("throughput/tokens_per_sec", s.tokens_per_sec, step)
            w.add_scalar("throughput/tflops_per_device", s.tflops_per_device, step)
            w.add_scalar("data/skipped", s.skipped_samples, step)
            w.add_scalar("train/nan_steps", s.nan_steps, step)
            for k, v in s.extra.items():
                w.add_scalar(k, v, step)

    def log_validation(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.printer(f" validation at step {step}: " +
                     " ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if self.writer is not None:
            for k, v in losses.items():
                self.writer.add_scalar(f"val/loss/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t
