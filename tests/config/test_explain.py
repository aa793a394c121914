"""``python -m megatron_omni.config --explain``: every field of the schema with type, default and
docstring; one section or field; resolved values of a config next to the defaults; exit 2 with a
message for an unknown name or a bad config."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

from megatron_omni.config import OmniConfig, field_docs
from megatron_omni.config.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def schema_fields(cls=OmniConfig, prefix=""):
    """(dotted name, default, docstring) of every leaf field, read from the dataclasses
    themselves (defaults from ``dataclasses.fields``, not from an instance of the tool's)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from schema_fields(t, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield prefix + f.name, default, inspect.cleandoc(docs.get(f.name, ""))


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def field_lines(out: str) -> dict[str, str]:
    """dotted name -> the text after ': ' on its line (type = value ...)."""
    return dict(re.findall(r"^  ([a-z_]+(?:\.[a-z0-9_]+)+): (.+)$", out, flags=re.M))


def squash(text: str) -> str:
    return " ".join(text.split())


def test_every_field_with_default_and_docstring(capsys):
    rc, out, _ = run(capsys, "--explain")
    assert rc == 0
    lines = field_lines(out)
    fields = list(schema_fields())
    assert len(fields) > 100  # the whole schema, not a section of it
    flat = squash(out)
    for name, default, doc in fields:
        assert name in lines, f"{name} missing from --explain"
        assert lines[name].endswith("= " + json.dumps(default)), (name, lines[name])
        assert doc, f"{name} has no docstring in config/schema.py"
        assert squash(doc) in flat, f"docstring of {name} not printed in full"
    assert set(lines) == {n for n, _, _ in fields}
    # Types: Optional fields read "X | None".
    assert lines["training.save"].startswith("str | None = null")
    assert lines["model.llm.mrope_section"].startswith("list[int] = [2, 3, 3]")
    # Sections carry their own doc.
    assert "[model.llm]  (LLMConfig)" in out


def test_no_argument_explains_everything(capsys):
    assert run(capsys)[1] == run(capsys, "--explain")[1]


def test_one_section_and_one_field(capsys):
    rc, out, _ = run(capsys, "--explain", "model.llm")
    names = set(field_lines(out))
    assert rc == 0 and "model.llm.num_layers" in names and "model.llm.rope_scaling" in names
    assert all(n.startswith("model.llm.") for n in names)
    rc, out, _ = run(capsys, "--explain", "model")  # a section includes its subsections
    names = set(field_lines(out))
    assert {"model.vision.depth", "model.audio.num_blocks", "model.transformer_impl"} <= names
    assert not any(n.startswith("training.") for n in names)
    rc, out, _ = run(capsys, "--explain", "training.lr")
    assert rc == 0 and set(field_lines(out)) == {"training.lr"}
    assert "Peak learning rate." in out


def test_unknown_name_is_exit_2_with_a_suggestion(capsys):
    rc, out, err = run(capsys, "--explain", "modle.llm")
    assert rc == 2 and out == ""
    assert "unknown config section or field 'modle.llm'" in err and "model.llm" in err
    rc, _, err = run(capsys, "--explain", "nothing_like_it")
    assert rc == 2 and "sections:" in err and "training" in err


def test_resolved_values_next_to_defaults(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("base: %s\ntraining:\n  lr: 0.001\n" % (REPO / "examples/model/tiny_omni.yaml"))
    rc, out, _ = run(capsys, "--explain", "training", "--config", str(cfg),
                     "training.train_iters=7")
    assert rc == 0
    lines = field_lines(out)
    assert lines["training.lr"] == "float = 0.001   (default 0.0003)"
    assert lines["training.train_iters"] == "int = 7   (default 10)"
    assert lines["training.clip_grad"] == "float = 1.0"  # unchanged: no default shown
    assert "values from" in out and "training.train_iters=7" in out


def test_bad_config_is_exit_2(capsys, tmp_path):
    rc, _, err = run(capsys, "--config", str(tmp_path / "missing.yaml"))
    assert rc == 2 and "config error" in err and "does not exist" in err
    rc, _, err = run(capsys, "--explain", "training", "training.lr=-1")
    assert rc == 2 and "training.lr" in err


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "megatron_omni.config", "--explain", "stage.balance"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('  stage.balance: str = "none"')
    r = subprocess.run([sys.executable, "-m", "megatron_omni.config", "--explain", "stag"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "did you mean stage" in r.stderr
