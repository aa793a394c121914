"""Run configuration: dataclasses, YAML loading with overrides, validation."""

from .loader import field_docs, from_dict, load_config, parse_overrides, to_dict
from .schema import (
                     AlignmentConfig,
                     AudioConfig,
                     ConfigError,
                     DataConfig,
                     LLMConfig,
                     ModelConfig,
                     OmniConfig,
                     ParallelConfig,
                     ProjectorConfig,
                     StageConfig,
                     TrainingConfig,
                     VisionConfig,
)
from .validate import llm_layers_per_stage, padded_vocab_size, validate

__all__ = [
    "AlignmentConfig",
    "AudioConfig",
    "ConfigError",
    "DataConfig",
    "LLMConfig",
    "ModelConfig",
    "OmniConfig",
    "ParallelConfig",
    "ProjectorConfig",
    "StageConfig",
    "TrainingConfig",
    "VisionConfig",
    "field_docs",
    "from_dict",
    "load_config",
    "parse_overrides",
    "to_dict",
    "validate",
    "llm_layers_per_stage",
    "padded_vocab_size",
]
