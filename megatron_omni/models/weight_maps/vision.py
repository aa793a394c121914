"""Weight map of the ViT (:mod:`megatron_omni.models.vision`): transformers' Qwen2-VL vision
tower <-> our ``VisionEncoder``.

Both sides are full (TP=1) tensors; :func:`shard_vision_state_dict` cuts ours per TP rank with
the rules of :mod:`.sharding` (no MLP of the ViT or merger is gated: :func:`gated`).

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

from typing import Mapping, Optional

import torch

from ...config.schema import VisionConfig
from .core import DictSource, Link, export_state, full_from_plans, key_problems, same_shape
from .sharding import from_te_layout, shard_tensor, unshard_tensor

__all__ = [
    "links",
    "gated",
    "QWEN2VL_PREFIX",
    "RELEASE_PREFIX",
    "expected_hf_vision_shapes",
    "hf_to_vision",
    "vision_to_hf",
    "vision_config_from_hf",
    "shard_vision_state_dict",
    "unshard_vision_state_dict",
]

QWEN2VL_PREFIX = "visual."
RELEASE_PREFIX = "vision_model."
IGNORED_HF = ("rotary_pos_emb.inv_freq",)  # non-persistent buffer some old checkpoints hold
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


def links(vision: VisionConfig, ours: str = "", hf: str = "") -> list[Link]:
    """Our ViT (``ours`` prefix: ``""`` for a ``VisionEncoder``, ``"vision_model."`` inside the
    omni model) <-> the Qwen2-VL tower under ``hf`` (``visual.``, ``model.visual.`` or the
    release's ``vision_model.``)."""
    out = []
    for hf_key, key in _key_map(vision.depth):
        if hf_key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            out.append(Link(ours + key, (hf + hf_key,), "vision_qkv", heads=vision.num_heads,
                            head_dim=vision.hidden_size // vision.num_heads))
        else:
            out.append(Link(ours + key, (hf + hf_key,)))
    return out




def gated(name: str) -> bool:
    """The TP split rule beyond megatron-core's column/row suffixes: no ViT or merger MLP is
    gated, so ``linear_fc1`` is split plainly along dim 0."""
    return False


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



def _check(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], where: str,
           vision: VisionConfig) -> None:
    problems = key_problems(state, expected, same_shape)
    if problems:
        raise ValueError(
            f"Qwen2-VL vision state dict ({where}) does not match model.vision (depth "
            f"{vision.depth}, width {vision.hidden_size}, heads {vision.num_heads}, mlp_ratio "
            f"{vision.mlp_ratio}): " + "; ".join(problems))


# --- whole state dicts (in memory; the streaming tool uses the same links) -----------------------

def hf_to_vision(state: Mapping[str, torch.Tensor], vision: VisionConfig,
                 out_hidden: Optional[int] = None, prefix: str = "") -> StateDict:
    """transformers Qwen2-VL vision tower (keys under ``prefix``) -> our full state dict.

    ``prefix``: ``""`` (a bare ``Qwen2VisionTransformerPretrainedModel``), ``"visual."``
    (Qwen2-VL) or ``"vision_model."`` (M2-omni release). ``out_hidden`` (the merger output width)
    is checked when given or set in ``vision.merger_hidden_size``.
    """
    ours = {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k.endswith(IGNORED_HF)}
    if prefix and not ours:
        raise ValueError(f"no keys start with {prefix!r}; is this a Qwen2-VL vision checkpoint? "
                         f"(first keys: {', '.join(list(state)[:5])})")
    _check(ours, expected_hf_vision_shapes(vision, out_hidden), f"prefix {prefix!r}", vision)
    return full_from_plans(links(vision), DictSource(ours, "Qwen2-VL vision state dict"))


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
    return export_state(links(vision, hf=prefix), ours)


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


# --- tensor parallelism ---------------------------------------------------------------------------

def shard_vision_state_dict(full: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int
                            ) -> StateDict:
    """This TP rank's part of our full state dict (sharding.py rules with :func:`gated`: the ViT
    MLP and the merger are not gated, so ``linear_fc1`` is split plainly along dim 0;
    row-parallel biases and all norms and the patch embedding are replicated)."""
    return {k: shard_tensor(k, v, tp_rank, tp_size, gated_mlp=gated) for k, v in full.items()}


def unshard_vision_state_dict(shards: list[Mapping[str, torch.Tensor]]) -> StateDict:
    """Inverse of :func:`shard_vision_state_dict` given every TP rank's state dict in order."""
    return {k: unshard_tensor(k, [s[k] for s in shards], gated_mlp=gated) for k in shards[0]}
