"""The machinery every weight map shares: :class:`Link` records and the row plans behind them.

A weight map (:mod:`.llm`, :mod:`.vision`, :mod:`.audio`) is a list of :class:`Link` records:
one of OUR parameters (full TP=1 canonical local-spec name, e.g.
``llm.decoder.layers.3.self_attention.linear_qkv.weight``), the external tensors it is made of,
and how (``kind``):

=============  ===================================================================================
``copy``       one external tensor, same layout
``llama_qkv``  separate ``q``, ``k``, ``v`` projections -> megatron's group-major fused QKV (per
               KV group: its query heads, its key head, its value head)
``gate_up``    ``gate``, ``up`` projections -> ``linear_fc1`` = ``[gate; up]``
``vision_qkv`` one fused ``qkv`` stored q|k|v-major (all q heads, all k, all v) -> megatron's
               head-major fused QKV (per head: q, k, v)
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

One implementation serves every use:

* streaming import, one TP slice at a time (:func:`read_local`, the conversion tool);
* whole state dicts in memory (:func:`full_from_plans` over a :class:`DictSource`; the maps'
  ``hf_to_*`` helpers, tests, loading a release into a model);
* export, one full tensor of ours at a time (:func:`export_tensors`; LoRA deltas are merged into
  the full tensor first, ``training/lora.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Protocol, Sequence

import torch

from .sharding import partition_dim, tp_row_ranges

KINDS = ("copy", "llama_qkv", "gate_up", "vision_qkv", "vocab")
StateDict = dict[str, torch.Tensor]


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


# --- strict key checks ---------------------------------------------------------------------------

MAX_LISTED = 20


def listing(keys) -> str:
    """``N key(s): a, b, ... and K more`` (sorted, at most MAX_LISTED shown)."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return f"{len(keys)} key(s): {', '.join(keys[:MAX_LISTED])}{more}"


def same_shape(actual: Sequence[int], expected: Sequence) -> bool:
    """Shapes equal; ``None`` in ``expected`` matches any size."""
    return len(actual) == len(expected) and all(e is None or a == e
                                                for a, e in zip(actual, expected))


def key_problems(state: Mapping, expected: Mapping[str, tuple],
                 shape_ok: Callable[[tuple, tuple], bool] = same_shape) -> list[str]:
    """What is wrong with ``state`` against ``expected`` shapes (empty list = nothing): one
    message format for unknown, missing and wrongly shaped tensors."""
    unknown = set(state) - set(expected)
    missing = set(expected) - set(state)
    wrong = {f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}"
             for k in set(state) & set(expected)
             if not shape_ok(tuple(state[k].shape), tuple(expected[k]))}
    problems = []
    if unknown:
        problems.append(f"unknown {listing(unknown)}")
    if missing:
        problems.append(f"missing {listing(missing)}")
    if wrong:
        problems.append(f"wrong shape in {listing(wrong)}")
    return problems


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


# --- where tensors come from ---------------------------------------------------------------------

class TensorReader(Protocol):
    """What a row plan reads from (``convert.checkpoint_io.TensorSource`` on disk,
    :class:`DictSource` in memory)."""

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read(self, key: str, rows: tuple[int, int], cols: Optional[tuple[int, int]] = None
             ) -> torch.Tensor: ...

    def row_mean(self, key: str) -> torch.Tensor: ...


class DictSource:
    """A :class:`TensorReader` over a state dict in memory (slices are views, not copies)."""

    def __init__(self, state: Mapping[str, torch.Tensor], what: str = "state dict"):
        self.state, self.what = state, what

    def _get(self, key: str) -> torch.Tensor:
        try:
            return self.state[key]
        except KeyError:
            raise ConversionError(f"{self.what} has no tensor {key!r}") from None

    def shape(self, key: str) -> tuple:
        return tuple(self._get(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._get(key).dtype

    def read(self, key: str, rows: Optional[tuple[int, int]] = None,
             cols: Optional[tuple[int, int]] = None) -> torch.Tensor:
        t = self._get(key)
        if rows is not None:
            t = t[rows[0]:rows[1]]
        return t if cols is None else t[:, cols[0]:cols[1]]

    def row_mean(self, key: str) -> torch.Tensor:
        """Mean over dim 0, accumulated in float64, returned in float32 (as ``TensorSource``)."""
        return self._get(key).to(torch.float64).mean(0).to(torch.float32)


def _source_dtype(source, key) -> torch.dtype:
    fn = getattr(source, "dtype", None)
    return (fn(key) if fn is not None else None) or torch.float32


# --- import: row plans and TP slices -------------------------------------------------------------

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
    """This TP rank's part of our parameter ``link.ours``, read slice by slice from ``source``
    (``gated``: the maps' rule for which ``linear_fc1`` holds ``[gate; up]``).

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


def full_from_plans(links: Sequence[Link], source: TensorReader,
                    full_rows: Optional[Mapping[str, int]] = None) -> StateDict:
    """Every linked parameter in full (TP=1): our state dict from the external one.
    ``full_rows``: the padded row count of ``vocab`` links (default: the vocabulary)."""
    out = {}
    for link in links:
        if link.kind == "copy":  # the plan is the whole tensor (also 0-d ones)
            out[link.ours] = source.read(link.hf[0])
            continue
        rows = (full_rows or {}).get(link.ours)
        if rows is None:
            rows = plan_rows(row_plan(link, source.shape, link.vocab))
        plan = row_plan(link, source.shape, rows)
        first = next(p.key for p in plan if p.key is not None)
        trailing = tuple(source.shape(first)[1:])
        out[link.ours] = read_rows(plan, source, [(0, rows)], None, trailing,
                                   _source_dtype(source, first))
    return out


# --- export --------------------------------------------------------------------------------------

def split_group_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron's group-major fused QKV -> ``(q, k, v)`` (inverse of the ``llama_qkv`` plan)."""
    hidden = qkv.shape[1]
    per = heads // groups
    qkv = qkv.view(groups, (per + 2) * head_dim, hidden)
    q, k, v = torch.split(qkv, [per * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden))


def head_major_to_qkv_major(t: torch.Tensor, heads: int) -> torch.Tensor:
    """megatron's head-major fused QKV (weight or bias) -> q|k|v-major (inverse of the
    ``vision_qkv`` plan)."""
    rest = t.shape[1:]
    d = t.shape[0] // (3 * heads)
    return t.reshape(heads, 3, d, *rest).transpose(0, 1).reshape(3 * heads * d, *rest)


def export_tensors(link: Link, t: torch.Tensor) -> StateDict:
    """External tensors from our full tensor ``link.ours`` (vocab padding dropped)."""
    k = link.kind
    if k == "copy":
        return {link.hf[0]: t}
    if k == "gate_up":
        gate, up = t.chunk(2, 0)
        return {link.hf[0]: gate, link.hf[1]: up}
    if k == "llama_qkv":
        q, kk, v = split_group_qkv(t, link.heads, link.groups, link.head_dim)
        return dict(zip(link.hf, (q, kk, v)))
    if k == "vision_qkv":
        return {link.hf[0]: head_major_to_qkv_major(t, link.heads)}
    if t.shape[0] < link.vocab:
        raise ConversionError(f"{link.ours} has {t.shape[0]} rows, fewer than the vocabulary "
                              f"{link.vocab}")
    return {link.hf[0]: t[:link.vocab]}


def export_state(links: Sequence[Link], full: Mapping[str, torch.Tensor]) -> StateDict:
    """The external state dict from our full one (every link's tensors, contiguous)."""
    out = {}
    for link in links:
        if link.ours not in full:
            raise KeyError(f"state dict lacks {link.ours!r}")
        out.update({k: v.contiguous() for k, v in export_tensors(link, full[link.ours]).items()})
    return out


# --- streaming order -----------------------------------------------------------------------------

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
