"""LoRA adapters on megatron-core's tensor-parallel linears (the alignment stage, AT).

What it does. :func:`apply_lora` turns chosen linears of the LLM decoder (``linear_qkv``,
``linear_proj``, ``linear_fc1``, ``linear_fc2`` by default) into LoRA linears in place:
``y = W x + (alpha / r) * B (A x)``. B starts at zero, so an adapted model computes exactly what
the base model computes until the first update. Base weights stay frozen; only ``lora_A`` /
``lora_B`` require gradients, so megatron-core's DDP gives only them grad buffers and its
optimizer only them state. Call it after ``set_trainable`` and before ``wrap_ddp``.

Tensor parallelism (the base's partitioning decides the adapter's):

* column-parallel base (``linear_qkv``, ``linear_fc1``; output split over TP): A ``[r, in]`` is
  replicated, B ``[out/TP, r]`` is split like the base's output rows. The fused QKV weight is
  stored group-major and split into whole KV groups, and the gated ``linear_fc1`` holds
  ``[gate_shard; up_shard]`` on every rank: B's rows on a rank line up with W's rows on that rank
  in both cases, and its checkpoint entry uses megatron-core's SwiGLU factory exactly like
  ``linear_fc1.weight``, so its global layout is ``[gate; up]`` like W's.
  Forward: ``h = A x`` on the input the base receives; without sequence parallelism ``h`` goes
  through ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of its gradient:
  each rank's B shard contributes part of dL/dh), with SP through
  ``gather_from_sequence_parallel_region`` (all-gather of the sequence shards of the r-wide ``h``,
  reduce-scatter of its gradient). Under SP every rank sees only its sequence shard, so A's
  gradient is partial: A is tagged ``sequence_parallel`` and megatron-core's
  ``finalize_model_grads`` all-reduces it over TP, as it does for norms.
* row-parallel base (``linear_proj``, ``linear_fc2``; input split over TP): A ``[r, in/TP]`` is
  split like the base's input columns, B ``[out, r]`` is replicated. ``A x`` is a partial sum on
  every rank: it is all-reduced (``reduce_from_tensor_model_parallel_region``), or under SP
  reduce-scattered along the sequence (``reduce_scatter_to_sequence_parallel_region``), then B is
  applied and the result added to the base's output, which has already been all-reduced /
  reduce-scattered inside the base layer. Only an r-wide tensor crosses the TP group, never an
  ``out``-wide one. Under SP B sees a sequence shard, so B is tagged ``sequence_parallel``.

Transformer Engine (GPU). ``TEColumnParallelLinear`` / ``TERowParallelLinear`` take the same path
as the local layers. ``TELayerNormColumnParallelLinear`` fuses the pre-norm into the linear, so the
adapter must see the NORMALISED input: we recompute the norm (RMSNorm / LayerNorm with the TE
module's own ``layer_norm_weight``/``bias``, ``eps`` and ``zero_centered_gamma``) on the input
shard and then follow the column-parallel path. TE's alternative, ``return_layernorm_output``,
hands out the norm's output but how its gradient joins TE's own all-reduce / reduce-scatter differs
between TE versions and SP settings; an elementwise norm on an h-wide tensor costs far less than a
GEMM. FP8: the adapter runs in the parameter dtype (bf16), outside TE's FP8 region. TE cannot be
imported on the CPU machines this project is tested on: that path is written to the same math as
the tested local path but is NOT exercised by the test suite.

Checkpoints. The adapters are children of the base linear, so their names are
``<linear>.lora_A.weight`` / ``<linear>.lora_B.weight`` next to ``<linear>.weight`` (the base keeps
its name: an IT-3 checkpoint loads unchanged). The class's ``sharded_state_dict`` describes them
with their TP axis (B axis 0 for column bases, A axis 1 for row bases, the rest replicated), so they
live in the distributed checkpoint in their global layout and reshard on load like every other
weight; ``tools/convert_checkpoint.py export`` merges ``W + alpha/r * B @ A`` from that layout
(:func:`lora_pairs`, :func:`merge_lora` below) before the weight map turns the merged weight into
the external tensors (``models/weight_maps``: the fused QKV split into q/k/v, ``[gate; up]`` into
gate and up), so a merged export is laid out exactly like a plain one.

Why our own module, not a library. peft's Megatron support (``LoraParallelLinear``) wraps the
base as ``base_layer`` (renaming every base weight in the checkpoint), builds A/B from
Megatron-LM's own parallel layers given a Megatron-LM ``megatron_config``, and knows neither
sequence parallelism, TE's fused layer-norm linears nor megatron-core distributed checkpoints.
Megatron-Bridge's LoRA (``AdapterWrapper`` + ``ParallelLinearAdapter``) handles all of that, but
imports Transformer Engine at module import (unusable on our CPU path), is developed against
current megatron-core (newer than the 0.16.1 that installs on Python 3.11) and would pull in the
whole Bridge framework for ~200 lines of math. From both we kept the ideas: B = 0 at start, only an
r-wide tensor crosses the TP group, an adapter switch for the reference pass, base weights keeping
their checkpoint names (Bridge) and the sharded-state-dict description of the adapters.

The reference pass of DPO uses :func:`adapters_disabled`: the same network, adapters switched off.
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_WHERE = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
          "linear_fc1": "mlp", "linear_fc2": "mlp"}


def _kind(module: torch.nn.Module) -> Optional[str]:
    """'column', 'row' or None (not a tensor-parallel linear we know)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    name = type(module).__name__
    if name.startswith("TE") and "ColumnParallel" in name:
        return "column"
    if name.startswith("TE") and "RowParallel" in name:
        return "row"
    return None


def _has_fused_norm(module) -> bool:
    return hasattr(module, "layer_norm_weight")


def _te_norm(module, x: torch.Tensor) -> torch.Tensor:
    """The pre-norm a TE ``LayerNormLinear`` applies to its input, recomputed in PyTorch."""
    w = module.layer_norm_weight
    if getattr(module, "zero_centered_gamma", False):
        w = w + 1
    if getattr(module, "normalization", "RMSNorm") == "RMSNorm":
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.eps)
        return (y * w.float()).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), w, getattr(module, "layer_norm_bias", None),
                        module.eps)


class LoRAMixin:
    """Mixed into a tensor-parallel linear's class by :func:`apply_lora` (see module docstring)."""

    lora_kind: str
    lora_scale: float
    lora_enabled: bool
    lora_gated: bool

    def forward(self, input_, *args, **kwargs):
        out = super().forward(input_, *args, **kwargs)
        if not self.lora_enabled:
            return out
        y, bias = out if isinstance(out, tuple) else (out, None)
        delta = self.lora_delta(input_)
        y = y + delta.to(y.dtype)
        return (y, bias) if isinstance(out, tuple) else y

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``alpha/r * B A x`` in the layout of this rank's base output."""
        sp = bool(self.config.sequence_parallel) and \
            ps.get_tensor_model_parallel_world_size() > 1
        if self.lora_kind == "column" and _has_fused_norm(self):
            x = _te_norm(self, x)
        x = self.lora_dropout(x)
        h = F.linear(x, self.lora_A.weight.to(x.dtype))
        if self.lora_kind == "column":
            if sp:
                h = tensor_parallel.gather_from_sequence_parallel_region(h)
            else:
                h = tensor_parallel.copy_to_tensor_model_parallel_region(h)
        else:
            if sp:
                h = tensor_parallel.reduce_scatter_to_sequence_parallel_region(h)
            else:
                h = tensor_parallel.reduce_from_tensor_model_parallel_region(h)
        return F.linear(h, self.lora_B.weight.to(h.dtype)) * self.lora_scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if _LEFT_OUT[0]:
            for k in ("lora_A.weight", "lora_B.weight"):
                sd.pop(f"{prefix}{k}", None)
            return sd
        axis = {"lora_B.weight": 0} if self.lora_kind == "column" else {"lora_A.weight": 1}
        own = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        kw = {}
        if metadata is not None and "dp_cp_group" in metadata:
            kw["dp_cp_group"] = metadata["dp_cp_group"]
        if getattr(self, "tp_group", None) is not None:
            kw["tp_group"] = self.tp_group
        lora = make_sharded_tensors_for_checkpoint(own, prefix, axis, sharded_offsets, **kw)
        if self.lora_gated:
            key = f"{prefix}lora_B.weight"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            lora[key] = apply_swiglu_sharded_factory(lora[key], sharded_offsets, singleton)
        sd.update(lora)
        return sd


_CLASSES: dict[type, type] = {}
_LEFT_OUT = [False]


@contextlib.contextmanager
def adapters_left_out_of_checkpoint():
    """Within the block the adapters are absent from ``sharded_state_dict``: loading the
    previous stage's checkpoint (which has none) into an adapted model. megatron-core cannot
    drop a missing SwiGLU-factory tensor (the gated ``linear_fc1``'s B) from a load request, so
    the adapters must not be requested at all; they keep their initialisation."""
    _LEFT_OUT[0] = True
    try:
        yield
    finally:
        _LEFT_OUT[0] = False


def _lora_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"LoRA{base.__name__}", (LoRAMixin, base), {})
    return _CLASSES[base]


def _global_init(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """Kaiming-uniform A (as peft and Megatron-Bridge do), drawn from a generator keyed by the
    parameter's global name, so every TP/PP layout starts from the same global adapter."""
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + 7919 * seed) & 0x7FFFFFFF)
    fan_in = shape[1]
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) reduces to this bound
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def _attach(module: torch.nn.Module, global_name: str, rank: int, alpha: float, dropout: float,
            gated: bool, seed: int) -> int:
    kind = _kind(module)
    if kind is None:
        raise TypeError(f"{global_name}: {type(module).__name__} is not a megatron-core "
                        f"column/row-parallel linear; LoRA cannot wrap it")
    if isinstance(module, LoRAMixin):
        raise RuntimeError(f"{global_name} already has LoRA adapters")
    weight = module.weight
    out_local, in_local = weight.shape
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dtype, device = weight.dtype, weight.device
    if kind == "column":
        a_full = _global_init(global_name + ".lora_A", (rank, in_local), seed)
        a_local = a_full
        b_local = torch.zeros(out_local, rank)
    else:
        a_full = _global_init(global_name + ".lora_A", (rank, in_local * tp), seed)
        a_local = a_full.chunk(tp, dim=1)[tp_rank]
        b_local = torch.zeros(weight.shape[0], rank)
    module.lora_A = torch.nn.Linear(a_local.shape[1], rank, bias=False, dtype=dtype, device=device)
    module.lora_B = torch.nn.Linear(rank, b_local.shape[0], bias=False, dtype=dtype,
                                    device=device)
    with torch.no_grad():
        module.lora_A.weight.copy_(a_local)
        module.lora_B.weight.copy_(b_local)
    module.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
    sp = bool(module.config.sequence_parallel)
    a, b = module.lora_A.weight, module.lora_B.weight
    if kind == "column":
        tensor_parallel.set_tensor_model_parallel_attributes(b, True, 0, 1)
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(a)
        a.sequence_parallel = sp
    else:
        tensor_parallel.set_tensor_model_parallel_attributes(a, True, 1, 1)
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(b)
        b.sequence_parallel = sp
    for p in (a, b):
        p.requires_grad_(True)
    module.__class__ = _lora_class(type(module))
    module.lora_kind = kind
    module.lora_scale = float(alpha) / float(rank)
    module.lora_enabled = True
    module.lora_gated = gated
    return a.numel() + b.numel()


def lora_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, LoRAMixin)]


def _decoder(chunk: torch.nn.Module):
    llm = getattr(chunk, "llm", chunk)
    return llm.decoder


def apply_lora(chunks: Sequence[torch.nn.Module], rank: int, alpha: float,
               dropout: float = 0.0, targets: Iterable[str] = DEFAULT_TARGETS,
               seed: int = 0) -> int:
    """Add adapters to ``targets`` of every LLM decoder layer of this rank's chunks (bare, not
    DDP-wrapped); returns this rank's number of adapter parameters."""
    targets = tuple(targets)
    bad = [t for t in targets if t not in _WHERE]
    if bad:
        raise ValueError(f"unknown LoRA targets {bad}; choose from {list(_WHERE)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    total = 0
    for chunk in chunks:
        for layer in _decoder(chunk).layers:
            for t in targets:
                parent = getattr(layer, _WHERE[t])
                module = getattr(parent, t)
                gated = t == "linear_fc1" and bool(module.config.gated_linear_unit)
                name = f"llm.decoder.layers.{layer.layer_number - 1}.{_WHERE[t]}.{t}"
                total += _attach(module, name, rank, alpha, dropout, gated, seed)
    return total


@contextlib.contextmanager
def adapters_disabled(chunks):
    """Within the block every adapter of ``chunks`` (bare or DDP-wrapped) is switched off: the
    model computes the base (reference) network."""
    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    mods = [m for c in chunks for m in lora_modules(c)]
    before = [m.lora_enabled for m in mods]
    for m in mods:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m, b in zip(mods, before):
            m.lora_enabled = b


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def trainable_share(chunks: Sequence[torch.nn.Module]) -> dict[str, float]:
    """Global parameter counts (summed over TP/PP, replicas counted once): adapters, LLM base
    weights, and the share of the LLM the adapters make. Collective over the model-parallel
    group."""
    lora = llm = 0
    tp_rank = ps.get_tensor_model_parallel_rank()
    for c in chunks:
        for name, p in c.named_parameters():
            if name.startswith(("vision_model.", "audio_model.", "linear_proj.",
                                "linear_proj_audio.")):
                continue
            sharded = getattr(p, "tensor_model_parallel", False)
            n = p.numel() if (sharded or tp_rank == 0) else 0
            if is_lora_param(name):
                lora += n
            else:
                llm += n
    t = torch.tensor([float(lora), float(llm)], dtype=torch.float64)
    if torch.distributed.is_initialized() and ps.model_parallel_is_initialized():
        torch.distributed.all_reduce(t, group=ps.get_model_parallel_group())
    lora, llm = t.tolist()
    return {"lora": lora, "llm": llm, "share": lora / llm if llm else 0.0}


def lora_rank_for_share(llm_cfg, share: float, targets: Iterable[str] = DEFAULT_TARGETS) -> int:
    """The rank whose adapters are closest to ``share`` of the LLM's weights (for recipes)."""
    h, f, L = llm_cfg.hidden_size, llm_cfg.ffn_hidden_size, llm_cfg.num_layers
    heads, groups, d = llm_cfg.num_attention_heads, llm_cfg.num_query_groups, llm_cfg.head_dim
    qkv_out = (heads + 2 * groups) * d
    dims = {"linear_qkv": (h, qkv_out), "linear_proj": (heads * d, h),
            "linear_fc1": (h, 2 * f), "linear_fc2": (f, h)}
    per_rank = L * sum(sum(dims[t]) for t in targets)
    base = L * sum(i * o for i, o in dims.values()) + 2 * llm_cfg.vocab_size * h
    return max(1, round(share * base / per_rank))


# --- merging for export --------------------------------------------------------------------------

_LORA_NAME = re.compile(r"\.lora_([AB])(\.[^.]+)?\.weight$")


def is_lora_name(name: str) -> bool:
    """``X.lora_A[.adapter].weight`` / ``X.lora_B[.adapter].weight`` (checkpoint names, also
    PEFT-style ones with an adapter name)."""
    return _LORA_NAME.search(name) is not None


def lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Find LoRA deltas: ``X.lora_A[.adapter].weight`` + ``X.lora_B[.adapter].weight`` belong
    to the base weight ``X.weight``. A lone A or B is an error."""
    from ..models.weight_maps.core import ConversionError

    names = set(names)
    pairs = {}
    for n in names:
        m = _LORA_NAME.search(n)
        if not m or m.group(1) != "A":
            continue
        base = n[:m.start()] + ".weight"
        b = n[:m.start()] + f".lora_B{m.group(2) or ''}.weight"
        if b not in names:
            raise ConversionError(f"LoRA tensor {n} has no matching {b}")
        if base not in names:
            raise ConversionError(f"LoRA tensor {n} has no base weight {base}")
        pairs[base] = (n, b)
    lone_b = [n for n in names if (m := _LORA_NAME.search(n)) and m.group(1) == "B"
              and n not in {p[1] for p in pairs.values()}]
    if lone_b:
        raise ConversionError(f"LoRA tensor(s) without lora_A: {sorted(lone_b)[:4]}")
    return pairs


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
               ) -> torch.Tensor:
    """``W + scale * B @ A`` (computed in float32, returned in W's dtype).

    Shapes: W ``[out, in]``, A ``[r, in]``, B ``[out, r]``, all in the global (TP=1) layout of
    the base weight: B's rows follow W's (group-major fused QKV; ``[gate; up]`` for the gated
    ``linear_fc1``), which is why the merged weight goes through the same weight map as W."""
    from ..models.weight_maps.core import ConversionError

    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or \
            (b.shape[0], a.shape[1]) != tuple(weight.shape):
        raise ConversionError(f"LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit "
                              f"W{tuple(weight.shape)}")
    delta = b.to(torch.float32) @ a.to(torch.float32)
    return (weight.to(torch.float32) + scale * delta).to(weight.dtype)


def lora_scale_from_config(raw) -> Optional[float]:
    """``alpha / rank`` from a saved run config (nested dict) if it names them: ``lora_alpha``
    with ``lora_rank`` (or ``lora_r``) in one section, or a ``lora`` section with ``alpha`` and
    ``rank`` (or ``r``)."""
    if not isinstance(raw, dict):
        return None
    for alpha_key, rank_keys, section in (("lora_alpha", ("lora_rank", "lora_r"), raw),
                                          ("alpha", ("rank", "r"), raw.get("lora"))):
        if isinstance(section, dict) and alpha_key in section:
            rank = next((section[k] for k in rank_keys if section.get(k)), None)
            if rank:
                return float(section[alpha_key]) / float(rank)
    for v in raw.values():
        found = lora_scale_from_config(v)
        if found is not None:
            return found
    return None
