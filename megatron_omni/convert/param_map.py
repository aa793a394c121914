"""Per-parameter maps between our full (TP=1) parameter names and external checkpoints.

The whole-state-dict adapters (:mod:`.llama`, :mod:`.qwen2vl`, :mod:`.sanm`) need every tensor
in memory at once. Converting a 70B checkpoint cannot, so the conversion tool works one
parameter at a time through :class:`Link` records: one of OUR parameters (full, canonical
local-spec name such as ``llm.decoder.layers.3.self_attention.linear_qkv.weight``), the external
tensors it is made of, and how (``kind``):

=============  ===================================================================================
``copy``       one external tensor, same layout
``llama_qkv``  Llama ``q_proj``, ``k_proj``, ``v_proj`` -> megatron's group-major fused QKV
``gate_up``    Llama ``gate_proj``, ``up_proj`` -> ``linear_fc1`` = ``[gate; up]``
``vision_qkv`` Qwen2-VL fused ``qkv`` (q|k|v-major) -> megatron's head-major fused QKV
``vocab``      embedding / output rows: external rows, then new rows (mean of the external rows:
               the M2-omni special tokens and speech codes a plain Llama lacks), then zero rows
               up to the padded vocabulary
=============  ===================================================================================

Every kind is a re-ordering of ROWS (dim 0) of the external tensors, so the import side is a
*row plan*: a list of :class:`Piece` (external tensor, first row, row count, or a fill). A
tensor-parallel rank needs a contiguous row range of the full tensor (column-parallel: dim 0;
gated ``linear_fc1``: one range in the gate half and one in the up half) or a column range of all
rows (row-parallel: dim 1), so it reads exactly the slices that intersect its range -- never the
whole external tensor (except for the ``vocab`` mean, which is accumulated in row blocks).

The export side works on one full tensor of ours at a time (:func:`export_tensors`).

The adapters stay the reference: the tests check that materialising every plan reproduces
``hf_to_megatron`` / ``hf_to_vision`` / ``sanm_from_funasr`` exactly, and every TP slice
``shard_tensor``'s rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Protocol, Sequence

import torch

from ..config.schema import LLMConfig, VisionConfig
from .llama import _qkv_split
from .qwen2vl import _key_map as _vision_key_map
from .qwen2vl import _qkv_mcore_to_hf, from_te_layout
from .sharding import GATED_SUFFIXES, partition_dim

KINDS = ("copy", "llama_qkv", "gate_up", "vision_qkv", "vocab")


class ConversionError(RuntimeError):
    """A conversion that cannot proceed; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Link:
    """One of our full parameters and the external tensors it is made of."""

    ours: str
    """Our full (TP=1, PP=1) canonical local-spec parameter name."""
    hf: tuple[str, ...]
    """External tensor names (with their checkpoint prefix)."""
    kind: str = "copy"
    heads: int = 0
    """llama_qkv: query heads; vision_qkv: heads."""
    groups: int = 0
    """llama_qkv: key/value groups."""
    head_dim: int = 0
    vocab: int = 0
    """vocab: rows that carry meaning (model.llm.vocab_size); the rest are padding."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown link kind {self.kind!r}")


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, start + rows)`` of external tensor ``key``, or a fill (key None)."""

    key: Optional[str]
    start: int
    rows: int
    fill: str = ""  # "zeros" | "mean" (mean of all rows of ``mean_of``)
    mean_of: Optional[str] = None


# --- link sets -----------------------------------------------------------------------------------

def llama_links(llm: LLMConfig, ours: str = "llm.", hf: str = "") -> list[Link]:
    """Our LLM (``ours`` prefix) <-> a Hugging Face Llama (``hf`` prefix: ``""`` for a
    ``LlamaForCausalLM``, ``"language_model."`` in the M2-omni release)."""
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


def vision_links(vision: VisionConfig, ours: str = "vision_model.", hf: str = "visual."
                 ) -> list[Link]:
    """Our ViT <-> transformers' Qwen2-VL vision tower under ``hf`` (``visual.``,
    ``model.visual.`` or the release's ``vision_model.``). Key map of :mod:`.qwen2vl`."""
    out = []
    for hf_key, key in _vision_key_map(vision.depth):
        if hf_key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            out.append(Link(ours + key, (hf + hf_key,), "vision_qkv", heads=vision.num_heads,
                            head_dim=vision.hidden_size // vision.num_heads))
        else:
            out.append(Link(ours + key, (hf + hf_key,)))
    return out


def sanm_links(names: Iterable[str], ours: str = "audio_model.", hf: str = "encoder."
               ) -> list[Link]:
    """Our SAN-M encoder <-> FunASR (``encoder.``) / release (``audio_model.encoder.``): same
    parameter names (``names``: ``SANMEncoder`` state-dict keys), prefix change only."""
    return [Link(ours + n, (hf + n,)) for n in names]


def projector_links(prefix: str, depth: int, hf_prefix: Optional[str] = None) -> list[Link]:
    """``linear_proj.{0,2,..}`` / ``linear_proj_audio.{0,2,..}``: same names in the release."""
    hf_prefix = prefix if hf_prefix is None else hf_prefix
    out = []
    for j in range(depth):
        for p in ("weight", "bias"):
            out.append(Link(f"{prefix}{2 * j}.{p}", (f"{hf_prefix}{2 * j}.{p}",)))
    return out


def sanm_param_names(sanm_config) -> list[str]:
    from .sanm import expected_sanm_shapes

    return list(expected_sanm_shapes(sanm_config))


# --- import: row plans and TP slices -------------------------------------------------------------

class TensorReader(Protocol):
    """What a row plan reads from (see ``checkpoint_io.TensorSource``)."""

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read(self, key: str, rows: tuple[int, int], cols: Optional[tuple[int, int]] = None
             ) -> torch.Tensor: ...

    def row_mean(self, key: str) -> torch.Tensor: ...


def row_plan(link: Link, shapes: Callable[[str], tuple], full_rows: int) -> list[Piece]:
    """Pieces whose rows, concatenated along dim 0, make our full tensor (``full_rows`` rows;
    only ``vocab`` links may ask for more rows than the external tensors hold)."""
    k = link.kind

    def need_rows(key: str, rows: int) -> None:
        if shapes(key)[0] != rows:
            raise ConversionError(f"{key} has shape {tuple(shapes(key))}: {rows} rows expected "
                                  f"for {link.ours}; the model config does not match the "
                                  f"checkpoint")

    if k == "copy":
        return [Piece(link.hf[0], 0, shapes(link.hf[0])[0])]
    if k == "gate_up":
        need_rows(link.hf[1], shapes(link.hf[0])[0])
        return [Piece(key, 0, shapes(key)[0]) for key in link.hf]
    if k == "llama_qkv":
        q, kk, v = link.hf
        per, d = link.heads // link.groups, link.head_dim
        need_rows(q, link.heads * d)
        need_rows(kk, link.groups * d)
        need_rows(v, link.groups * d)
        out = []
        for g in range(link.groups):
            out += [Piece(q, g * per * d, per * d), Piece(kk, g * d, d), Piece(v, g * d, d)]
        return out
    if k == "vision_qkv":
        (qkv,) = link.hf
        H, d = link.heads, link.head_dim
        need_rows(qkv, 3 * H * d)
        out = []
        for h in range(H):
            out += [Piece(qkv, part * H * d + h * d, d) for part in range(3)]
        return out
    # vocab
    (src,) = link.hf
    have = shapes(src)[0]
    if have > link.vocab:
        raise ConversionError(
            f"{src} has {have} rows but model.llm.vocab_size is {link.vocab}; the vocabulary "
            f"can only grow (set model.llm.vocab_size / model.speech_codebook_size)")
    if full_rows < link.vocab:
        raise ConversionError(f"{link.ours}: {full_rows} rows cannot hold the vocabulary of "
                              f"{link.vocab}")
    out = [Piece(src, 0, have)]
    if link.vocab > have:
        out.append(Piece(None, 0, link.vocab - have, fill="mean", mean_of=src))
    if full_rows > link.vocab:
        out.append(Piece(None, 0, full_rows - link.vocab, fill="zeros"))
    return out


def plan_rows(plan: Sequence[Piece]) -> int:
    return sum(p.rows for p in plan)


def tp_row_ranges(name: str, full_rows: int, tp_rank: int, tp_size: int,
                  gated: Callable[[str], bool]) -> tuple[list[tuple[int, int]], Optional[int]]:
    """(row ranges of our full tensor this TP rank holds, partition dim) under the rules of
    :mod:`.sharding` (column-parallel: a contiguous row block; gated ``linear_fc1``: one block of
    the gate half and one of the up half; row-parallel and replicated: all rows)."""
    dim = partition_dim(name) if tp_size > 1 else None
    if dim != 0:
        return [(0, full_rows)], dim
    if gated(name) and name.endswith(GATED_SUFFIXES):
        half = full_rows // 2
        per = half // tp_size
        return [(tp_rank * per, (tp_rank + 1) * per),
                (half + tp_rank * per, half + (tp_rank + 1) * per)], dim
    per = full_rows // tp_size
    return [(tp_rank * per, (tp_rank + 1) * per)], dim


def read_rows(plan: Sequence[Piece], source: TensorReader, ranges: Sequence[tuple[int, int]],
              cols: Optional[tuple[int, int]], trailing: tuple[int, ...],
              dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ranges`` of the tensor a plan describes (only the overlapping slices are read)."""
    parts = []
    for lo, hi in ranges:
        pos = 0
        for p in plan:
            a, b = max(lo, pos), min(hi, pos + p.rows)
            if a < b:
                if p.key is not None:
                    parts.append(source.read(p.key, (p.start + a - pos, p.start + b - pos), cols))
                else:
                    width = trailing if cols is None else (cols[1] - cols[0],) + trailing[1:]
                    if p.fill == "zeros":
                        parts.append(torch.zeros((b - a,) + tuple(width), dtype=dtype))
                    else:
                        mean = source.row_mean(p.mean_of)
                        if cols is not None:
                            mean = mean[cols[0]:cols[1]]
                        parts.append(mean.to(dtype).unsqueeze(0).expand(b - a, *mean.shape))
            pos += p.rows
        if pos < hi:
            raise ConversionError(f"row plan covers {pos} rows, {hi} needed")
    return torch.cat(parts, 0) if len(parts) > 1 else parts[0]


def read_local(link: Link, source: TensorReader, local_shape: Sequence[int], tp_rank: int,
               tp_size: int, gated: Callable[[str], bool]) -> torch.Tensor:
    """This TP rank's part of our parameter ``link.ours``, read slice by slice from ``source``.

    ``local_shape`` is the shape of the rank's parameter; the result has exactly that shape or a
    :class:`ConversionError` names the external tensors involved."""
    local_shape = tuple(local_shape)
    dim = partition_dim(link.ours) if tp_size > 1 else None
    full = list(local_shape)
    if dim is not None:
        full[dim] *= tp_size
    plan = row_plan(link, source.shape, full[0])
    # Trailing dims come from the external tensors (checked against ours below).
    first = next(p.key for p in plan if p.key is not None)
    trailing = tuple(source.shape(first)[1:])
    if plan_rows(plan) != full[0] or trailing != tuple(full[1:]):
        raise ConversionError(
            f"{link.ours}: expected full shape {tuple(full)} but {', '.join(link.hf)} give "
            f"{(plan_rows(plan),) + trailing} (shapes "
            f"{', '.join(str(tuple(source.shape(k))) for k in link.hf)}); the model config does "
            f"not match the checkpoint")
    ranges, _ = tp_row_ranges(link.ours, full[0], tp_rank, tp_size, gated)
    cols = None
    if dim == 1:
        per = full[1] // tp_size
        cols = (tp_rank * per, (tp_rank + 1) * per)
    dtype = _source_dtype(source, first)
    out = read_rows(plan, source, ranges, cols, trailing, dtype)
    if tuple(out.shape) != local_shape:  # pragma: no cover - guarded above
        raise ConversionError(f"{link.ours}: read {tuple(out.shape)}, expected {local_shape}")
    return out


def _source_dtype(source, key) -> torch.dtype:
    fn = getattr(source, "dtype", None)
    return fn(key) if fn is not None else torch.float32


def check_source_keys(links: Sequence[Link], keys: Iterable[str], prefix: str, what: str,
                      ignore: Sequence[str] = ()) -> None:
    """Every external tensor the links need exists, and every key under ``prefix`` is used
    (ignoring names ending in ``ignore``): a silently skipped tensor gives a model that runs and
    produces garbage."""
    keys = set(keys)
    needed = {k for link in links for k in link.hf}
    missing = sorted(needed - keys)
    unknown = sorted(k for k in keys if k.startswith(prefix) and k not in needed
                     and not k.endswith(tuple(ignore)))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:12])}"
                        f"{' ...' if len(missing) > 12 else ''}")
    if unknown:
        problems.append(f"unexpected {len(unknown)} under {prefix!r}: {', '.join(unknown[:12])}"
                        f"{' ...' if len(unknown) > 12 else ''}")
    if problems:
        raise ConversionError(f"{what} does not match the model config: " + "; ".join(problems))


# --- export --------------------------------------------------------------------------------------

def export_tensors(link: Link, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """External tensors from our full tensor ``link.ours`` (vocab padding dropped)."""
    k = link.kind
    if k == "copy":
        return {link.hf[0]: t}
    if k == "gate_up":
        gate, up = t.chunk(2, 0)
        return {link.hf[0]: gate, link.hf[1]: up}
    if k == "llama_qkv":
        q, kk, v = _qkv_split(t, link.heads, link.groups, link.head_dim)
        return dict(zip(link.hf, (q, kk, v)))
    if k == "vision_qkv":
        return {link.hf[0]: _qkv_mcore_to_hf(t, link.heads)}
    if t.shape[0] < link.vocab:
        raise ConversionError(f"{link.ours} has {t.shape[0]} rows, fewer than the vocabulary "
                              f"{link.vocab}")
    return {link.hf[0]: t[:link.vocab]}


_LAYER = re.compile(r"^(.*?layers\.)(\d+)\.")


def unit_of(name: str) -> str:
    """Group key for streaming: one transformer layer, or one top-level part."""
    m = _LAYER.match(name)
    if m:
        return m.group(1) + m.group(2)
    return name.split(".", 1)[0]


def group_units(links: Sequence[Link]) -> list[list[Link]]:
    """Links grouped by :func:`unit_of`, in first-appearance order."""
    units: dict[str, list[Link]] = {}
    for link in links:
        units.setdefault(unit_of(link.ours), []).append(link)
    return list(units.values())


# --- our parameter names -------------------------------------------------------------------------

_LLM_LAYER = re.compile(r"^llm\.decoder\.layers\.(\d+)\.")


def canonical_name(local_name: str, layer_offset: int = 0) -> str:
    """A model chunk's parameter name -> our full canonical name: Transformer Engine layer-norm
    names mapped to local-spec ones, LLM layer numbers made global (pipeline offset)."""
    name = from_te_layout({local_name: None}).popitem()[0]
    m = _LLM_LAYER.match(name)
    if m and layer_offset:
        name = f"llm.decoder.layers.{int(m.group(1)) + layer_offset}.{name[m.end():]}"
    return name


def full_from_plans(links: Sequence[Link], source: TensorReader,
                    full_rows: Optional[Mapping[str, int]] = None) -> dict[str, torch.Tensor]:
    """Every linked parameter in full (TP=1); for tests and small models."""
    out = {}
    for link in links:
        rows = (full_rows or {}).get(link.ours)
        if rows is None:
            rows = plan_rows(row_plan(link, source.shape, link.vocab))
        plan = row_plan(link, source.shape, rows)
        first = next(p.key for p in plan if p.key is not None)
        trailing = tuple(source.shape(first)[1:])
        out[link.ours] = read_rows(plan, source, [(0, rows)], None, trailing,
                                   _source_dtype(source, first))
    return out
