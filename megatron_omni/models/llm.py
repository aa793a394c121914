"""The shared LLM: Llama-3 (RMSNorm, SwiGLU, GQA, no biases, untied embeddings) with M-RoPE.

Base: ``megatron.core.models.gpt.GPTModel`` (megatron-core 0.16.1). It is the one megatron-core
model that has ``position_embedding_type="mrope"`` (3-row positions, Qwen2-VL sections), pipeline
placement flags and distributed checkpointing. Newer megatron-core releases mark GPTModel
deprecated in favour of HybridModel, which has no M-RoPE, so the rest of megatron-omni talks to
:class:`OmniLLM` only; swapping the base later changes this file, not its callers.

What we add on top of GPTModel:

* optional Llama-3.1 rope-frequency scaling of the M-RoPE frequencies (``model.llm.rope_scaling``,
  off by default: the authors' release runs unscaled M-RoPE; megatron-core applies the scaling
  only to 1-D RoPE);
* 1-D position ids accepted and broadcast to the 3 M-RoPE rows (text-only batches);
* packed rows: THD ``PackedSeqParams`` whose segments restart positions, checked for shape.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config.schema import LLMConfig, OmniConfig
from ..config.validate import padded_vocab_size
from .specs import llm_block_spec, resolve_transformer_impl


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                           high_freq_factor: float, original_max_position: int) -> torch.Tensor:
    """Llama-3.1 rope scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth
    interpolation in between (the rule of Meta's reference implementation)."""
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor -
                                                                    low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def llm_transformer_config(cfg: OmniConfig, **overrides) -> TransformerConfig:
    """megatron-core TransformerConfig for the LLM of ``cfg``."""
    llm, par, tr = cfg.model.llm, cfg.parallel, cfg.training
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if tr.bf16 else torch.float32  # bf16 runs on the CPU too
    kwargs = dict(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        ffn_hidden_size=llm.ffn_hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_query_groups,
        kv_channels=llm.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=llm.init_method_std,
        mrope_section=list(llm.mrope_section),
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Upstream bug: with virtual pipelines, batched p2p crosses activations/gradients
        # (Megatron-LM #750, #1450). Unbatched p2p is correct.
        batch_p2p_comm=par.virtual_pipeline_model_parallel_size is None,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        use_cpu_initialization=not on_gpu,
        recompute_granularity=tr.recompute_granularity,
        recompute_method="uniform" if tr.recompute_granularity == "full" else None,
        recompute_num_layers=1 if tr.recompute_granularity == "full" else None,
        deallocate_pipeline_outputs=False,
    )
    if par.first_stage_num_layers is not None and par.pipeline_model_parallel_size > 1:
        kwargs["num_layers_in_first_pipeline_stage"] = par.first_stage_num_layers
    if tr.fp8:
        kwargs["fp8"] = tr.fp8
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class OmniLLM(GPTModel):
    """Llama-3 + M-RoPE decoder on megatron-core GPTModel (see module docstring for why)."""

    def __init__(self, config: TransformerConfig, llm: LLMConfig, vocab_size: int,
                 transformer_impl: str = "local", pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None,
                 scatter_embedding_sequence_parallel: bool = True):
        super().__init__(
            config=config,
            transformer_layer_spec=llm_block_spec(config, transformer_impl, vp_stage),
            vocab_size=vocab_size,
            max_sequence_length=llm.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=not llm.untie_embeddings_and_output_weights,
            position_embedding_type="mrope",
            rotary_base=llm.rotary_base,
            vp_stage=vp_stage,
            # The omni model splices media features into the embeddings first and scatters the
            # sequence itself, so it builds the LLM with this False.
            scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
        )
        self.transformer_impl = transformer_impl
        if llm.rope_scaling:
            rope = self.rotary_pos_emb
            rope.inv_freq = llama3_scaled_inv_freq(
                rope.inv_freq, llm.rope_scaling_factor, llm.rope_low_freq_factor,
                llm.rope_high_freq_factor, llm.rope_original_max_position)

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: torch.Tensor,
                labels: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None,
                decoder_input: Optional[torch.Tensor] = None, **kwargs):
        """Run the decoder.

        Args:
            input_ids: ``[b, s]`` token ids (first pipeline stage; None when ``decoder_input``
                carries already-embedded tokens, e.g. with spliced media features).
            position_ids: ``[b, s]`` (1-D RoPE positions, broadcast to the 3 M-RoPE rows) or
                ``[3, b, s]`` (temporal, height, width).
            labels: ``[b, s]`` next-token targets; with labels the result is the per-token loss
                ``[b, s]`` (vocab-parallel cross-entropy), without them the logits
                ``[b, s, vocab/TP]`` (last stage) or the hidden states (other stages).
            packed_seq_params: THD segments of a packed row (b must be 1, the segments must
                cover the whole row).
        """
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if position_ids.shape[1] != 1:
                raise ValueError("packed (THD) rows need micro-batch size 1 per row; got batch "
                                 f"{position_ids.shape[1]}")
            total = int(packed_seq_params.cu_seqlens_q[-1])
            if total != position_ids.shape[-1]:
                raise ValueError(f"cu_seqlens ends at {total} but the row has "
                                 f"{position_ids.shape[-1]} tokens; add the padding as a final "
                                 f"segment")
        return super().forward(input_ids=input_ids, position_ids=position_ids,
                               attention_mask=None, decoder_input=decoder_input, labels=labels,
                               packed_seq_params=packed_seq_params, **kwargs)


def build_llm(cfg: OmniConfig, pre_process: Optional[bool] = None,
              post_process: Optional[bool] = None, vp_stage: Optional[int] = None,
              config: Optional[TransformerConfig] = None,
              scatter_embedding_sequence_parallel: bool = True) -> OmniLLM:
    """Build the LLM chunk of this pipeline rank (after ``parallel.runtime.initialize``)."""
    from megatron.core import parallel_state as ps

    impl = resolve_transformer_impl(cfg.model.transformer_impl)
    config = config or llm_transformer_config(cfg)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    vocab = padded_vocab_size(cfg.model.llm.vocab_size, cfg.model.llm.make_vocab_size_divisible_by,
                              cfg.parallel.tensor_model_parallel_size)
    from ..parallel.device import place_module

    # The local spec's torch norms are built on the CPU; megatron-core modules on the device.
    return place_module(OmniLLM(
        config, cfg.model.llm, vocab, transformer_impl=impl, pre_process=pre_process,
        post_process=post_process, vp_stage=vp_stage,
        scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel))


def build_llm_chunks(cfg: OmniConfig) -> list[OmniLLM]:
    """The model chunks of this rank: one, or one per virtual pipeline stage."""
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    config = llm_transformer_config(cfg)
    if vpp is None:
        return [build_llm(cfg, config=config)]
    return [build_llm(cfg, vp_stage=i, config=config) for i in range(vpp)]


def chunk_layer_range(chunk: OmniLLM) -> tuple[int, int]:
    """(first global layer, number of layers) held by a model chunk."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(chunk.config, vp_stage=chunk.vp_stage)
    return offset, len(chunk.decoder.layers)


def load_full_llm_state(chunk: OmniLLM, full: dict, strict: bool = True) -> None:
    """Load this chunk's TP/PP part of a full (TP=1, PP=1) megatron state dict (the split rule of
    the LLM's weight map, :mod:`.weight_maps.llm`)."""
    from megatron.core import parallel_state as ps

    from .weight_maps import llm as llm_map
    from .weight_maps.sharding import stage_state_dict, to_te_layout

    offset, n = chunk_layer_range(chunk)
    local = stage_state_dict(full, ps.get_tensor_model_parallel_rank(),
                             ps.get_tensor_model_parallel_world_size(), offset, n,
                             chunk.pre_process, chunk.post_process, gated_mlp=llm_map.gated)
    if getattr(chunk, "transformer_impl", "local") == "transformer_engine":
        # TE layers fuse the pre-attention/pre-MLP norms into linear_qkv/linear_fc1.
        local = to_te_layout(local)
    load_local_state(chunk, local, strict)


def load_local_state(module: torch.nn.Module, local: dict, strict: bool = True,
                     what: str = "state dict", shown: int = 6) -> None:
    """``load_state_dict`` that ignores megatron-core's ``_extra_state`` entries (TE/FP8
    metadata, absent from converted weights) and names what is missing or unexpected."""
    missing, unexpected = module.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and (missing or unexpected):
        raise KeyError(f"{what} mismatch: missing {missing[:shown]}, unexpected "
                       f"{unexpected[:shown]}")
