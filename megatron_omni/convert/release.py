"""The M2-omni release layout: what the authors' inference code (GitHub
alipay/Ant-Multi-Modal-Framework, ``prj/M2_omni``, ``Bailing2NativeForConditionalGeneration``)
loads with ``from_pretrained``.

Keys (N = layer index)::

    vision_model.*                 transformers' Qwen2-VL vision tower names
    audio_model.encoder.*          FunASR SAN-M encoder names
    language_model.model.*         Llama names (embed_tokens, layers.N.self_attn.q_proj, ...)
    language_model.lm_head.weight
    linear_proj.{0,2,..}.*         vision projector (depth = mlp_depths)
    linear_proj_audio.{0,2,..}.*   audio projector (depth = mlp_depths too)

``config.json`` follows the release's config classes (``models/configuration_m2omni.py``:
``Bailing2Config``, ``Bailing2AudioConfig``; ``configuration_qwen2_vit.py``:
``Qwen2VLVisionConfig``; ``configuration_llama_3d.py``: ``Llama3dConfig``), which read only their
own field names:

* top level: ``model_type`` "bailing2", ``vision_type``, ``llm_type``, ``mlp_depths`` (the depth
  of BOTH projectors), ``num_query_token_audio`` (256), the other ``Bailing2Config`` fields at the
  release's defaults (LoRA off), the special-token ids and ``frame_patch_token`` (the video
  patch id, read by the release's forward on every call).
* ``llm_config``: Hugging Face Llama fields + ``llm_type`` "llama3_1_3d" and ``rope_scaling``
  ``{"type": "mrope", "mrope_section": [t, h, w]}``. The release turns type "mrope" into plain
  rotary frequencies: no llama3 scaling under M-RoPE, so :func:`release_config` refuses a model
  with ``model.llm.rope_scaling`` on (its ``save_pretrained`` writes the same dict with type
  "default", read the same way).
* ``vision_config``: Qwen2-VL vision fields (``depth``, ``embed_dim``, ``num_heads``, ...;
  ``hidden_size`` is the merger's output width = the vision projector's input).
* ``audio_config``: the release's ``audio_``-prefixed names (``audio_input_size``,
  ``audio_output_size``, ``audio_attention_heads``, ``audio_linear_units``, ``audio_num_blocks``,
  ``audio_kernel_size``, ``audio_sanm_shfit``, ``audio_normalize_before``, ``audio_compress`` =
  encoder frames per LLM token, ...). Reading also accepts FunASR ``encoder_conf`` names
  (``output_size``, ...), which files written before this format used.
* a ``megatron_omni`` block with what the release has no field for (base vocabulary, speech
  codebook, vocabulary padding); the release code ignores it. Releases without it are read by
  the rules in :func:`release_model_dict`.

Special-token ids: the release overwrites every id with its own table minus one for Llama-3.1/3.3
(``llm_type`` "llama3_1*"), i.e. ``<imagePatch>`` = 128267 ... for a 128256-token base, which is
exactly :mod:`megatron_omni.data.special_tokens` for that base. For another base vocabulary (the
tiny demo) the ids written here are ours, but the release code would use its fixed table instead:
:func:`release_config` warns.

The tensors: :func:`release_links` puts the weight maps of ``models/weight_maps`` (LLM, ViT,
SAN-M, projectors) under the release's prefixes; the streaming conversion tool reads and writes
through those links, and :func:`release_to_omni_state` / :func:`omni_to_release_state` apply the
same maps to whole state dicts (tests, and loading an exported release into a model with strict
key matching).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch

from ..config import OmniConfig, from_dict, parse_overrides, validate
from ..config.validate import padded_vocab_size
from ..data.special_tokens import NUM_SPECIAL, SPECIAL_TOKENS
from ..models.weight_maps import omni as omni_map
from ..models.weight_maps.core import ConversionError, Link

log = logging.getLogger(__name__)

MODEL_TYPE = "bailing2"
ARCHITECTURE = "Bailing2NativeForConditionalGeneration"
LLM_TYPE = "llama3_1_3d"
LLM_MODEL_TYPE = "llama_3d"
VISION_TYPE = "qwen2_vit"
LLM_PREFIX = "language_model."
VISION_PREFIX = "vision_model."
AUDIO_PREFIX = "audio_model.encoder."
PROJECTOR_PREFIXES = ("linear_proj.", "linear_proj_audio.")
FORMAT_VERSION = 2
"""2: the release's own audio field names, frame_patch_token, special-token ids one lower than
version 1 (which megatron-omni wrote before the ids were aligned with the release)."""

SPECIAL_TOKEN_FIELDS = {
    "image_patch_token": "<imagePatch>", "image_start_token": "<image>",
    "image_end_token": "</image>", "video_start_token": "<video>",
    "video_end_token": "</video>", "gen_image_patch_token": "<gen_imagePatch>",
    "gen_image_start_token": "<gen_image>", "gen_image_end_token": "</gen_image>",
    "end_of_audio_token": "<end_of_audio>", "audio_patch_token": "<audioPatch>",
    "audio_start_token": "<audio>", "audio_end_token": "</audio>",
    "gen_audio_patch_token": "<gen_audioPatch>", "gen_audio_start_token": "<gen_audio>",
    "gen_audio_end_token": "</gen_audio>",
}
"""The release config's special-token fields (its table) -> our token strings."""
FRAME_PATCH_FIELD = "frame_patch_token"
VIDEO_PATCH_TOKEN = "<videoPatch>"
LLAMA3_BASE_VOCAB = 128256
"""The base vocabulary the release's fixed id table is built for (Llama-3.1 / 3.3)."""

RELEASE_TOP_DEFAULTS = {
    "use_vit_lora": 0, "use_llm_lora": 0, "select_layer": -1, "num_query_token_image": 64,
    "num_query_token_video": 64, "num_decoder_image_token": 1024, "num_decoder_audio_token": 512,
}
"""``Bailing2Config`` fields megatron-omni has no counterpart for, at the release's defaults
(LoRA wrapping off: the weights are merged)."""
RELEASE_AUDIO_DEFAULTS = {
    "audio_encoder_type": "sanm", "audio_dropout_rate": 0.1, "audio_positional_dropout_rate": 0.1,
    "audio_attention_dropout_rate": 0.1, "audio_input_layer": "pe",
    "audio_pos_enc_class": "SinusoidalPositionEncoder", "audio_normalize_before": True,
    "audio_selfattention_layer_type": "sanm", "audio_chunk_size": [12], "audio_stride": [8],
    "audio_pad_left": [0],
}
"""``Bailing2AudioConfig`` fields that describe what our SAN-M always is (pre-norm, sinusoidal
positions added to the input, SAN-M self-attention; dropout only matters in training)."""
AUDIO_FIELDS = {  # our model.audio field -> (release name, FunASR encoder_conf name)
    "input_size": ("audio_input_size", "input_size"),
    "hidden_size": ("audio_output_size", "output_size"),
    "num_heads": ("audio_attention_heads", "attention_heads"),
    "ffn_hidden_size": ("audio_linear_units", "linear_units"),
    "num_blocks": ("audio_num_blocks", "num_blocks"),
    "kernel_size": ("audio_kernel_size", "kernel_size"),
    "sanm_shift": ("audio_sanm_shfit", "sanm_shfit"),
    "frames_per_token": ("audio_compress", None),
}

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


def check_release_expressible(cfg: OmniConfig) -> None:
    """Refuse (ConversionError) what the release's code cannot express, so it would load the
    export and compute something else."""
    m = cfg.model
    if m.llm.rope_scaling:
        raise ConversionError(
            "this checkpoint was trained with llama3 rope scaling on top of M-RoPE "
            "(model.llm.rope_scaling=true); the authors' release code runs M-RoPE with plain "
            "rotary frequencies and has no field for the scaling, so its logits would differ. "
            "Export the LLM alone with --format llama (it keeps the scaling), or train with "
            "model.llm.rope_scaling=false (docs/conversion.md)")
    if m.vision.enabled and m.audio.enabled and \
            m.projector.vision_depth != m.projector.audio_depth:
        raise ConversionError(
            f"model.projector.vision_depth ({m.projector.vision_depth}) and audio_depth "
            f"({m.projector.audio_depth}) differ; the release builds both projectors with one "
            f"depth (mlp_depths) and cannot load this model")


def release_config(cfg: OmniConfig, dtype: torch.dtype = torch.bfloat16,
                   token_ids: Optional[Mapping] = None) -> dict:
    """``config.json`` of the release layout for ``cfg``, in the field names and nesting of the
    release's config classes. ``token_ids``: the LLM's ``bos_token_id`` / ``eos_token_id`` /
    ``pad_token_id`` (from the imported Llama config; null when unknown). Raises
    ConversionError for what the release cannot express (:func:`check_release_expressible`)."""
    from ..models.omni import special_token_ids
    from ..models.vision import vision_out_hidden

    check_release_expressible(cfg)
    m = cfg.model
    sp = special_token_ids(cfg)
    if sp.base_vocab_size != LLAMA3_BASE_VOCAB:
        log.warning(
            "base vocabulary %d is not Llama-3's %d: the release code replaces the special-token "
            "ids of config.json with its fixed Llama-3 table (<imagePatch> = %d ...), so media "
            "placeholders of this model (<imagePatch> = %d) will not be found there; text-only "
            "inputs are unaffected", sp.base_vocab_size, LLAMA3_BASE_VOCAB,
            LLAMA3_BASE_VOCAB + SPECIAL_TOKENS.index("<imagePatch>"), sp.image_patch)
    ids = dict(token_ids or {})
    llm_config = {"model_type": LLM_MODEL_TYPE, "llm_type": LLM_TYPE, **llm_hf_fields(cfg),
                  "rope_scaling": {"type": "mrope", "mrope_section": list(m.llm.mrope_section)},
                  "initializer_range": m.llm.init_method_std, "pretraining_tp": 1,
                  "use_cache": True, "attention_dropout": 0.0,
                  **{k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    depth = m.projector.vision_depth if m.vision.enabled else m.projector.audio_depth
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "torch_dtype": dtype_name(dtype),
        "vision_type": VISION_TYPE,
        "llm_type": LLM_TYPE,
        "llm_config": llm_config,
        "mlp_depths": depth,
        "num_query_token_audio": m.audio.tokens_per_clip,
        **RELEASE_TOP_DEFAULTS,
    }
    if m.vision.enabled:
        v = m.vision
        out["vision_config"] = {
            "model_type": VISION_TYPE, "depth": v.depth, "embed_dim": v.hidden_size,
            "hidden_size": vision_out_hidden(cfg), "hidden_act": "quick_gelu",
            "mlp_ratio": v.mlp_ratio, "num_heads": v.num_heads, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
        }
    if m.audio.enabled:
        a = m.audio
        out["audio_config"] = {"model_type": MODEL_TYPE, **RELEASE_AUDIO_DEFAULTS,
                               **{theirs: getattr(a, ours)
                                  for ours, (theirs, _) in AUDIO_FIELDS.items()}}
    out.update({field: sp.id(tok) for field, tok in SPECIAL_TOKEN_FIELDS.items()})
    out[FRAME_PATCH_FIELD] = sp.video_patch
    out["megatron_omni"] = {
        "format_version": FORMAT_VERSION,
        "base_vocab_size": sp.base_vocab_size,
        "speech_codebook_size": m.speech_codebook_size,
        "make_vocab_size_divisible_by": m.llm.make_vocab_size_divisible_by,
    }
    return out


def _projector_depth(keys: Iterable[str], prefix: str) -> Optional[int]:
    idx = [int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.weight$",
                                                             k))]
    return max(idx) // 2 + 1 if idx else None


def _audio_value(ac: Mapping, ours: str, default=None):
    theirs, funasr = AUDIO_FIELDS[ours]
    for name in (theirs, funasr):
        if name is not None and name in ac:
            return ac[name]
    if default is None:
        raise ConversionError(f"release audio_config has neither {theirs!r}"
                              f"{f' nor {funasr!r}' if funasr else ''}")
    return default


def release_model_dict(config: Mapping, keys: Optional[Iterable[str]] = None,
                       codebook: Optional[int] = None) -> dict:
    """The ``model`` section (nested dict for :func:`from_dict`) described by a release
    ``config.json``. ``keys`` (the checkpoint's tensor names) give the projector depth when the
    config lacks ``mlp_depths``; ``codebook`` is the speech codebook size to assume when the
    config gives neither it nor the special-token ids."""
    from ..models.weight_maps.llm import llm_config_from_hf
    from ..models.weight_maps.vision import vision_config_from_hf

    if config.get("model_type") != MODEL_TYPE:
        raise ConversionError(f"not an M2-omni release config: model_type is "
                              f"{config.get('model_type')!r}, expected {MODEL_TYPE!r}")
    keys = list(keys) if keys is not None else None
    ours = config.get("megatron_omni") or {}
    if ours and int(ours.get("format_version", 1)) < 2:
        raise ConversionError(
            "this release was exported by an older megatron-omni (megatron_omni.format_version "
            f"{ours.get('format_version', 1)}): its special-token ids are one higher than the "
            "release's and than megatron-omni's now, and its audio_config uses FunASR names. "
            "Re-export the source checkpoint with the current tools/convert_checkpoint.py")
    llm_cfg = dict(config["llm_config"])
    rope = dict(llm_cfg.pop("rope_scaling", None) or {})
    llm = llm_config_from_hf(llm_cfg)
    llm_d = {f: getattr(llm, f) for f in LLM_DERIVED}
    if rope.get("mrope_section"):
        llm_d["mrope_section"] = list(rope["mrope_section"])
    # The release reads rope type "mrope" (and "default") as plain rotary frequencies; only an
    # explicit llama3 type would scale them.
    rope_type = rope.get("rope_type", rope.get("type"))
    llm_d["rope_scaling"] = rope_type == "llama3"
    if rope_type == "llama3":
        llm_d.update(rope_scaling_factor=float(rope.get("factor", 8.0)),
                     rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                     rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                     rope_original_max_position=int(
                         rope.get("original_max_position_embeddings", 8192)))
    elif rope_type not in (None, "mrope", "default"):
        raise ConversionError(f"release llm_config.rope_scaling type {rope_type!r} is not "
                              f"supported (mrope, default or llama3)")
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
    _check_token_ids(config, base)
    model: dict = {"llm": llm_d, "speech_codebook_size": book, "projector": {}}
    depth = config.get("mlp_depths") or (keys is not None and (
        _projector_depth(keys, "linear_proj.") or _projector_depth(keys, "linear_proj_audio.")))
    if depth:
        model["projector"] = {"vision_depth": int(depth), "audio_depth": int(depth)}
    if "vision_config" in config:
        vc = vision_config_from_hf(config["vision_config"])
        model["vision"] = {"enabled": True, "depth": vc.depth, "hidden_size": vc.hidden_size,
                           "num_heads": vc.num_heads, "mlp_ratio": vc.mlp_ratio,
                           "patch_size": vc.patch_size,
                           "temporal_patch_size": vc.temporal_patch_size,
                           "spatial_merge_size": vc.spatial_merge_size,
                           "in_channels": vc.in_channels,
                           "merger_hidden_size": vc.merger_hidden_size}
    else:
        model["vision"] = {"enabled": False}
    if "audio_config" in config:
        ac = config["audio_config"]
        model["audio"] = {"enabled": True,
                          "input_size": int(_audio_value(ac, "input_size", 560)),
                          "hidden_size": int(_audio_value(ac, "hidden_size")),
                          "num_heads": int(_audio_value(ac, "num_heads")),
                          "ffn_hidden_size": int(_audio_value(ac, "ffn_hidden_size")),
                          "num_blocks": int(_audio_value(ac, "num_blocks")),
                          "kernel_size": int(_audio_value(ac, "kernel_size", 11)),
                          "sanm_shift": int(_audio_value(ac, "sanm_shift", 0)),
                          "frames_per_token": int(_audio_value(ac, "frames_per_token", 3)),
                          "tokens_per_clip": int(config.get("num_query_token_audio", 256))}
        if ac.get("audio_normalize_before", ac.get("normalize_before", True)) is False:
            raise ConversionError("release audio_config has normalize_before false (post-norm "
                                  "SAN-M); megatron-omni's SAN-M is pre-norm")
    else:
        model["audio"] = {"enabled": False}
    return model


def _check_token_ids(config: Mapping, base: int) -> None:
    """The special-token ids a release config states must be ours for ``base`` (the release
    itself writes its table minus one, which is exactly that for a 128256-token base)."""
    wrong = [f"{field} = {config[field]} (ours {base + SPECIAL_TOKENS.index(tok)})"
             for field, tok in SPECIAL_TOKEN_FIELDS.items()
             if field in config and int(config[field]) != base + SPECIAL_TOKENS.index(tok)]
    if wrong:
        raise ConversionError(f"the release's special-token ids do not follow megatron-omni's "
                              f"layout for base vocabulary {base}: {', '.join(wrong)}")
    video = base + SPECIAL_TOKENS.index(VIDEO_PATCH_TOKEN)
    frame = config.get(FRAME_PATCH_FIELD)
    if frame is not None and int(frame) != video:
        log.warning("release frame_patch_token is %s; megatron-omni's <videoPatch> is %d: video "
                    "inputs must be tokenized with %d for the imported model", frame, video, video)


LLM_DERIVED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "vocab_size", "norm_epsilon", "rotary_base",
               "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
               "rope_high_freq_factor", "rope_original_max_position", "mrope_section",
               "max_position_embeddings", "untie_embeddings_and_output_weights")
"""The ``model.llm`` fields a Hugging Face Llama config determines."""


def release_token_ids(config: Mapping) -> dict:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of a release's ``llm_config``."""
    llm = config.get("llm_config") or {}
    return {k: llm[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in llm}


def omni_config_from_release(config: Union[Mapping, str, Path], overrides: Iterable[str] = (),
                             keys: Optional[Iterable[str]] = None) -> OmniConfig:
    """Our config from a release ``config.json`` (dict or path of the file or its directory),
    plus ``key=value`` overrides for everything the release does not describe."""
    if not isinstance(config, Mapping):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        config = json.loads(path.read_text())
    from ..config.loader import merge

    data = merge({"model": release_model_dict(config, keys)}, parse_overrides(overrides))
    cfg = from_dict(OmniConfig, data)
    validate(cfg)
    return cfg


# --- state dicts ---------------------------------------------------------------------------------

def release_links(cfg: OmniConfig) -> list[Link]:
    """Per-tensor links between our full omni state and the release keys (the omni weight map
    under the release's prefixes)."""
    return omni_map.links(cfg, llm_hf=LLM_PREFIX, vision_hf=VISION_PREFIX, audio_hf=AUDIO_PREFIX)


def release_to_omni_state(state: Mapping[str, torch.Tensor], cfg: OmniConfig,
                          tp: int = 1) -> dict[str, torch.Tensor]:
    """A release state dict -> our full omni state dict, through each part's weight map (strict:
    a key no part of ``cfg`` claims is an error, and each part checks its own keys)."""
    from ..models.omni import sanm_config
    from ..models.vision import vision_out_hidden
    from ..models.weight_maps.audio import sanm_from_release
    from ..models.weight_maps.llm import hf_to_megatron
    from ..models.weight_maps.vision import hf_to_vision

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
    """Our full omni state dict (TP=1 names) -> release keys, through each part's weight map."""
    from ..models.omni import sanm_config
    from ..models.vision import vision_out_hidden
    from ..models.weight_maps.audio import sanm_to_release
    from ..models.weight_maps.llm import megatron_to_hf
    from ..models.weight_maps.vision import vision_to_hf

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
    names so the weight maps' output loads with strict key matching). Creates a one-rank process
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

