"""``omni-plot RUN_DIR [--out PNG]``: one PNG of a training run from its ``losses.jsonl``.

Four panels: the training loss per modality (and ``gen_audio`` / ``dpo`` when present), the
validation loss per modality (the held-out segments of dynamic balance), the balance weights and
the learning rate, against the optimizer step.

``RUN_DIR`` is a run's ``training.save`` folder. The trainer writes one JSON line per step there
(``{"step", "losses", "weights", "lr", "grad_norm"}``, plus ``"val"`` at the steps where
dynamic balance ran a validation segment). A resume from an older checkpoint appends
``{"resume": {"step": S, ...}}``: the steps after S are then written again, so the lines before
the marker for steps > S are dropped (the run that wrote them was abandoned) and, in general, the
last line of each step is the one kept. Lines that are not JSON objects (a line cut short by a
killed run) are skipped and counted.

    omni-plot demo_out/runs/it3                      # -> demo_out/runs/it3/losses.png
    python -m megatron_omni.cli.plot RUN_DIR --out curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HISTORY_NAME = "losses.jsonl"
PLOT_NAME = "losses.png"

Series = dict[str, list[tuple[int, float]]]


@dataclass
class RunHistory:
    """The per-step values of a run, one entry per step (the last line written for it), in step
    order. ``losses`` / ``val`` / ``weights``: name -> [(step, value)]; ``lr``: [(step, lr)]."""

    steps: list[int] = field(default_factory=list)
    losses: Series = field(default_factory=dict)
    val: Series = field(default_factory=dict)
    weights: Series = field(default_factory=dict)
    lr: list[tuple[int, float]] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)
    """Steps a resume restarted from (the ``{"resume": ...}`` markers), in file order."""
    bad_lines: int = 0


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def read_history(path) -> RunHistory:
    """Parse ``losses.jsonl`` (a file, or a run folder holding one); see the module docstring
    for the rules."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_NAME
    rows: dict[int, dict] = {}
    hist = RunHistory()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                hist.bad_lines += 1
                continue
            if not isinstance(rec, dict):
                hist.bad_lines += 1
                continue
            if isinstance(rec.get("resume"), dict):
                step = rec["resume"].get("step")
                if isinstance(step, int):
                    hist.resumes.append(step)
                    rows = {s: r for s, r in rows.items() if s <= step}
                continue
            step = rec.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                hist.bad_lines += 1
                continue
            rows[step] = rec
    for step in sorted(rows):
        rec = rows[step]
        hist.steps.append(step)
        for key, series in (("losses", hist.losses), ("val", hist.val),
                            ("weights", hist.weights)):
            values = rec.get(key)
            if isinstance(values, dict):
                for name, v in values.items():
                    x = _number(v)
                    if x is not None:
                        series.setdefault(name, []).append((step, x))
        lr = _number(rec.get("lr"))
        if lr is not None:
            hist.lr.append((step, lr))
    return hist


def plot_history(hist: RunHistory, out, title: str = "") -> Path:
    """Draw the four panels of ``hist`` into the PNG ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    panels = ((axes[0][0], hist.losses, "training loss"),
              (axes[0][1], hist.val, "validation loss (dynamic balance)"),
              (axes[1][0], hist.weights, "balance weight"))
    names = sorted({n for _, series, _ in panels for n in series})
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    color = {n: palette(i % palette.N) for i, n in enumerate(names)}  # one colour per name
    for ax, series, label in panels:
        for name in sorted(series):
            pts = [(s, v) for s, v in series[name] if math.isfinite(v)]
            if pts:
                ax.plot(*zip(*pts), label=name, color=color[name],
                        marker="." if len(pts) < 40 else None)
        ax.set_title(label)
        if series:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "none recorded", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    ax = axes[1][1]
    if hist.lr:
        ax.plot(*zip(*hist.lr), color="black")
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in axes.flat:
        for s in hist.resumes:
            ax.axvline(s, color="gray", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "training run")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def load_run(run_dir) -> tuple[Path, RunHistory]:
    """The history file of a run folder (or the file itself) and its parsed history. Raises
    FileNotFoundError without a history, ValueError when it holds no step."""
    run_dir = Path(run_dir)
    path = run_dir / HISTORY_NAME if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the run's training.save folder holds "
                                f"{HISTORY_NAME} once a step is done)")
    hist = read_history(path)
    if not hist.steps:
        raise ValueError(f"{path} holds no step")
    return path, hist


def plot_run(run_dir, out=None) -> Path:
    """``RUN_DIR/losses.jsonl`` -> ``out`` (default ``RUN_DIR/losses.png``); errors as
    :func:`load_run`."""
    path, hist = load_run(run_dir)
    out = Path(out) if out else path.parent / PLOT_NAME
    return plot_history(hist, out, title=str(path.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="omni-plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run's training.save folder (or its "
                                              f"{HISTORY_NAME})")
    p.add_argument("--out", type=Path, help=f"PNG to write (default RUN_DIR/{PLOT_NAME})")
    a = p.parse_args(argv)
    try:
        path, hist = load_run(a.run_dir)
        out = plot_history(hist, a.out or path.parent / PLOT_NAME, title=str(path.parent))
    except (FileNotFoundError, ValueError) as e:
        print(f"omni-plot: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"omni-plot: error: {e}; pip install matplotlib", file=sys.stderr)
        return 2
    bad = hist.bad_lines
    print(f"wrote {out}" + (f" ({bad} malformed line(s) of {HISTORY_NAME} skipped)" if bad else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
