"""The tensor-parallel split rule and layer names every weight map shares: full (TP=1, PP=1)
megatron-core state dicts into per-rank shards and back.

The rules follow megatron-core's tensor-parallel layers (the LLM and the ViT are megatron-core
transformer blocks; SAN-M and the projectors have none of these names, so they are replicated):

* column-parallel weights (``linear_qkv``, ``linear_fc1``, word embeddings, ``output_layer``) are
  split along dim 0; ``linear_qkv`` is stored group-major (per KV group: its query heads, then its
  key head, then its value head), so a contiguous split hands each rank whole KV groups;
* gated MLPs store ``linear_fc1`` as ``[gate; up]`` on every rank, so gate and up are split
  separately and re-concatenated per rank;
* row-parallel weights (``linear_proj``, ``linear_fc2``) are split along dim 1; their biases are
  replicated (``RowParallelLinear`` adds the full bias after the all-reduce);
* norms and anything else are replicated;
* LoRA adapters (``training/lora.py``) follow their base: ``lora_B`` of a column-parallel linear
  is split along dim 0 (gated ``linear_fc1``: gate and up separately), ``lora_A`` of a
  row-parallel linear along dim 1; the other factor is replicated.

``gated_mlp`` may be a bool or a predicate on the parameter name, for state dicts that mix gated
(Llama) and plain (ViT, merger) MLPs: each map says which of its MLPs are gated (``gated``).

Pipeline stages hold a contiguous range of global layers; their local names count from 0.

Transformer Engine layers fuse the pre-attention / pre-MLP norms into ``linear_qkv`` /
``linear_fc1`` (``layer_norm_weight``); the maps speak local-spec names and
:func:`to_te_layout` / :func:`from_te_layout` rename.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

_LAYER = re.compile(r"^(?P<pre>(?:.*\.)?layers\.)(?P<idx>\d+)(?P<post>\..*)$")

COLUMN_SUFFIXES = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
                   "word_embeddings.weight", "output_layer.weight",
                   "linear_qkv.lora_B.weight", "linear_fc1.lora_B.weight")
ROW_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight",
                "linear_proj.lora_A.weight", "linear_fc2.lora_A.weight")
GATED_SUFFIXES = ("mlp.linear_fc1.weight", "mlp.linear_fc1.lora_B.weight")


def partition_dim(name: str) -> Optional[int]:
    """0 for column-parallel, 1 for row-parallel, None for replicated parameters."""
    if name.endswith(COLUMN_SUFFIXES):
        return 0
    if name.endswith(ROW_SUFFIXES):
        return 1
    return None


def _is_gated(name: str, gated: Union[bool, Callable[[str], bool]]) -> bool:
    if callable(gated):
        return bool(gated(name)) and name.endswith(GATED_SUFFIXES)
    return gated and name.endswith(GATED_SUFFIXES)


def shard_tensor(name: str, tensor: torch.Tensor, tp_rank: int, tp_size: int,
                 gated_mlp: bool = True) -> torch.Tensor:
    """This TP rank's part of a full tensor."""
    dim = partition_dim(name)
    if dim is None or tp_size == 1:
        return tensor
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"{name}: dim {dim} of size {tensor.shape[dim]} does not split over "
                         f"TP={tp_size}")
    if _is_gated(name, gated_mlp):
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
    return tensor.chunk(tp_size, dim=dim)[tp_rank]


def unshard_tensor(name: str, shards: list[torch.Tensor], gated_mlp: bool = True
                   ) -> torch.Tensor:
    """Inverse of :func:`shard_tensor` given every TP rank's part in rank order."""
    dim = partition_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if _is_gated(name, gated_mlp):
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([torch.cat(gates, 0), torch.cat(ups, 0)], 0)
    return torch.cat(shards, dim=dim)


def tp_row_ranges(name: str, full_rows: int, tp_rank: int, tp_size: int,
                  gated: Callable[[str], bool]) -> tuple[list[tuple[int, int]], Optional[int]]:
    """(row ranges of our full tensor this TP rank holds, partition dim) under the rules above
    (column-parallel: a contiguous row block; gated ``linear_fc1``: one block of the gate half and
    one of the up half; row-parallel and replicated: all rows). The streaming form of
    :func:`shard_tensor`."""
    dim = partition_dim(name) if tp_size > 1 else None
    if dim != 0:
        return [(0, full_rows)], dim
    if _is_gated(name, gated):
        half = full_rows // 2
        per = half // tp_size
        return [(tp_rank * per, (tp_rank + 1) * per),
                (half + tp_rank * per, half + (tp_rank + 1) * per)], dim
    per = full_rows // tp_size
    return [(tp_rank * per, (tp_rank + 1) * per)], dim


def layer_index(name: str) -> Optional[int]:
    m = _LAYER.match(name)
    return int(m.group("idx")) if m else None


def rename_layer(name: str, new_idx: int) -> str:
    m = _LAYER.match(name)
    return f"{m.group('pre')}{new_idx}{m.group('post')}"


def stage_state_dict(full: dict, tp_rank: int, tp_size: int, layer_offset: int, num_layers: int,
                     pre_process: bool, post_process: bool, gated_mlp: bool = True,
                     first_stage_only: Iterable[str] = ("embedding.",),
                     last_stage_only: Iterable[str] = ("output_layer.", "decoder.final_layernorm."),
                     layer_prefix: str = "decoder.") -> dict:
    """The state dict of one (TP rank, pipeline stage) model chunk from a full state dict.

    ``layer_offset``/``num_layers``: the global layers this stage holds. Keys of parts that live
    only on the first stage (embeddings, encoders) or the last (final norm, output layer) are kept
    or dropped by ``pre_process``/``post_process``. Only layers under ``layer_prefix`` (the LLM
    decoder) are split over pipeline stages; encoder layers stay whole on the first stage.
    """
    first_stage_only, last_stage_only = tuple(first_stage_only), tuple(last_stage_only)
    out = {}
    for name, t in full.items():
        idx = layer_index(name)
        if idx is not None and name.startswith(layer_prefix):
            if not layer_offset <= idx < layer_offset + num_layers:
                continue
            name = rename_layer(name, idx - layer_offset)
        elif name.startswith(first_stage_only) and not pre_process:
            continue
        elif name.startswith(last_stage_only) and not post_process:
            continue
        out[name] = shard_tensor(name, t, tp_rank, tp_size, gated_mlp)
    return out


# --- Transformer Engine layer names ---------------------------------------------------------------

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


def _rename(state: Mapping, rules) -> dict:
    out = {}
    for k, v in state.items():
        for pattern, repl in rules:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def to_te_layout(state: Mapping) -> dict:
    """Local-spec names -> Transformer Engine spec names (fused layer norms; the same map as
    megatron-core's local spec ``sharded_state_dict_keys_map``)."""
    return _rename(state, _TE_NAMES)


def from_te_layout(state: Mapping) -> dict:
    """Transformer Engine spec names -> local-spec names (identity on local names)."""
    return _rename(state, _LOCAL_NAMES)


def local_name(name: str) -> str:
    """One parameter name in local-spec form (see :func:`from_te_layout`)."""
    return next(iter(from_te_layout({name: None})))
