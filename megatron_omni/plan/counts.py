"""Parameter counts of the LLM, the ViT + merger, SAN-M and the projectors."""

from __future__ import annotations

from ..config.schema import OmniConfig
from ..config.validate import padded_vocab_size


def llm_layer_params(cfg: OmniConfig) -> tuple[int, int]:
    """(matmul params, norm params) of one LLM layer."""
    llm = cfg.model.llm
    h, f, d = llm.hidden_size, llm.ffn_hidden_size, llm.head_dim
    q_w, kv_w = llm.num_attention_heads * d, llm.num_query_groups * d
    return h * (q_w + 2 * kv_w) + q_w * h + 3 * h * f, 2 * h


def llm_num_params(cfg: OmniConfig, tp: int = 1) -> int:
    """All LLM parameters (embedding padded for ``tp``; output layer unless tied)."""
    llm = cfg.model.llm
    vp = padded_vocab_size(llm.vocab_size, llm.make_vocab_size_divisible_by, tp)
    lin, norms = llm_layer_params(cfg)
    head = vp * llm.hidden_size if llm.untie_embeddings_and_output_weights else 0
    return llm.num_layers * (lin + norms) + vp * llm.hidden_size + head + llm.hidden_size


def vit_params(cfg: OmniConfig) -> tuple[int, int]:
    """(tensor-parallel params, replicated params) of the ViT + merger."""
    v = cfg.model.vision
    if not v.enabled:
        return 0, 0
    w, f = v.hidden_size, int(v.hidden_size * v.mlp_ratio)
    out = v.merger_hidden_size or cfg.model.llm.hidden_size
    g = v.spatial_merge_size ** 2
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * w
    block_tp = 3 * w * w + 3 * w + w * w + w * f + f + f * w  # column biases shard with weights
    block_rep = 4 * w + w + w  # two LayerNorms, row-parallel biases (proj, fc2)
    merger_tp = (g * w) * (g * w) + g * w + (g * w) * out
    merger_rep = 2 * w + out
    return v.depth * block_tp + merger_tp, patch + v.depth * block_rep + merger_rep


def sanm_params(cfg: OmniConfig) -> int:
    """SAN-M encoder parameters (FunASR layout; ``encoders0`` takes the 560-dim input)."""
    a = cfg.model.audio
    if not a.enabled:
        return 0
    d, f, k = a.hidden_size, a.ffn_hidden_size, a.kernel_size

    def block(n_in: int) -> int:
        return (2 * n_in + n_in * 3 * d + 3 * d + d * k + d * d + d + 2 * d
                + d * f + f + f * d + d)

    return block(a.input_size) + (a.num_blocks - 1) * block(d) + 2 * d


def projector_params(in_features: int, hidden: int, depth: int) -> int:
    return in_features * hidden + hidden + (depth - 1) * (hidden * hidden + hidden)


def model_params(cfg: OmniConfig) -> dict[str, int]:
    """Parameters per part (TP=1)."""
    m = cfg.model
    h = m.llm.hidden_size
    vit_tp, vit_rep = vit_params(cfg)
    proj = 0
    if m.vision.enabled:
        proj += projector_params(m.vision.merger_hidden_size or h, h, m.projector.vision_depth)
    if m.audio.enabled:
        proj += projector_params(m.audio.frames_per_token * m.audio.hidden_size, h,
                                 m.projector.audio_depth)
    out = {"llm": llm_num_params(cfg), "vision": vit_tp + vit_rep, "audio": sanm_params(cfg),
           "projectors": proj}
    out["total"] = sum(out.values())
    return out
