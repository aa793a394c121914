"""Weight map of the whole omni model (:mod:`megatron_omni.models.omni`): the part maps under the
omni model's prefixes, the projectors, and the TP / pipeline split of one omni model chunk.

Our prefixes: ``llm.`` (:mod:`.llm`), ``vision_model.`` (:mod:`.vision`), ``audio_model.``
(:mod:`.audio`), ``linear_proj.{0,2,..}`` / ``linear_proj_audio.{0,2,..}`` (the projectors:
``nn.Sequential`` of Linear / GELU / Linear ..., replicated over TP, same names in the release).
"""

from __future__ import annotations

import re
from typing import Optional

from ...config.schema import OmniConfig
from . import audio, llm, vision
from .core import Link
from .sharding import local_name, stage_state_dict

LLM, VISION, AUDIO = "llm.", "vision_model.", "audio_model."
PROJECTORS = ("linear_proj.", "linear_proj_audio.")

OMNI_FIRST_STAGE = ("llm.embedding.", VISION, AUDIO, *PROJECTORS)
"""Parts that live on the first pipeline stage only."""
OMNI_LAST_STAGE = ("llm.output_layer.", "llm.decoder.final_layernorm.")
"""Parts that live on the last pipeline stage only."""


def projector_links(prefix: str, depth: int, hf_prefix: Optional[str] = None) -> list[Link]:
    """``linear_proj.{0,2,..}`` / ``linear_proj_audio.{0,2,..}``: same names in the release."""
    hf_prefix = prefix if hf_prefix is None else hf_prefix
    out = []
    for j in range(depth):
        for p in ("weight", "bias"):
            out.append(Link(f"{prefix}{2 * j}.{p}", (f"{hf_prefix}{2 * j}.{p}",)))
    return out


def links(cfg: OmniConfig, llm_hf: str, vision_hf: str, audio_hf: str) -> list[Link]:
    """Every enabled part's links under our omni prefixes, the external ones under the given
    prefixes (the M2-omni release: ``language_model.``, ``vision_model.``,
    ``audio_model.encoder.``); projectors keep their names."""
    from ..omni import sanm_config

    m = cfg.model
    out = llm.links(m.llm, ours=LLM, hf=llm_hf)
    if m.vision.enabled:
        out += vision.links(m.vision, ours=VISION, hf=vision_hf)
        out += projector_links(PROJECTORS[0], m.projector.vision_depth)
    if m.audio.enabled:
        out += audio.links(sanm_config(cfg), ours=AUDIO, hf=audio_hf)
        out += projector_links(PROJECTORS[1], m.projector.audio_depth)
    return out


PART_MAPS = {LLM: llm, VISION: vision, AUDIO: audio}
"""Our prefix -> the map of the part under it (the projectors have none: plain copies)."""


def omni_gated(name: str) -> bool:
    """The TP split rule of the omni model: each part's ``gated`` under its prefix (only the
    LLM's MLPs are gated, SwiGLU ``[gate; up]``; the ViT and merger MLPs are plain)."""
    for prefix, part in PART_MAPS.items():
        if name.startswith(prefix):
            return part.gated(name[len(prefix):])
    return False


def omni_stage_state_dict(full: dict, tp_rank: int, tp_size: int, layer_offset: int,
                          num_layers: int, pre_process: bool, post_process: bool) -> dict:
    """This (TP rank, pipeline stage)'s part of a full omni state dict (or of its gradients)."""
    return stage_state_dict(full, tp_rank, tp_size, layer_offset, num_layers, pre_process,
                            post_process, gated_mlp=omni_gated,
                            first_stage_only=OMNI_FIRST_STAGE, last_stage_only=OMNI_LAST_STAGE,
                            layer_prefix="llm.decoder.")


_LLM_LAYER = re.compile(r"^llm\.decoder\.layers\.(\d+)\.")


def canonical_name(local: str, layer_offset: int = 0) -> str:
    """A model chunk's parameter name -> our full canonical name: Transformer Engine layer-norm
    names mapped to local-spec ones, LLM layer numbers made global (pipeline offset)."""
    name = local_name(local)
    m = _LLM_LAYER.match(name)
    if m and layer_offset:
        name = f"llm.decoder.layers.{int(m.group(1)) + layer_offset}.{name[m.end():]}"
    return name
