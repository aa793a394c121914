"""megatron-omni: train M2-omni style omni-modal LLMs on Megatron Core."""

__version__ = "0.1.0"
