"""State-dict adapter: transformers' Qwen2-VL vision tower <-> our ``VisionEncoder``.

Both sides are full (TP=1) tensors; :func:`shard_vision_state_dict` cuts ours per TP rank with
the rules of :mod:`megatron_omni.convert.sharding`.

Key map (HF without prefix -> ours):

==================================  ==========================================================
``patch_embed.proj.weight``         ``patch_embed.weight`` (same Conv3d shape)
``blocks.N.norm1.{weight,bias}``    ``transformer.layers.N.input_layernorm.*``
``blocks.N.attn.qkv.{weight,bias}`` ``transformer.layers.N.self_attention.linear_qkv.*``
                                    (rows reordered, see below)
``blocks.N.attn.proj.*``            ``transformer.layers.N.self_attention.linear_proj.*``
``blocks.N.norm2.*``                ``transformer.layers.N.pre_mlp_layernorm.*``
``blocks.N.mlp.fc1.* / fc2.*``      ``transformer.layers.N.mlp.linear_fc1.* / linear_fc2.*``
``merger.ln_q.*``                   ``merger.ln_q.*``
``merger.mlp.0.* / merger.mlp.2.*`` ``merger.linear_fc1.* / merger.linear_fc2.*``
==================================  ==========================================================

The fused qkv: HF stores ``[q (all heads); k (all heads); v (all heads)]``; megatron-core stores
it group-major, for multi-head attention one block per head ``[q_h; k_h; v_h]``, so that a
contiguous TP split hands every rank whole heads. Weights and biases are reordered alike.

Prefixes: Qwen2-VL checkpoints hold the tower under ``visual.`` (``model.visual.`` in newer
transformers), the M2-omni release under ``vision_model.``. With a prefix, keys outside it are
ignored (they belong to the LLM, audio, ...); every key inside it must be known, and every
expected key present with the expected shape, else a ``ValueError`` lists the offenders.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from ..config.schema import VisionConfig
from .keys import key_problems
from .sharding import shard_tensor, unshard_tensor

__all__ = [
    "QWEN2VL_PREFIX",
    "RELEASE_PREFIX",
    "expected_hf_vision_shapes",
    "hf_to_vision",
    "vision_to_hf",
    "vision_config_from_hf",
    "shard_vision_state_dict",
    "unshard_vision_state_dict",
    "to_te_layout",
    "from_te_layout",
]

QWEN2VL_PREFIX = "visual."
RELEASE_PREFIX = "vision_model."
_IGNORED_HF = ("rotary_pos_emb.inv_freq",)  # non-persistent buffer some old checkpoints hold
StateDict = dict[str, torch.Tensor]

_LAYER_MAP = (  # (HF name inside blocks.N., our name inside transformer.layers.N.)
    ("norm1.weight", "input_layernorm.weight"),
    ("norm1.bias", "input_layernorm.bias"),
    ("attn.qkv.weight", "self_attention.linear_qkv.weight"),
    ("attn.qkv.bias", "self_attention.linear_qkv.bias"),
    ("attn.proj.weight", "self_attention.linear_proj.weight"),
    ("attn.proj.bias", "self_attention.linear_proj.bias"),
    ("norm2.weight", "pre_mlp_layernorm.weight"),
    ("norm2.bias", "pre_mlp_layernorm.bias"),
    ("mlp.fc1.weight", "mlp.linear_fc1.weight"),
    ("mlp.fc1.bias", "mlp.linear_fc1.bias"),
    ("mlp.fc2.weight", "mlp.linear_fc2.weight"),
    ("mlp.fc2.bias", "mlp.linear_fc2.bias"),
)
_TOP_MAP = (
    ("patch_embed.proj.weight", "patch_embed.weight"),
    ("merger.ln_q.weight", "merger.ln_q.weight"),
    ("merger.ln_q.bias", "merger.ln_q.bias"),
    ("merger.mlp.0.weight", "merger.linear_fc1.weight"),
    ("merger.mlp.0.bias", "merger.linear_fc1.bias"),
    ("merger.mlp.2.weight", "merger.linear_fc2.weight"),
    ("merger.mlp.2.bias", "merger.linear_fc2.bias"),
)


def _key_map(depth: int) -> list[tuple[str, str]]:
    """(HF key, our key) pairs for a tower of ``depth`` blocks."""
    pairs = list(_TOP_MAP)
    for i in range(depth):
        pairs += [(f"blocks.{i}.{h}", f"transformer.layers.{i}.{m}") for h, m in _LAYER_MAP]
    return pairs


def expected_hf_vision_shapes(vision: VisionConfig, out_hidden: Optional[int] = None
                              ) -> dict[str, tuple]:
    """HF key (no prefix) -> shape. ``None`` entries in a shape are not checked (the merger's
    output width when ``out_hidden`` and ``vision.merger_hidden_size`` are both unset)."""
    w = vision.hidden_size
    f = int(vision.hidden_size * vision.mlp_ratio)
    m = w * vision.spatial_merge_size ** 2
    out = out_hidden or vision.merger_hidden_size
    shapes = {
        "patch_embed.proj.weight": (w, vision.in_channels, vision.temporal_patch_size,
                                    vision.patch_size, vision.patch_size),
        "merger.ln_q.weight": (w,), "merger.ln_q.bias": (w,),
        "merger.mlp.0.weight": (m, m), "merger.mlp.0.bias": (m,),
        "merger.mlp.2.weight": (out, m), "merger.mlp.2.bias": (out,),
    }
    per_layer = {
        "norm1.weight": (w,), "norm1.bias": (w,), "norm2.weight": (w,), "norm2.bias": (w,),
        "attn.qkv.weight": (3 * w, w), "attn.qkv.bias": (3 * w,),
        "attn.proj.weight": (w, w), "attn.proj.bias": (w,),
        "mlp.fc1.weight": (f, w), "mlp.fc1.bias": (f,),
        "mlp.fc2.weight": (w, f), "mlp.fc2.bias": (w,),
    }
    for i in range(vision.depth):
        shapes.update({f"blocks.{i}.{k}": s for k, s in per_layer.items()})
    return shapes



def _shape_ok(actual, expected) -> bool:
    return len(actual) == len(expected) and all(e is None or a == e
                                                 for a, e in zip(actual, expected))


def _check(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], where: str,
           vision: VisionConfig) -> None:
    problems = key_problems(state, expected, _shape_ok)
    if problems:
        raise ValueError(
            f"Qwen2-VL vision state dict ({where}) does not match model.vision (depth "
            f"{vision.depth}, width {vision.hidden_size}, heads {vision.num_heads}, mlp_ratio "
            f"{vision.mlp_ratio}): " + "; ".join(problems))


def _qkv_hf_to_mcore(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[3 * heads * d, ...]`` q|k|v-major -> head-major ``[heads, (q, k, v), d, ...]``."""
    rest = t.shape[1:]
    d = t.shape[0] // (3 * heads)
    return t.reshape(3, heads, d, *rest).transpose(0, 1).reshape(3 * heads * d, *rest)


def _qkv_mcore_to_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    d = t.shape[0] // (3 * heads)
    return t.reshape(heads, 3, d, *rest).transpose(0, 1).reshape(3 * heads * d, *rest)


def hf_to_vision(state: Mapping[str, torch.Tensor], vision: VisionConfig,
                 out_hidden: Optional[int] = None, prefix: str = "") -> StateDict:
    """transformers Qwen2-VL vision tower (keys under ``prefix``) -> our full state dict.

    ``prefix``: ``""`` (a bare ``Qwen2VisionTransformerPretrainedModel``), ``"visual."``
    (Qwen2-VL) or ``"vision_model."`` (M2-omni release). ``out_hidden`` (the merger output width)
    is checked when given or set in ``vision.merger_hidden_size``.
    """
    ours = {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k.endswith(_IGNORED_HF)}
    if prefix and not ours:
        raise ValueError(f"no keys start with {prefix!r}; is this a Qwen2-VL vision checkpoint? "
                         f"(first keys: {', '.join(list(state)[:5])})")
    _check(ours, expected_hf_vision_shapes(vision, out_hidden), f"prefix {prefix!r}", vision)
    out = {}
    for hf_key, key in _key_map(vision.depth):
        t = ours[hf_key]
        if hf_key.endswith("attn.qkv.weight") or hf_key.endswith("attn.qkv.bias"):
            t = _qkv_hf_to_mcore(t, vision.num_heads)
        out[key] = t
    return out


def _expected_ours(vision: VisionConfig, out_hidden: Optional[int]) -> dict[str, tuple]:
    hf = expected_hf_vision_shapes(vision, out_hidden)
    return {key: hf[hf_key] for hf_key, key in _key_map(vision.depth)}


def vision_to_hf(state: Mapping[str, torch.Tensor], vision: VisionConfig,
                 out_hidden: Optional[int] = None, prefix: str = "") -> StateDict:
    """Our full (TP=1, local-spec names) state dict -> transformers keys under ``prefix``.

    Transformer Engine ``_extra_state`` entries (FP8 metadata) are dropped; TE layer-norm names
    are accepted (see :func:`from_te_layout`).
    """
    ours = from_te_layout({k: v for k, v in state.items() if not k.endswith("_extra_state")})
    _check(ours, _expected_ours(vision, out_hidden), "megatron-omni", vision)
    out = {}
    for hf_key, key in _key_map(vision.depth):
        t = ours[key]
        if hf_key.endswith("attn.qkv.weight") or hf_key.endswith("attn.qkv.bias"):
            t = _qkv_mcore_to_hf(t, vision.num_heads)
        out[prefix + hf_key] = t.contiguous()
    return out


def vision_config_from_hf(hf_config: Mapping) -> VisionConfig:
    """``model.vision`` from a transformers ``Qwen2VLVisionConfig`` dict (or the release's
    ``vision_config``). The HF ``hidden_size`` is the merger's output width."""
    return VisionConfig(
        depth=hf_config["depth"],
        hidden_size=hf_config["embed_dim"],
        num_heads=hf_config["num_heads"],
        mlp_ratio=float(hf_config.get("mlp_ratio", 4.0)),
        patch_size=hf_config.get("patch_size", 14),
        temporal_patch_size=hf_config.get("temporal_patch_size", 2),
        spatial_merge_size=hf_config.get("spatial_merge_size", 2),
        in_channels=hf_config.get("in_channels", hf_config.get("in_chans", 3)),
        merger_hidden_size=hf_config.get("hidden_size"),
    )


# --- tensor parallelism and layer-implementation names ------------------------------------------

def _never_gated(name: str) -> bool:
    return False


def shard_vision_state_dict(full: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int
                            ) -> StateDict:
    """This TP rank's part of our full state dict (sharding.py rules; the ViT MLP and the merger
    are not gated, so ``linear_fc1`` is split plainly along dim 0; row-parallel biases and all
    norms and the patch embedding are replicated)."""
    return {k: shard_tensor(k, v, tp_rank, tp_size, gated_mlp=_never_gated)
            for k, v in full.items()}


def unshard_vision_state_dict(shards: list[Mapping[str, torch.Tensor]]) -> StateDict:
    """Inverse of :func:`shard_vision_state_dict` given every TP rank's state dict in order."""
    return {k: unshard_tensor(k, [s[k] for s in shards], gated_mlp=_never_gated)
            for k in shards[0]}


# Transformer Engine layers fuse the pre-attention / pre-MLP LayerNorm into linear_qkv /
# linear_fc1 (same map as megatron-core's local spec ``sharded_state_dict_keys_map``).
_TE_NAMES = (
    (re.compile(r"(layers\.\d+\.)input_layernorm\.(weight|bias)$"),
     r"\1self_attention.linear_qkv.layer_norm_\2"),
    (re.compile(r"(layers\.\d+\.)pre_mlp_layernorm\.(weight|bias)$"),
     r"\1mlp.linear_fc1.layer_norm_\2"),
)
_LOCAL_NAMES = (
    (re.compile(r"(layers\.\d+\.)self_attention\.linear_qkv\.layer_norm_(weight|bias)$"),
     r"\1input_layernorm.\2"),
    (re.compile(r"(layers\.\d+\.)mlp\.linear_fc1\.layer_norm_(weight|bias)$"),
     r"\1pre_mlp_layernorm.\2"),
)


def _rename(state: Mapping[str, torch.Tensor], rules) -> StateDict:
    out = {}
    for k, v in state.items():
        for pattern, repl in rules:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def to_te_layout(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Local-spec names -> Transformer Engine spec names (fused layer norms)."""
    return _rename(state, _TE_NAMES)


def from_te_layout(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Transformer Engine spec names -> local-spec names (identity on local names)."""
    return _rename(state, _LOCAL_NAMES)
