"""Old import path of the LLM's weight map, kept for ``tools/*.py``: the map is
:mod:`megatron_omni.models.weight_maps.llm` (new code imports it from there)."""

from ..models.weight_maps.llm import (  # noqa: F401
    hf_to_megatron,
    llama_links,
    llm_config_from_hf,
    megatron_to_hf,
)
