"""State-dict adapter: Hugging Face Llama (``LlamaForCausalLM``) <-> our megatron-core LLM.

Works on full (TP=1, PP=1) tensors; :mod:`megatron_omni.convert.sharding` splits them per
TP/PP rank and joins them back. The fused QKV layout of megatron-core is group-major: for each of
the ``G`` KV groups, its ``heads/G`` query heads, then its key head, then its value head.

HF names are given without a prefix (``model.layers.0...``, ``lm_head.weight``); callers add the
release prefix (``language_model.``) when needed.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..config.schema import LLMConfig


def _qkv_fuse(q, k, v, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    hidden = q.shape[1]
    per = heads // groups
    q = q.view(groups, per * head_dim, hidden)
    k = k.view(groups, head_dim, hidden)
    v = v.view(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def _qkv_split(qkv, heads: int, groups: int, head_dim: int):
    hidden = qkv.shape[1]
    per = heads // groups
    qkv = qkv.view(groups, (per + 2) * head_dim, hidden)
    q, k, v = torch.split(qkv, [per * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden))


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] > padded:
        raise ValueError(f"vocabulary {t.shape[0]} is larger than the padded size {padded}")
    if t.shape[0] == padded:
        return t
    pad = t.new_zeros(padded - t.shape[0], t.shape[1])
    return torch.cat([t, pad], 0)


def hf_to_megatron(hf: Mapping[str, torch.Tensor], llm: LLMConfig, padded_vocab: int
                   ) -> dict[str, torch.Tensor]:
    """Full megatron-core state dict from a HF Llama state dict (checks every key is used)."""
    heads, groups, d = llm.num_attention_heads, llm.num_query_groups, llm.head_dim
    used = set()

    def take(k):
        if k not in hf:
            raise KeyError(f"Hugging Face Llama checkpoint lacks {k!r}")
        used.add(k)
        return hf[k]

    out = {"embedding.word_embeddings.weight": _pad_vocab(take("model.embed_tokens.weight"),
                                                           padded_vocab)}
    for i in range(llm.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = take(h + "input_layernorm.weight")
        out[m + "self_attention.linear_qkv.weight"] = _qkv_fuse(
            take(h + "self_attn.q_proj.weight"), take(h + "self_attn.k_proj.weight"),
            take(h + "self_attn.v_proj.weight"), heads, groups, d)
        out[m + "self_attention.linear_proj.weight"] = take(h + "self_attn.o_proj.weight")
        out[m + "pre_mlp_layernorm.weight"] = take(h + "post_attention_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")], 0)
        out[m + "mlp.linear_fc2.weight"] = take(h + "mlp.down_proj.weight")
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if llm.untie_embeddings_and_output_weights:
        head = hf.get("lm_head.weight")
        if head is None:
            raise KeyError("Hugging Face checkpoint has tied embeddings (no lm_head.weight) but "
                           "model.llm.untie_embeddings_and_output_weights is true")
        used.add("lm_head.weight")
        out["output_layer.weight"] = _pad_vocab(head, padded_vocab)
    extra = [k for k in hf if k not in used and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise KeyError(f"unexpected keys in the Hugging Face Llama checkpoint: {extra[:8]}"
                       f"{' ...' if len(extra) > 8 else ''}")
    return out


def megatron_to_hf(mg: Mapping[str, torch.Tensor], llm: LLMConfig
                   ) -> dict[str, torch.Tensor]:
    """HF Llama state dict from a full megatron-core state dict (vocab padding removed)."""
    heads, groups, d = llm.num_attention_heads, llm.num_query_groups, llm.head_dim
    vocab = llm.vocab_size
    out = {"model.embed_tokens.weight": mg["embedding.word_embeddings.weight"][:vocab]}
    for i in range(llm.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[h + "input_layernorm.weight"] = mg[m + "input_layernorm.weight"]
        q, k, v = _qkv_split(mg[m + "self_attention.linear_qkv.weight"], heads, groups, d)
        out[h + "self_attn.q_proj.weight"] = q
        out[h + "self_attn.k_proj.weight"] = k
        out[h + "self_attn.v_proj.weight"] = v
        out[h + "self_attn.o_proj.weight"] = mg[m + "self_attention.linear_proj.weight"]
        out[h + "post_attention_layernorm.weight"] = mg[m + "pre_mlp_layernorm.weight"]
        gate, up = mg[m + "mlp.linear_fc1.weight"].chunk(2, 0)
        out[h + "mlp.gate_proj.weight"] = gate
        out[h + "mlp.up_proj.weight"] = up
        out[h + "mlp.down_proj.weight"] = mg[m + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = mg["decoder.final_layernorm.weight"]
    if llm.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = mg["output_layer.weight"][:vocab]
    return {k: v.contiguous() for k, v in out.items()}


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
