"""Config loading, overrides and validation messages (no process group is started)."""

import pytest

from megatron_omni.config import (
    ConfigError,
    LLMConfig,
    OmniConfig,
    field_docs,
    load_config,
    padded_vocab_size,
    parse_overrides,
    schema,
    validate,
)


def err(*overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, list(overrides))
    return str(e.value)


def test_overrides_nested_and_typed(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  llm:\n    num_layers: 4\ntraining:\n  lr: 1.0e-3\n")
    cfg = load_config(y, ["model.llm.num_layers=2", "training.min_lr=1e-5",
                          "parallel.virtual_pipeline_model_parallel_size=null"])
    assert cfg.model.llm.num_layers == 2 and cfg.training.lr == 1e-3
    assert cfg.training.min_lr == 1e-5
    assert parse_overrides(["a.b=[1,2]", "a.c=x"]) == {"a": {"b": [1, 2], "c": "x"}}


def test_base_inheritance(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  llm:\n    num_layers: 6\n    ffn_hidden_size: 96\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  llm:\n    num_layers: 3\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.model.llm.num_layers == 3 and cfg.model.llm.ffn_hidden_size == 96


def test_unknown_key_suggests():
    assert "did you mean parallel.tensor_model_parallel_size" in err(
        "parallel.tensor_model_paralel_size=2")


def test_wrong_type():
    assert "model.llm.num_layers must be an integer" in err("model.llm.num_layers=abc")
    assert "must be true or false" in err("parallel.sequence_parallel=3")


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tensor_model_parallel_size=8"],
     "model.llm.num_attention_heads (4) is not divisible by parallel.tensor_model_parallel_size"),
    (["parallel.tensor_model_parallel_size=4"],
     "model.llm.num_query_groups (2) is not divisible by parallel.tensor_model_parallel_size"),
    (["model.llm.num_layers=3", "parallel.pipeline_model_parallel_size=2"],
     "model.llm.num_layers (3) is not divisible by parallel.pipeline_model_parallel_size (2)"),
    (["model.llm.num_layers=4", "parallel.pipeline_model_parallel_size=2",
      "parallel.virtual_pipeline_model_parallel_size=4"],
     "not divisible by parallel.virtual_pipeline_model_parallel_size (4)"),
    (["parallel.virtual_pipeline_model_parallel_size=2"],
     "needs parallel.pipeline_model_parallel_size > 1"),
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
      "data.seq_length=33"],
     "data.seq_length (33) must be divisible by parallel.tensor_model_parallel_size (2)"),
    (["model.llm.mrope_section=[2,3,4]"], "sums to 9 but must sum to head_dim/2 = 8"),
    (["model.llm.num_layers=5", "parallel.pipeline_model_parallel_size=3",
      "parallel.first_stage_num_layers=2"], "do not divide over the other 2 pipeline stages"),
    (["parallel.sequence_parallel=true"], "sequence_parallel needs"),
    (["model.llm.num_query_groups=3"], "must be a multiple of model.llm.num_query_groups (3)"),
    (["training.fp8=hybrid", "model.transformer_impl=local"], "training.fp8 needs"),
    (["data.modalities=[text,smell]"], "unknown ['smell']"),
])
def test_invalid_combinations(overrides, message):
    assert message in err(*overrides)


def test_valid_mrope_passes_and_bad_sum_fails():
    load_config(None, ["model.llm.mrope_section=[4,2,2]"])  # sums to 8 = head_dim/2
    with pytest.raises(ConfigError, match=r"\(16, 24, 24\) for head_dim 128"):
        LLMConfig(hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                  mrope_section=[16, 24, 16])


def test_vocab_padding_multiple_of_128_tp():
    assert padded_vocab_size(132381, 128, 1) == 132480
    assert padded_vocab_size(132381, 128, 8) == 133120
    assert padded_vocab_size(132381, 128, 8) % (128 * 8) == 0
    assert padded_vocab_size(512, 128, 2) == 512


def test_world_size_divisibility():
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2"])
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by TP\\*PP\\*CP = 2"):
        validate(cfg, world_size=3)


def test_errors_are_collected_together():
    msg = err("parallel.tensor_model_parallel_size=8", "model.llm.num_layers=3",
              "parallel.pipeline_model_parallel_size=2")
    assert msg.count("\n  - ") >= 3


def test_every_field_has_a_docstring():
    classes = [c for c in vars(schema).values()
               if isinstance(c, type) and c.__module__ == schema.__name__
               and hasattr(c, "__dataclass_fields__")]
    assert OmniConfig in classes and len(classes) >= 9
    for cls in classes:
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if not docs.get(f, "").strip()]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
