"""Training log: Python logging set-up, a Megatron-style line every N steps, TensorBoard and
(optionally) Weights & Biases scalars.

Tags (stable; dashboards depend on them): ``loss/<modality>``, ``loss/gen_audio``,
``balance/weight/<modality>``, ``val/loss/<modality>``, ``lr``, ``grad_norm``,
``throughput/tokens_per_sec``, ``throughput/tflops_per_device``, ``data/skipped``,
``train/nan_steps``, ``memory/{allocated,reserved,peak}_gib`` (GPU runs), and the step's extra
metrics (``dpo/*``, ``loss/sft``, ``val/dpo/*``). With ``training.wandb_project`` every scalar
written to TensorBoard goes to the wandb run as well, same tag, same step.

Process log (:func:`setup_logging`, called by ``megatron_omni.train``): one line per record,
``2026-12-03 14:02:11 [rank 0] INFO megatron_omni.training.checkpoint: saved checkpoint ...``;
rank 0 at INFO, the other ranks at WARNING unless told otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, TextIO

GIB = 1024 ** 3
LOG_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


def launcher_rank(env: Optional[Mapping[str, str]] = None) -> int:
    """This process's global rank from torchrun (``RANK``) or Slurm (``SLURM_PROCID``), 0 when
    neither launched it (``parallel.runtime.dist_env_from_environ``)."""
    from ..parallel.runtime import dist_env_from_environ

    return dist_env_from_environ(env).rank


class _Handler(logging.StreamHandler):
    """The handler :func:`setup_logging` installs (so a second call replaces it)."""


def _level(value: str | int) -> int:
    numeric = logging.getLevelName(value.upper()) if isinstance(value, str) else value
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {value!r}; use DEBUG, INFO, WARNING or ERROR")
    return numeric


def setup_logging(rank: Optional[int] = None, level: str | int = "INFO",
                  other_ranks_level: str | int = "WARNING", megatron_level: str | int = "WARNING",
                  stream: Optional[TextIO] = None) -> int:
    """Configure the root logger: timestamp, rank and level on every line; rank 0 logs at
    ``level``, every other rank at ``other_ranks_level`` (so N ranks do not print N copies).
    megatron-core's own loggers (``megatron.core``: DDP bucket listings, the optimizer config,
    ...) are held at ``megatron_level`` or above. Returns the level in effect for this process."""
    rank = launcher_rank() if rank is None else rank
    numeric = _level(level if rank == 0 else other_ranks_level)
    logging.getLogger("megatron.core").setLevel(max(numeric, _level(megatron_level)))
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(rank=rank), LOG_DATEFMT))
    root.addHandler(handler)
    root.setLevel(numeric)
    return numeric


def gpu_memory_stats() -> Optional[dict[str, int]]:
    """This process's CUDA memory in bytes (``allocated``, ``reserved``, ``peak`` allocated since
    start), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "peak": torch.cuda.max_memory_allocated()}


def format_memory(mem: Optional[Mapping[str, float]]) -> str:
    """`` | GPU mem alloc 1.50 reserved 2.00 peak 3.25 GiB`` or "" (CPU runs show nothing)."""
    if not mem:
        return ""
    return (f" | GPU mem alloc {mem['allocated'] / GIB:.2f} reserved {mem['reserved'] / GIB:.2f}"
            f" peak {mem['peak'] / GIB:.2f} GiB")


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
    memory: Optional[dict[str, int]] = None
    """:func:`gpu_memory_stats` (bytes), None on the CPU."""

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
            f"ETA {format_eta(eta_seconds)}{format_memory(s.memory)}")


def step_scalars(s: StepStats) -> dict[str, float]:
    """The scalars of one logged step, by tag (what TensorBoard and wandb receive)."""
    out = {f"loss/{k}": v for k, v in s.losses.items()}
    out.update({f"balance/weight/{k}": v for k, v in s.weights.items()})
    out["lr"] = s.lr
    if s.grad_norm is not None:
        out["grad_norm"] = s.grad_norm
    out["throughput/tokens_per_sec"] = s.tokens_per_sec
    out["throughput/tflops_per_device"] = s.tflops_per_device
    out["data/skipped"] = s.skipped_samples
    out["train/nan_steps"] = s.nan_steps
    if s.memory:
        out.update({f"memory/{k}_gib": v / GIB for k, v in s.memory.items()})
    out.update(s.extra)
    return out


def init_wandb(project: str, run_name: Optional[str], directory: Optional[str],
               config: Optional[dict]) -> Any:
    """Start a Weights & Biases run; a clear error when wandb is not installed."""
    try:
        import wandb
    except ImportError as e:
        from ..config.schema import ConfigError

        raise ConfigError(f"training.wandb_project={project!r} needs the wandb package: pip "
                          f"install wandb (or unset training.wandb_project)") from e
    if directory:
        os.makedirs(directory, exist_ok=True)  # wandb falls back to /tmp for a missing dir
    return wandb.init(project=project, name=run_name, dir=directory, config=config)


class TrainLogger:
    """Prints the log line and writes the scalars to TensorBoard and, with a wandb project, to
    Weights & Biases. Only the logging rank (``enabled``; the last rank, which holds the losses,
    as in Megatron) does any of it."""

    def __init__(self, tensorboard_dir: Optional[str], enabled: bool, printer=print,
                 wandb_project: Optional[str] = None, wandb_run_name: Optional[str] = None,
                 wandb_dir: Optional[str] = None, wandb_config: Optional[dict] = None):
        self.enabled = enabled
        self.printer = printer
        self.writer = None
        self.wandb_run = None
        self._times: list[float] = []
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if enabled and wandb_project:
            self.wandb_run = init_wandb(wandb_project, wandb_run_name, wandb_dir, wandb_config)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Write ``{tag: value}`` at ``step`` to every sink (TensorBoard, wandb)."""
        if not self.enabled or not scalars:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log({k: float(v) for k, v in scalars.items()}, step=step)

    def log_step(self, s: StepStats) -> None:
        self._times = (self._times + [s.step_time])[-20:]
        if not self.enabled:
            return
        eta = (s.total_steps - s.step) * (sum(self._times) / len(self._times))
        self.printer(format_line(s, eta))
        self.log_scalars(step_scalars(s), s.step)

    def log_validation(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.printer(f" validation at step {step}: " +
                     " ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        self.log_scalars({f"val/loss/{k}": v for k, v in losses.items()}, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t
