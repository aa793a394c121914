"""The M2-omni release layout (``Bailing2NativeForConditionalGeneration``, M2OMNI.md section 6).

Keys (N = layer index)::

    vision_model.*                 transformers' Qwen2-VL vision tower names
    audio_model.encoder.*          FunASR SAN-M encoder names
    language_model.model.*         Llama names (embed_tokens, layers.N.self_attn.q_proj, ...)
    language_model.lm_head.weight
    linear_proj.{0,2,..}.*         vision projector (depth = mlp_depths)
    linear_proj_audio.{0,2,..}.*   audio projector

``config.json``: ``model_type`` "bailing2" with

* ``llm_config``: Hugging Face Llama fields + ``llm_type`` "llama3_1_3d" and ``rope_scaling``
  ``{"type": "mrope", "mrope_section": [t, h, w]}``; the Llama-3.1 frequency scaling that M-RoPE
  keeps is written into the same dict (``factor``, ``low_freq_factor``, ``high_freq_factor``,
  ``original_max_position_embeddings``). Reading a release without those fields: an
  ``llm_type`` starting with "llama3_1" means Llama-3.1's defaults (8, 1, 4, 8192).
* ``vision_config``: Qwen2-VL vision fields (``depth``, ``embed_dim``, ``num_heads``, ...;
  ``hidden_size`` is the merger's output width = the vision projector's input).
* ``audio_config``: FunASR ``encoder_conf`` fields (``input_size``, ``output_size``,
  ``attention_heads``, ``linear_units``, ``num_blocks``, ``kernel_size``, ``sanm_shfit``).
* ``mlp_depths`` (vision projector depth), ``num_query_token_audio`` (256), the special-token
  ids (``image_patch_token``, ``audio_patch_token``, ...), and a ``megatron_omni`` block with what
  the release format has no field for (base vocabulary, speech codebook, audio projector depth,
  audio frames per token). Releases without that block are read by the rules in
  :func:`omni_config_from_release`.

Two implementations of the state-dict mapping live side by side on purpose:
:func:`release_links` (per tensor, used by the streaming conversion tool) and
:func:`release_to_omni_state` / :func:`omni_to_release_state` (whole state dicts through the
adapters of :mod:`.llama`, :mod:`.qwen2vl` and :mod:`.sanm`), which the tests use as the
reference and to load an exported release into a model with strict key matching.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch

from ..config import OmniConfig, from_dict, parse_overrides, validate
from ..config.validate import padded_vocab_size
from ..data.special_tokens import NUM_SPECIAL, SPECIAL_TOKENS
from .param_map import (ConversionError, Link, llama_links, projector_links, sanm_links,
                        sanm_param_names, vision_links)

MODEL_TYPE = "bailing2"
ARCHITECTURE = "Bailing2NativeForConditionalGeneration"
LLM_PREFIX = "language_model."
VISION_PREFIX = "vision_model."
AUDIO_PREFIX = "audio_model.encoder."
PROJECTOR_PREFIXES = ("linear_proj.", "linear_proj_audio.")
FORMAT_VERSION = 1

SPECIAL_TOKEN_FIELDS = {
    "image_patch_token": "<imagePatch>", "image_start_token": "<image>",
    "image_end_token": "</image>", "video_patch_token": "<videoPatch>",
    "video_start_token": "<video>", "video_end_token": "</video>",
    "gen_image_patch_token": "<gen_imagePatch>", "gen_image_start_token": "<gen_image>",
    "gen_image_end_token": "</gen_image>", "end_of_audio_token": "<end_of_audio>",
    "audio_patch_token": "<audioPatch>", "audio_start_token": "<audio>",
    "audio_end_token": "</audio>", "gen_audio_patch_token": "<gen_audioPatch>",
    "gen_audio_start_token": "<gen_audio>", "gen_audio_end_token": "</gen_audio>",
}
LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# --- config --------------------------------------------------------------------------------------

def llm_hf_fields(cfg: OmniConfig) -> dict:
    """The Hugging Face Llama ``config.json`` fields of our LLM (no RoPE section)."""
    llm = cfg.model.llm
    return {
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.ffn_hidden_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_query_groups,
        "head_dim": llm.head_dim,
        "vocab_size": llm.vocab_size,
        "rms_norm_eps": llm.norm_epsilon,
        "rope_theta": llm.rotary_base,
        "max_position_embeddings": llm.max_position_embeddings,
        "tie_word_embeddings": not llm.untie_embeddings_and_output_weights,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def llama3_scaling(cfg: OmniConfig) -> Optional[dict]:
    llm = cfg.model.llm
    if not llm.rope_scaling:
        return None
    return {"factor": llm.rope_scaling_factor, "low_freq_factor": llm.rope_low_freq_factor,
            "high_freq_factor": llm.rope_high_freq_factor,
            "original_max_position_embeddings": llm.rope_original_max_position}


def release_config(cfg: OmniConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``config.json`` of the release layout for ``cfg``."""
    from ..models.omni import special_token_ids
    from ..models.vision import vision_out_hidden

    m = cfg.model
    sp = special_token_ids(cfg)
    rope = {"type": "mrope", "mrope_section": list(m.llm.mrope_section)}
    rope.update(llama3_scaling(cfg) or {})
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "torch_dtype": dtype_name(dtype),
        "llm_config": {"model_type": "llama", "llm_type": "llama3_1_3d", **llm_hf_fields(cfg),
                       "rope_scaling": rope},
        "mlp_depths": m.projector.vision_depth,
        "num_query_token_audio": m.audio.tokens_per_clip,
    }
    if m.vision.enabled:
        v = m.vision
        out["vision_config"] = {
            "model_type": "qwen2_vl", "depth": v.depth, "embed_dim": v.hidden_size,
            "num_heads": v.num_heads, "mlp_ratio": v.mlp_ratio,
            "hidden_size": vision_out_hidden(cfg), "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "in_channels": v.in_channels,
            "in_chans": v.in_channels, "hidden_act": "quick_gelu",
        }
    if m.audio.enabled:
        a = m.audio
        out["audio_config"] = {
            "encoder": "SANMEncoder", "input_size": a.input_size, "output_size": a.hidden_size,
            "attention_heads": a.num_heads, "linear_units": a.ffn_hidden_size,
            "num_blocks": a.num_blocks, "kernel_size": a.kernel_size, "sanm_shfit": a.sanm_shift,
            "normalize_before": True,
        }
    out.update({field: sp.id(tok) for field, tok in SPECIAL_TOKEN_FIELDS.items()})
    out["megatron_omni"] = {
        "format_version": FORMAT_VERSION,
        "base_vocab_size": sp.base_vocab_size,
        "speech_codebook_size": m.speech_codebook_size,
        "audio_mlp_depths": m.projector.audio_depth,
        "audio_frames_per_token": m.audio.frames_per_token,
        "make_vocab_size_divisible_by": m.llm.make_vocab_size_divisible_by,
    }
    return out


def _projector_depth(keys: Iterable[str], prefix: str) -> Optional[int]:
    idx = [int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.weight$",
                                                             k))]
    return max(idx) // 2 + 1 if idx else None


def release_model_dict(config: Mapping, keys: Optional[Iterable[str]] = None,
                       codebook: Optional[int] = None) -> dict:
    """The ``model`` section (nested dict for :func:`from_dict`) described by a release
    ``config.json``. ``keys`` (the checkpoint's tensor names) fill in projector depths when the
    config lacks them; ``codebook`` is the speech codebook size to assume when the config gives
    neither it nor the special-token ids."""
    from .llama import llm_config_from_hf
    from .qwen2vl import vision_config_from_hf

    if config.get("model_type") != MODEL_TYPE:
        raise ConversionError(f"not an M2-omni release config: model_type is "
                              f"{config.get('model_type')!r}, expected {MODEL_TYPE!r}")
    keys = list(keys) if keys is not None else None
    ours = config.get("megatron_omni") or {}
    llm_cfg = dict(config["llm_config"])
    rope = dict(llm_cfg.pop("rope_scaling", None) or {})
    llm = llm_config_from_hf(llm_cfg)
    llm_d = {f: getattr(llm, f) for f in LLM_DERIVED}
    if rope.get("mrope_section"):
        llm_d["mrope_section"] = list(rope["mrope_section"])
    scaling = {k: rope[k] for k in LLAMA31_SCALING if k in rope}
    if not scaling and str(llm_cfg.get("llm_type", "")).startswith("llama3_1"):
        scaling = dict(LLAMA31_SCALING)
    llm_d["rope_scaling"] = bool(scaling)
    if scaling:
        llm_d.update(rope_scaling_factor=float(scaling.get("factor", 8.0)),
                     rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                     rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                     rope_original_max_position=int(
                         scaling.get("original_max_position_embeddings", 8192)))
    if "make_vocab_size_divisible_by" in ours:
        llm_d["make_vocab_size_divisible_by"] = int(ours["make_vocab_size_divisible_by"])
    vocab = llm.vocab_size
    if "base_vocab_size" in ours:
        base = int(ours["base_vocab_size"])
        book = int(ours.get("speech_codebook_size", vocab - base - NUM_SPECIAL))
    elif "image_patch_token" in config:
        base = int(config["image_patch_token"]) - SPECIAL_TOKENS.index("<imagePatch>")
        book = vocab - base - NUM_SPECIAL
    else:
        book = 4096 if codebook is None else codebook
        base = vocab - NUM_SPECIAL - book
    if book < 0 or base < 1 or base + NUM_SPECIAL + book != vocab:
        raise ConversionError(
            f"cannot place the M2-omni special tokens in the release vocabulary of {vocab}: base "
            f"{base} + {NUM_SPECIAL} special + {book} speech codes; set "
            f"model.speech_codebook_size")
    model: dict = {"llm": llm_d, "speech_codebook_size": book, "projector": {}}
    vdepth = config.get("mlp_depths") or (keys is not None and _projector_depth(keys,
                                                                                "linear_proj."))
    adepth = ours.get("audio_mlp_depths") or (keys is not None and _projector_depth(
        keys, "linear_proj_audio."))
    if "vision_config" in config:
        vc = vision_config_from_hf(config["vision_config"])
        model["vision"] = {"enabled": True, "depth": vc.depth, "hidden_size": vc.hidden_size,
                           "num_heads": vc.num_heads, "mlp_ratio": vc.mlp_ratio,
                           "patch_size": vc.patch_size,
                           "temporal_patch_size": vc.temporal_patch_size,
                           "spatial_merge_size": vc.spatial_merge_size,
                           "in_channels": vc.in_channels,
                           "merger_hidden_size": vc.merger_hidden_size}
        if vdepth:
            model["projector"]["vision_depth"] = int(vdepth)
    else:
        model["vision"] = {"enabled": False}
    if "audio_config" in config:
        ac = config["audio_config"]
        model["audio"] = {"enabled": True, "input_size": ac.get("input_size", 560),
                          "hidden_size": ac["output_size"], "num_heads": ac["attention_heads"],
                          "ffn_hidden_size": ac["linear_units"], "num_blocks": ac["num_blocks"],
                          "kernel_size": ac.get("kernel_size", 11),
                          "sanm_shift": ac.get("sanm_shfit", ac.get("sanm_shift", 0)),
                          "tokens_per_clip": config.get("num_query_token_audio", 256)}
        if "audio_frames_per_token" in ours:
            model["audio"]["frames_per_token"] = int(ours["audio_frames_per_token"])
        if adepth:
            model["projector"]["audio_depth"] = int(adepth)
    else:
        model["audio"] = {"enabled": False}
    return model


LLM_DERIVED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "vocab_size", "norm_epsilon", "rotary_base",
               "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
               "rope_high_freq_factor", "rope_original_max_position", "mrope_section",
               "max_position_embeddings", "untie_embeddings_and_output_weights")
"""The ``model.llm`` fields a Hugging Face Llama config determines."""


def omni_config_from_release(config: Union[Mapping, str, Path], overrides: Iterable[str] = (),
                             keys: Optional[Iterable[str]] = None) -> OmniConfig:
    """Our config from a release ``config.json`` (dict or path of the file or its directory),
    plus ``key=value`` overrides for everything the release does not describe."""
    if not isinstance(config, Mapping):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        config = json.loads(path.read_text())
    from ..config.loader import _merge

    data = _merge({"model": release_model_dict(config, keys)}, parse_overrides(overrides))
    cfg = from_dict(OmniConfig, data)
    validate(cfg)
    return cfg


# --- state dicts ---------------------------------------------------------------------------------

def release_links(cfg: OmniConfig) -> list[Link]:
    """Per-tensor links between our full omni state and the release keys."""
    from ..models.omni import sanm_config

    m = cfg.model
    links = llama_links(m.llm, ours="llm.", hf=LLM_PREFIX)
    if m.vision.enabled:
        links += vision_links(m.vision, ours="vision_model.", hf=VISION_PREFIX)
        links += projector_links("linear_proj.", m.projector.vision_depth)
    if m.audio.enabled:
        links += sanm_links(sanm_param_names(sanm_config(cfg)), ours="audio_model.",
                            hf=AUDIO_PREFIX)
        links += projector_links("linear_proj_audio.", m.projector.audio_depth)
    return links


def release_to_omni_state(state: Mapping[str, torch.Tensor], cfg: OmniConfig,
                          tp: int = 1) -> dict[str, torch.Tensor]:
    """A release state dict -> our full omni state dict, through the adapters (strict: a key no
    part of ``cfg`` claims is an error)."""
    from ..models.omni import sanm_config
    from ..models.vision import vision_out_hidden
    from .llama import hf_to_megatron
    from .qwen2vl import hf_to_vision
    from .sanm import sanm_from_release

    m = cfg.model
    llm = {k[len(LLM_PREFIX):]: v for k, v in state.items() if k.startswith(LLM_PREFIX)}
    padded = padded_vocab_size(m.llm.vocab_size, m.llm.make_vocab_size_divisible_by, tp)
    full = {"llm." + k: v for k, v in hf_to_megatron(llm, m.llm, padded).items()}
    claimed = [LLM_PREFIX]
    if m.vision.enabled:
        full.update({"vision_model." + k: v for k, v in hf_to_vision(
            state, m.vision, vision_out_hidden(cfg), prefix=VISION_PREFIX).items()})
        claimed += [VISION_PREFIX, "linear_proj."]
    if m.audio.enabled:
        full.update({"audio_model." + k: v
                     for k, v in sanm_from_release(state, sanm_config(cfg)).items()})
        claimed += [AUDIO_PREFIX, "linear_proj_audio."]
    full.update({k: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIXES)
                 and k.startswith(tuple(claimed))})
    unknown = sorted(k for k in state if not k.startswith(tuple(claimed)))
    if unknown:
        raise ConversionError(f"release keys no enabled part of the model claims: "
                              f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return full


def omni_to_release_state(full: Mapping[str, torch.Tensor], cfg: OmniConfig
                          ) -> dict[str, torch.Tensor]:
    """Our full omni state dict (TP=1 names) -> release keys, through the adapters."""
    from ..models.omni import sanm_config
    from ..models.vision import vision_out_hidden
    from .llama import megatron_to_hf
    from .qwen2vl import vision_to_hf
    from .sanm import sanm_to_release

    m = cfg.model
    full = {k: v for k, v in full.items() if not k.endswith("_extra_state")}
    out = {LLM_PREFIX + k: v for k, v in megatron_to_hf(
        {k[4:]: v for k, v in full.items() if k.startswith("llm.")}, m.llm).items()}
    if m.vision.enabled:
        out.update(vision_to_hf({k[len("vision_model."):]: v for k, v in full.items()
                                 if k.startswith("vision_model.")}, m.vision,
                                vision_out_hidden(cfg), prefix=VISION_PREFIX))
    if m.audio.enabled:
        out.update(sanm_to_release({k[len("audio_model."):]: v for k, v in full.items()
                                    if k.startswith("audio_model.")}, sanm_config(cfg)))
    out.update({k: v for k, v in full.items() if k.startswith(PROJECTOR_PREFIXES)})
    return out


def build_model_from_release(config: Union[Mapping, str, Path], overrides: Iterable[str] = ()):
    """``(OmniModel, cfg)`` for a release ``config.json`` in this process (TP=PP=1, local layer
    names so the adapters' output loads with strict key matching). Creates a one-rank process
    group and megatron-core parallel state when none exists."""
    from ..models.omni import OmniModel
    from .checkpoint_io import ensure_single_rank_megatron

    cfg = omni_config_from_release(config, ["model.transformer_impl=local", *overrides])
    ensure_single_rank_megatron()
    return OmniModel(cfg), cfg


def load_release_into_model(model, state: Mapping[str, torch.Tensor], cfg: OmniConfig) -> None:
    """Load a release state dict into a TP=PP=1 ``OmniModel`` with strict key matching (no
    missing, no unexpected keys; megatron's ``_extra_state`` entries aside)."""
    full = release_to_omni_state(state, cfg)
    result = model.load_state_dict(full, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ConversionError(f"release does not match the model: missing {missing[:8]}, "
                              f"unexpected {result.unexpected_keys[:8]}")

