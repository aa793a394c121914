"""Variable-length core attention for the local (non-Transformer-Engine) layer spec.

megatron-core's local ``DotProductAttention`` refuses ``packed_seq_params``: packed (THD) rows need
Transformer Engine there. This module is the CPU/portable stand-in plugged into the local spec as
``core_attention``. It takes the same constructor and ``forward`` arguments as megatron-core's core
attention modules and handles:

* THD packed rows (``packed_seq_params.qkv_format == "thd"``): ``query`` is ``[t, heads, dim]``.
  On a GPU (Transformer Engine absent, e.g. a plain CUDA torch) the whole row goes through torch's
  compiled flex attention with a block mask "same segment (and causal)": one fused kernel, blocks
  outside the segments skipped, no per-sample Python loop. On the CPU (and with attention dropout,
  which flex attention lacks) attention is computed per segment of ``cu_seqlens`` with SDPA,
  exactly; either way no token attends across a sample boundary. ``OMNI_THD_ATTENTION=flex|loop``
  forces one path (tests compare the two on the CPU, where flex runs unfused);
* ordinary ``[s, b, heads, dim]`` batches, causal or with an explicit boolean mask (True = masked,
  megatron's convention);
* grouped-query attention (key/value heads repeated to the query heads);
* causal (LLM) and bidirectional (ViT, ``AttnMaskType.no_mask``/``padding``) masks.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class VarlenSDPAttention(MegatronModule):
    """Core attention over packed segments with torch SDPA (drop-in for the local spec)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("VarlenSDPAttention does not support context parallelism; use the "
                             "Transformer Engine spec (model.transformer_impl=transformer_engine)")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )

    def _causal(self, attn_mask_type: Optional[AttnMaskType]) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)

    def _sdpa(self, q, k, v, causal: bool, mask: Optional[torch.Tensor]):
        """q: [b, hq, s, d]; k, v: [b, hk, s, d] -> [b, hq, s, d]."""
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            # Same RNG stream as megatron-core's DotProductAttention dropout: distinct per TP rank.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    dropout_p=dropout,
                    is_causal=causal and mask is None,
                    scale=self.softmax_scale,
                )
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=causal and mask is None,
            scale=self.softmax_scale,
        )

    def _thd_path(self, query: torch.Tensor) -> str:
        forced = os.environ.get("OMNI_THD_ATTENTION", "").lower()
        if forced in ("flex", "loop"):
            return forced
        dropout = self.dropout_p if self.training else 0.0
        return "flex" if (query.is_cuda and dropout == 0.0 and flex_available()) else "loop"

    def _thd_flex(self, query, key, value, cu, causal: bool, params) -> torch.Tensor:
        """The whole packed row in one flex-attention call with a segment (+causal) block mask."""
        t = query.shape[0]
        mask = _segment_block_mask(params, cu, t, causal, query.device)
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
        out = _flex_fn(query.is_cuda)(
            q, k, v, block_mask=mask, scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1]
        )
        return out[0].permute(1, 0, 2).reshape(t, -1)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by VarlenSDPAttention")
        causal = self._causal(attn_mask_type)

        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            t = query.shape[0]
            if self._thd_path(query) == "flex":
                return self._thd_flex(query, key, value, cu, causal, packed_seq_params)
            bounds = cu.tolist()
            if bounds[0] != 0 or bounds[-1] != t:
                raise ValueError(
                    f"cu_seqlens {bounds} must start at 0 and end at the packed length {t}"
                )
            out = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
            for start, end in zip(bounds[:-1], bounds[1:]):
                if end <= start:
                    continue
                q = query[start:end].permute(1, 0, 2).unsqueeze(0)
                k = key[start:end].permute(1, 0, 2).unsqueeze(0)
                v = value[start:end].permute(1, 0, 2).unsqueeze(0)
                out[start:end] = self._sdpa(q, k, v, causal, None)[0].permute(1, 0, 2)
            return out.reshape(t, -1)

        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None
        if attention_mask is not None and not causal:
            mask = ~attention_mask.bool()  # megatron: True = masked; SDPA: True = attend
        elif attention_mask is not None and causal:
            s = q.shape[2]
            tri = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
            mask = tri & ~attention_mask.bool()
        out = self._sdpa(q, k, v, causal, mask)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa
    except ImportError:
        return False
    return True


_COMPILED_FLEX = None


def _flex_fn(compiled: bool):
    """flex_attention, compiled once on the GPU (the fused kernel); eager elsewhere."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def _segment_block_mask(params, cu: torch.Tensor, t: int, causal: bool, device):
    """Block mask "query and key in the same cu_seqlens segment (and key <= query)", built once
    per packed row and kept on its ``PackedSeqParams`` (all layers of the row share it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (t, causal, str(device))
    cache = getattr(params, "_omni_block_masks", None)
    if cache is None:
        cache = {}
        try:
            params._omni_block_masks = cache
        except (AttributeError, TypeError):
            pass
    if key in cache:
        return cache[key]
    cu = cu.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)

    if causal:

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

    cache[key] = create_block_mask(mask_mod, None, None, t, t, device=device)
    return cache[key]


def packed_seq_params(
    cu_seqlens: torch.Tensor, max_seqlen: Optional[int] = None
) -> PackedSeqParams:
    """THD ``PackedSeqParams`` for one packed row whose segments are ``cu_seqlens`` (int32).

    ``cu_seqlens`` must end at the row length (a trailing padding segment counts as a sample),
    because M-RoPE frequencies are given per token and matched to the row one to one.
    """
    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
