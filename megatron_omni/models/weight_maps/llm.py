"""Weight map of the LLM (:mod:`megatron_omni.models.llm`): Hugging Face Llama
(``LlamaForCausalLM``) <-> our megatron-core GPTModel.

Key map (HF without prefix -> ours, N = layer):

=========================================  ================================================
``model.embed_tokens.weight``              ``embedding.word_embeddings.weight`` (``vocab``)
``model.layers.N.input_layernorm.weight``  ``decoder.layers.N.input_layernorm.weight``
``...self_attn.{q,k,v}_proj.weight``       ``...self_attention.linear_qkv.weight``
                                           (``llama_qkv``: group-major, see below)
``...self_attn.o_proj.weight``             ``...self_attention.linear_proj.weight``
``...post_attention_layernorm.weight``     ``...pre_mlp_layernorm.weight``
``...mlp.{gate,up}_proj.weight``           ``...mlp.linear_fc1.weight`` (``gate_up``)
``...mlp.down_proj.weight``                ``...mlp.linear_fc2.weight``
``model.norm.weight``                      ``decoder.final_layernorm.weight``
``lm_head.weight``                         ``output_layer.weight`` (``vocab``; untied only)
=========================================  ================================================

The fused QKV of megatron-core is group-major: for each of the ``G`` KV groups, its ``heads/G``
query heads, then its key head, then its value head, so a contiguous TP split hands every rank
whole groups. ``linear_fc1`` is ``[gate; up]``: gated (:func:`gated`), split per half over TP.
The embedding and output rows are padded to the TP-divisible vocabulary with zeros; rows the HF
checkpoint lacks (special tokens, speech codes) start as the mean of its rows.

HF names are given without a prefix (``model.layers.0...``, ``lm_head.weight``); :func:`links`
takes the prefixes (``language_model.`` in the M2-omni release, ``llm.`` on our side).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch

from ...config.schema import LLMConfig
from .core import DictSource, Link, export_state, full_from_plans
from .sharding import GATED_SUFFIXES

IGNORED_HF = ("rotary_emb.inv_freq",)
"""Non-persistent buffers some old checkpoints hold; never ours."""


def links(llm: LLMConfig, ours: str = "", hf: str = "") -> list[Link]:
    """Our LLM (``ours`` prefix: ``""`` for an ``OmniLLM``, ``"llm."`` inside the omni model) <->
    a Hugging Face Llama (``hf`` prefix: ``""`` for a ``LlamaForCausalLM``, ``"language_model."``
    in the M2-omni release)."""
    H, G, d, V = llm.num_attention_heads, llm.num_query_groups, llm.head_dim, llm.vocab_size
    out = [Link(f"{ours}embedding.word_embeddings.weight", (f"{hf}model.embed_tokens.weight",),
                "vocab", vocab=V)]
    for i in range(llm.num_layers):
        h, m = f"{hf}model.layers.{i}.", f"{ours}decoder.layers.{i}."
        out += [
            Link(m + "input_layernorm.weight", (h + "input_layernorm.weight",)),
            Link(m + "self_attention.linear_qkv.weight",
                 (h + "self_attn.q_proj.weight", h + "self_attn.k_proj.weight",
                  h + "self_attn.v_proj.weight"), "llama_qkv", heads=H, groups=G, head_dim=d),
            Link(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",)),
            Link(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)),
            Link(m + "mlp.linear_fc1.weight",
                 (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "gate_up"),
            Link(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",)),
        ]
    out.append(Link(f"{ours}decoder.final_layernorm.weight", (f"{hf}model.norm.weight",)))
    if llm.untie_embeddings_and_output_weights:
        out.append(Link(f"{ours}output_layer.weight", (f"{hf}lm_head.weight",), "vocab", vocab=V))
    return out




def gated(name: str) -> bool:
    """The TP split rule beyond megatron-core's column/row suffixes: every Llama MLP is SwiGLU,
    so ``linear_fc1`` (and its LoRA ``B``) holds ``[gate; up]`` and is split per half."""
    return name.endswith(GATED_SUFFIXES)


def expected_hf_shapes(llm: LLMConfig) -> dict[str, tuple]:
    """HF key (no prefix) -> shape; ``None`` (the vocabulary rows) is not checked."""
    h, f, d = llm.hidden_size, llm.ffn_hidden_size, llm.head_dim
    out = {"model.embed_tokens.weight": (None, h), "model.norm.weight": (h,)}
    if llm.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = (None, h)
    for i in range(llm.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (llm.num_attention_heads * d, h),
                    p + "self_attn.k_proj.weight": (llm.num_query_groups * d, h),
                    p + "self_attn.v_proj.weight": (llm.num_query_groups * d, h),
                    p + "self_attn.o_proj.weight": (h, llm.num_attention_heads * d),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
    return out


# --- whole state dicts (in memory; the streaming tool uses the same links) -----------------------

def hf_to_megatron(hf: Mapping[str, torch.Tensor], llm: LLMConfig, padded_vocab: int
                   ) -> dict[str, torch.Tensor]:
    """Full megatron-core state dict from a HF Llama state dict (checks every key is used)."""
    lk = links(llm)
    needed = [k for link in lk for k in link.hf]
    if llm.untie_embeddings_and_output_weights and "lm_head.weight" not in hf:
        raise KeyError("Hugging Face checkpoint has tied embeddings (no lm_head.weight) but "
                       "model.llm.untie_embeddings_and_output_weights is true")
    for k in needed:
        if k not in hf:
            raise KeyError(f"Hugging Face Llama checkpoint lacks {k!r}")
    used = set(needed)
    extra = [k for k in hf if k not in used and not k.endswith(IGNORED_HF)]
    if extra:
        raise KeyError(f"unexpected keys in the Hugging Face Llama checkpoint: {extra[:8]}"
                       f"{' ...' if len(extra) > 8 else ''}")
    if hf["model.embed_tokens.weight"].shape[0] > padded_vocab:
        raise ValueError(f"vocabulary {hf['model.embed_tokens.weight'].shape[0]} is larger than "
                         f"the padded size {padded_vocab}")
    # Rows past the checkpoint's vocabulary are zero padding here (the importer's vocab links
    # instead start new tokens at the mean row: it extends a plain Llama deliberately).
    lk = [replace(link, vocab=hf[link.hf[0]].shape[0]) if link.kind == "vocab" else link
          for link in lk]
    rows = {link.ours: padded_vocab for link in lk if link.kind == "vocab"}
    return full_from_plans(lk, DictSource(hf, "Hugging Face Llama checkpoint"), rows)


def megatron_to_hf(mg: Mapping[str, torch.Tensor], llm: LLMConfig
                   ) -> dict[str, torch.Tensor]:
    """HF Llama state dict from a full megatron-core state dict (vocab padding removed)."""
    return export_state(links(llm), mg)


# --- config --------------------------------------------------------------------------------------

def llm_config_from_hf(hf_config: Mapping) -> LLMConfig:
    """Our LLMConfig from a HF Llama ``config.json`` dict (mrope sections scaled to head_dim)."""
    heads = hf_config["num_attention_heads"]
    hidden = hf_config["hidden_size"]
    head_dim = hf_config.get("head_dim") or hidden // heads
    rs = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    rope_type = rs.get("rope_type", rs.get("type"))
    half = head_dim // 2
    t = half // 4
    hw = (half - t) // 2
    section = [half - 2 * hw, hw, hw]  # (16, 24, 24) for head_dim 128
    return LLMConfig(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads", heads),
        kv_channels=head_dim,
        vocab_size=hf_config["vocab_size"],
        norm_epsilon=hf_config.get("rms_norm_eps", 1e-5),
        rotary_base=float(hf_config.get("rope_theta", rs.get("rope_theta", 10000.0))),
        rope_scaling=rope_type == "llama3",
        rope_scaling_factor=float(rs.get("factor", 8.0)),
        rope_low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
        mrope_section=section,
        max_position_embeddings=hf_config.get("max_position_embeddings", 131072),
        untie_embeddings_and_output_weights=not hf_config.get("tie_word_embeddings", False),
    )
