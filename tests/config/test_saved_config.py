"""The one reader of a checkpoint's saved run config (config.loader.parse_saved_config) and its
rule for keys this version does not know: an error under ``model``, a warning elsewhere."""

from __future__ import annotations

import logging

import pytest
import yaml

from megatron_omni.config import ConfigError, load_config, to_dict
from megatron_omni.config.loader import merge, parse_saved_config, read_config_file


def _saved(**extra) -> str:
    """The YAML save_checkpoint writes for a small config, with ``extra`` laid over it."""
    data = to_dict(load_config(None, ["model.llm.num_layers=2", "training.seed=11"]))
    return yaml.safe_dump(merge(data, extra), sort_keys=False)


def test_known_config_round_trips():
    text = _saved()
    saved = parse_saved_config(text, "ckpt/step_00000001")
    assert saved.unknown_keys() == []
    cfg = saved.config()
    assert cfg.model.llm.num_layers == 2 and cfg.training.seed == 11
    assert to_dict(cfg) == yaml.safe_load(text)
    assert saved.config(["training.seed=5"]).training.seed == 5
    assert saved.config({"training": {"seed": 6}}).training.seed == 6


def test_unknown_keys_outside_model_are_dropped_with_one_warning(caplog):
    text = _saved(training={"future_option": 3, "seed": 11},
                  data={"new_sampler": {"kind": "x"}}, wandb={"project": "p"})
    saved = parse_saved_config(text, "ckpt/step_00000001")
    assert saved.unknown_keys() == ["data.new_sampler", "training.future_option", "wandb"]
    with caplog.at_level(logging.WARNING, logger="megatron_omni.config.loader"):
        cfg = saved.config()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for key in ("ckpt/step_00000001", "data.new_sampler", "training.future_option", "wandb"):
        assert key in warnings[0]
    assert to_dict(cfg) == yaml.safe_load(_saved())  # the known part, unchanged
    # ... and the raw config keeps every key (e.g. for a LoRA scale the schema lost).
    assert saved.raw["training"]["future_option"] == 3 and saved.raw["wandb"] == {"project": "p"}


def test_unknown_model_keys_are_an_error_naming_them_all():
    text = _saved(model={"llm": {"future_norm": "x"}, "new_encoder": {"depth": 2}},
                  training={"future_option": 1})
    saved = parse_saved_config(text, "ckpt/step_00000007")
    with pytest.raises(ConfigError) as e:
        saved.config()
    msg = str(e.value)
    assert "ckpt/step_00000007" in msg
    assert "model.llm.future_norm" in msg and "model.new_encoder" in msg
    assert "training.future_option" not in msg  # only what blocks reading the weights
    # Values of known keys are checked as in any config.
    with pytest.raises(ConfigError, match="training.seed"):
        parse_saved_config(_saved(training={"seed": "eleven"}), "c").config()


@pytest.mark.parametrize("text, match", [
    (None, "holds no run config"),
    ("", "holds no run config"),
    ("model: [unclosed", "not valid YAML"),
    ("- a list", "not a mapping"),
])
def test_missing_or_broken_saved_config(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_saved_config(text, "ckpt/step_00000001")


def test_read_config_file_resolves_base_and_refuses_duplicates(tmp_path):
    (tmp_path / "base.yaml").write_text("training:\n  seed: 3\n  lr: 0.5\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\ntraining:\n  seed: 4\n")
    assert read_config_file(tmp_path / "run.yaml") == {"training": {"seed": 4, "lr": 0.5}}
    (tmp_path / "dup.yaml").write_text("training:\n  seed: 3\n  seed: 4\n")
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        read_config_file(tmp_path / "dup.yaml")
