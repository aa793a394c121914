"""omni-plot (megatron_omni/cli/plot.py): what it reads from losses.jsonl (the last line per step,
resume markers, validation rows, malformed lines) and the PNG it writes."""

from __future__ import annotations

import json
import struct

import pytest

from megatron_omni.cli import plot


def _row(step, text, image, w_text, w_image, lr, val=None):
    r = {"step": step, "losses": {"text": text, "image": image},
         "weights": {"text": w_text, "image": w_image}, "lr": lr, "grad_norm": 1.5}
    if val is not None:
        r["val"] = val
    return r


@pytest.fixture
def run(tmp_path):
    """A run of 5 steps, interrupted after step 4 and resumed from the step-2 checkpoint
    (steps 3 and 4 written twice; the first step 4 belongs to the abandoned run, and the resumed
    run was itself stopped after its step 3 once, then went on), with a validation segment at
    steps 2 and 4, a blank line and a line cut short by a kill."""
    lines = [
        _row(1, 5.0, 6.0, 1.0, 1.0, 1e-4),
        _row(2, 4.0, 5.5, 1.0, 1.0, 2e-4, val={"text": 4.5, "image": 5.9}),
        _row(3, 3.5, 5.0, 1.1, 0.9, 3e-4),
        _row(4, 3.0, 4.8, 1.2, 0.8, 4e-4, val={"text": 3.9, "image": 5.1}),
        {"resume": {"step": 2, "checkpoint": "step_00000002", "repeats_steps": [3, 4]}},
        _row(3, 3.4, 5.1, 1.1, 0.9, 3e-4),
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n\n"
    text += '{"step": 4, "losses": {"text": 2.9\n'  # killed mid-write
    text += json.dumps({"resume": {"step": 3, "checkpoint": "step_00000003",
                                   "repeats_steps": [4, 4]}}) + "\n"
    text += "\n".join(json.dumps(x) for x in (
        _row(4, 2.8, 4.7, 1.25, 0.75, 4e-4, val={"text": 3.7, "image": 5.0}),
        _row(5, 2.5, 4.5, 1.3, 0.7, 5e-4))) + "\n"
    save = tmp_path / "run"
    save.mkdir()
    (save / "losses.jsonl").write_text(text)
    return save


def test_read_history_keeps_the_last_line_per_step(run):
    h = plot.read_history(run)
    assert h.steps == [1, 2, 3, 4, 5]
    assert h.losses == {"text": [(1, 5.0), (2, 4.0), (3, 3.4), (4, 2.8), (5, 2.5)],
                        "image": [(1, 6.0), (2, 5.5), (3, 5.1), (4, 4.7), (5, 4.5)]}
    assert h.val == {"text": [(2, 4.5), (4, 3.7)], "image": [(2, 5.9), (4, 5.0)]}
    assert h.weights["text"] == [(1, 1.0), (2, 1.0), (3, 1.1), (4, 1.25), (5, 1.3)]
    assert h.weights["image"] == [(1, 1.0), (2, 1.0), (3, 0.9), (4, 0.75), (5, 0.7)]
    assert h.lr == [(1, 1e-4), (2, 2e-4), (3, 3e-4), (4, 4e-4), (5, 5e-4)]
    assert h.resumes == [2, 3] and h.bad_lines == 1


def test_a_resume_drops_the_abandoned_steps_not_written_again(tmp_path):
    rows = [_row(s, 10.0 - s, 9.0, 1.0, 1.0, 1e-3) for s in (1, 2, 3, 4)]
    rows.append({"resume": {"step": 1, "checkpoint": "step_00000001", "repeats_steps": [2, 4]}})
    rows.append(_row(2, 7.5, 8.0, 1.0, 1.0, 1e-3))
    path = tmp_path / "losses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    h = plot.read_history(path)
    assert h.steps == [1, 2] and h.losses["text"] == [(1, 9.0), (2, 7.5)]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_writes_a_png(run, tmp_path, capsys):
    assert plot.main([str(run)]) == 0
    out = run / "losses.png"
    assert f"wrote {out}" in capsys.readouterr().out
    assert _png_size(out) == (1200, 800)  # figsize 12 x 8 in at 100 dpi
    assert 20_000 < out.stat().st_size < 2_000_000
    other = tmp_path / "plots" / "curves.png"
    assert plot.main([str(run / "losses.jsonl"), "--out", str(other)]) == 0
    assert _png_size(other) == (1200, 800)


def test_plotted_lines_are_the_file_values(run, monkeypatch):
    """The series drawn are exactly those read (the figure, not only the reader)."""
    import matplotlib.figure

    drawn = {}
    save = matplotlib.figure.Figure.savefig

    def capture(fig, *a, **k):
        for ax in fig.axes:
            for line in ax.get_lines():
                if line.get_label().startswith("_"):  # resume markers (axvline), unlabelled
                    continue
                drawn[(ax.get_title(), line.get_label())] = (list(line.get_xdata()),
                                                             list(line.get_ydata()))
        return save(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    plot.plot_run(run)
    assert drawn[("training loss", "text")] == ([1, 2, 3, 4, 5], [5.0, 4.0, 3.4, 2.8, 2.5])
    assert drawn[("validation loss (dynamic balance)", "image")] == ([2, 4], [5.9, 5.0])
    assert drawn[("balance weight", "image")] == ([1, 2, 3, 4, 5], [1.0, 1.0, 0.9, 0.75, 0.7])


def test_cli_refuses_a_run_without_history(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "losses.jsonl" in capsys.readouterr().err
    (tmp_path / "losses.jsonl").write_text('{"resume": {"step": 0}}\n')
    assert plot.main([str(tmp_path)]) == 2
    assert "holds no step" in capsys.readouterr().err
