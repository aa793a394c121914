"""Bad settings fail before any process group starts, with the setting's name and the fix:
value ranges, YAML syntax errors and duplicate keys, and the data-side checks (data path,
per-modality datasets and splits, vocabulary vs tokenizer, seq_length vs stored token counts)."""

import pytest
import torch
from tiny_data import corpus_texts, prepare_tiny_dataset

from megatron_omni.config import ConfigError, load_config
from megatron_omni.config.validate_data import validate_data
from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer


@pytest.mark.parametrize("override,name", [
    ("training.log_interval=0", "training.log_interval"),
    ("training.lr_warmup_iters=-1", "training.lr_warmup_iters"),
    ("training.clip_grad=-1.0", "training.clip_grad"),
    ("training.weight_decay=-0.1", "training.weight_decay"),
    ("training.save_interval=-5", "training.save_interval"),
    ("training.adam_beta1=1.0", "training.adam_beta1"),
    ("training.adam_beta2=-0.1", "training.adam_beta2"),
    ("training.adam_eps=0", "training.adam_eps"),
    ("training.on_dp_change=maybe", "training.on_dp_change"),
    ("parallel.distributed_timeout_minutes=0", "parallel.distributed_timeout_minutes"),
    ("data.modalities=[text,audio,text]", "data.modalities"),
])
def test_bad_value_names_the_setting(override, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_syntax_error_and_duplicate_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr: 1e-3\n  train_iters: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("training:\n  lr: 1.0e-3\n  save_interval: 10\n  lr: 1.0e-2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' at line 4 \(first at line 2\)"):
        load_config(dup)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    # audio has no val split (dynamic balance must refuse it)
    d = prepare_tiny_dataset(tmp_path_factory.mktemp("settings"), 5, seed=2,
                             num_val_per_modality=2, out_name="out",
                             splits={"text": ("train", "val"), "audio": ("train",)})
    d["out"] = d["prepared"]
    d["other"] = train_tiny_tokenizer(corpus_texts(d["raw"])[:20], 300, d["base"] / "other.json")
    return d


def _cfg(p, *extra):
    return load_config(None, [f"data.path={p['out']}", f"data.tokenizer={p['tok']}",
                              "model.speech_codebook_size=64",
                              f"model.llm.vocab_size={p['vocab']}", "data.modalities=[text]",
                              "data.seq_length=1024", *extra])


def test_good_data_settings_pass(prepared):
    assert validate_data(_cfg(prepared)).vocab_size == prepared["vocab"]


@pytest.mark.parametrize("extra,needle", [
    (["model.llm.vocab_size=493"], "set model.llm.vocab_size={vocab}"),
    (["data.path={out}/nowhere"], r"data.path=.*nowhere is not a directory"),
    (["data.modalities=[text,video]"], r"no prepared dataset for modality 'video'"),
    (["data.modalities=[text,audio]", "stage.balance=dynamic"],
     r"'audio' has no 'val' split"),
    (["data.seq_length=8"], r"data.seq_length=8 is shorter than every 'text' training sample "
                             r"\(5 samples"),
    (["data.tokenizer={other}", "model.llm.vocab_size={other_vocab}"],
     "preprocessed with another tokenizer"),
    (["data.tokenizer={out}/none.json"], r"data.tokenizer=.*none.json does not exist"),
    (["stage.balance=step", "stage.step_balance_file={out}/none.json"],
     "stage.step_balance_file=.*does not exist"),
])
def test_bad_data_settings_fail_before_the_process_group(prepared, monkeypatch, extra, needle):
    from megatron_omni.parallel import runtime
    from megatron_omni.training.trainer import Trainer

    fill = dict(out=prepared["out"], other=prepared["other"], vocab=prepared["vocab"],
                other_vocab=load_tokenizer(prepared["other"], speech_codebook_size=64).vocab_size)
    cfg = _cfg(prepared, *[e.format(**fill) for e in extra])

    def no_process_group(*a, **k):
        raise AssertionError("a process group was started before the data checks")

    monkeypatch.setattr(runtime, "initialize", no_process_group)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match=needle.format(**fill)):
        Trainer(cfg).setup()


def test_some_samples_too_long_is_a_warning_with_the_count(prepared, caplog):
    import json

    meta = json.loads((prepared["out"] / "text" / ".nv-meta" / "omni.json").read_text())
    counts = sorted(int(n) for n, c in meta["token_counts"]["train"].items() for _ in range(c))
    assert len(counts) == 5
    seq = counts[2]  # the two longest samples do not fit
    with caplog.at_level("WARNING"):
        validate_data(_cfg(prepared, f"data.seq_length={seq}"))
    over = sum(n > seq for n in counts)
    assert any(f"{over} of 5 'text' training samples are longer" in r.getMessage()
               for r in caplog.records)
