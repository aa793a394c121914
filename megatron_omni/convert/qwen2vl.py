"""Old import path of the ViT's weight map, kept for ``tools/*.py``: the map is
:mod:`megatron_omni.models.weight_maps.vision` (new code imports it from there)."""

from ..models.weight_maps.vision import (  # noqa: F401
    QWEN2VL_PREFIX,
    RELEASE_PREFIX,
    expected_hf_vision_shapes,
    from_te_layout,
    hf_to_vision,
    shard_vision_state_dict,
    to_te_layout,
    unshard_vision_state_dict,
    vision_config_from_hf,
    vision_to_hf,
)
