"""Metadata-driven sequence packing: token budget + media budget, ``cu_seqlens`` per row.

Packing works on *descriptors* (:class:`SampleInfo`: id, LLM token count, images, pre-merge
vision patches, modality) that preprocessing stored next to every sample, so rows are decided
before any media is decoded (docs/architecture.md principle 4).

Algorithm. The core, :func:`pack_samples`, takes one buffer of descriptors and returns rows:

* every sample stays whole; no row exceeds ``seq_length`` tokens, ``max_images_per_row`` images
  or ``max_patches_per_row`` vision patches;
* a sample that can never fit is skipped and counted per reason (``too_long``,
  ``too_many_images``, ``too_many_patches``, ``empty``); pure text longer than ``seq_length``
  is instead cut to ``seq_length`` when ``truncate_text=True`` and reported in
  :attr:`PackedRow.truncated` / :attr:`PackingStats.truncated`;
* the default strategy, ``auto``, starts with *best-fit decreasing* over several budgets:
  samples are taken in decreasing order of their dominant normalised size ``max(tokens /
  seq_length, images / max_images, patches / max_patches)`` and each goes into the open row that
  fits it with the least token room left (ties: the older row). Unless that already reaches the
  lower bound on the number of rows, further packers are tried and the result with the fewest
  rows kept (ties: the earlier packer): with a media budget, best fit in plain token order and a
  row-at-a-time packer that pairs image-heavy with image-free samples (:func:`_bin_centric`;
  decreasing orders do poorly when images-per-row binds); always, first fit in arrival order, so
  ``auto`` is never worse than first fit. ``best_fit_decreasing`` (the first pass alone),
  ``first_fit`` (arrival order) and ``one_per_row`` (naive padding) are there as baselines.

Output of a row (:class:`PackedRow`), for samples of lengths ``l0, l1, ...`` packed in order:

* ``cu_seqlens``        int32 ``[0, l0, l0+l1, ..., T]`` with ``T`` = real tokens in the row;
* ``cu_seqlens_padded`` int32: ``cu_seqlens`` plus one final *padding segment* ``[..., T,
  seq_length]`` when the row is padded (``num_pad = seq_length - T > 0``), else equal to
  ``cu_seqlens``. Feeding it to a varlen attention makes the pad tokens attend only to each other
  (they carry no loss); the real samples never see them. For Transformer Engine's THD
  ``cu_seqlens_q_padded`` (same length as ``cu_seqlens``, padding owned by the last sequence) use
  :meth:`PackedRow.cu_seqlens_te_padded`;
* ``position_starts``   int32 start offset of every sample (= ``cu_seqlens[:-1]``): positions
  (and M-RoPE indices) restart at 0 at each of them; :meth:`PackedRow.position_ids` gives the 1-D
  version.

Determinism: for a given input order and config the output is identical (sorts are stable on the
arrival index). Rows are returned ordered by their earliest sample, samples inside a row in
arrival order.

Streaming: :class:`Packer` buffers samples one by one and packs each full buffer with
:func:`pack_samples` (and the remainder on :meth:`Packer.flush`), so its output is exactly the
concatenation of :func:`pack_samples` over consecutive chunks of ``buffer_size`` samples.
:func:`select_samples_to_pack` is the same core in the shape of Megatron-Energon's
``TaskEncoder.select_samples_to_pack`` hook (list of samples -> list of lists).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left, insort
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

__all__ = [
    "SKIP_EMPTY",
    "SKIP_TOO_LONG",
    "SKIP_TOO_MANY_IMAGES",
    "SKIP_TOO_MANY_PATCHES",
    "STRATEGIES",
    "PackResult",
    "PackedRow",
    "Packer",
    "PackingConfig",
    "PackingStats",
    "SampleInfo",
    "pack_samples",
    "realistic_mix",
    "select_samples_to_pack",
]

SKIP_TOO_LONG = "too_long"
SKIP_TOO_MANY_IMAGES = "too_many_images"
SKIP_TOO_MANY_PATCHES = "too_many_patches"
SKIP_EMPTY = "empty"

STRATEGIES = ("auto", "best_fit_decreasing", "first_fit", "one_per_row")

T = TypeVar("T")


@dataclass(frozen=True)
class SampleInfo:
    """What packing needs to know about one sample, known before decoding."""

    id: Hashable
    """Sample key (anything hashable: the shard key, an index, ...)."""
    num_tokens: int
    """LLM tokens the sample takes: text + template + every image/video/audio patch token."""
    num_images: int = 0
    """Vision items the ViT processes for this sample (images; a video counts as one)."""
    num_patches: int = 0
    """Pre-merge 14-px vision patches (``t*h*w`` of every grid_thw; 4x the vision LLM tokens)."""
    modality: str = "text"
    """``text`` (pure text: the only modality that may be truncated), ``image``, ``video``, ..."""
    attention_blocks: tuple = ()
    """Pre-merge patches of every ViT attention block (one per image, one per temporal slice
    ``h*w`` of a video), for the compute cost (:mod:`megatron_omni.data.dp_balance`); empty =
    one block of ``num_patches``."""
    audio_frames: tuple = ()
    """SAN-M encoder frames of every audio clip (compute cost only)."""

    @property
    def is_pure_text(self) -> bool:
        return self.modality == "text" and self.num_images == 0 and self.num_patches == 0


@dataclass(frozen=True)
class PackingConfig:
    """Budgets of one packed row and what to do with samples that do not fit."""

    seq_length: int
    """Token budget of a row (the LLM sequence length)."""
    max_images_per_row: int | None = None
    """At most this many vision items (images + videos) per row; None = no limit."""
    max_patches_per_row: int | None = None
    """At most this many pre-merge vision patches per row (bounds ViT memory); None = no limit."""
    truncate_text: bool = False
    """Cut pure-text samples longer than ``seq_length`` to ``seq_length`` instead of skipping."""
    pad_to_seq_length: bool = True
    """Rows are padded to ``seq_length`` (fixed shapes). False: rows end at their real length and
    ``cu_seqlens_padded == cu_seqlens``."""
    strategy: str = "auto"
    """``auto`` (default: best of several packers, see the module docstring),
    ``best_fit_decreasing`` (that pass alone), or the baselines ``first_fit`` (arrival order) and
    ``one_per_row`` (naive padding, one sample per row)."""

    def __post_init__(self) -> None:
        if not isinstance(self.seq_length, int) or self.seq_length <= 0:
            raise ValueError(f"seq_length must be a positive int, got {self.seq_length!r}")
        for name in ("max_images_per_row", "max_patches_per_row"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be None (no limit) or an int >= 0, got {v!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")


@dataclass
class PackingStats:
    """Counters of one or many packing calls (add them up with ``+=``)."""

    seq_length: int
    rows: int = 0
    samples: int = 0
    """Samples placed in rows (truncated ones included)."""
    real_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Skipped samples per reason."""
    truncated: int = 0
    """Pure-text samples cut to ``seq_length``."""
    truncated_tokens: int = 0
    """Tokens dropped by truncation."""

    @property
    def slots(self) -> int:
        """Token slots of the rows: ``rows * seq_length``."""
        return self.rows * self.seq_length

    @property
    def efficiency(self) -> float:
        """Real tokens / slots (1.0 = no padding); 0.0 when there are no rows."""
        return self.real_tokens / self.slots if self.rows else 0.0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __iadd__(self, other: PackingStats) -> PackingStats:
        if other.seq_length != self.seq_length:
            raise ValueError("cannot add stats of different seq_length")
        self.rows += other.rows
        self.samples += other.samples
        self.real_tokens += other.real_tokens
        self.skipped.update(other.skipped)
        self.truncated += other.truncated
        self.truncated_tokens += other.truncated_tokens
        return self

    def as_dict(self) -> dict[str, Any]:
        """Flat dict for logging / TensorBoard."""
        return {
            "rows": self.rows,
            "samples": self.samples,
            "real_tokens": self.real_tokens,
            "slots": self.slots,
            "efficiency": self.efficiency,
            "truncated": self.truncated,
            "truncated_tokens": self.truncated_tokens,
            **{f"skipped/{k}": v for k, v in sorted(self.skipped.items())},
        }


@dataclass(frozen=True, eq=False)
class PackedRow:
    """One packed row. Arrays are numpy int32; see the module docstring for their meaning."""

    sample_ids: tuple
    lengths: tuple[int, ...]
    """Tokens each sample occupies in the row (after truncation)."""
    modalities: tuple[str, ...]
    num_images: int
    num_patches: int
    seq_length: int
    cu_seqlens: np.ndarray
    cu_seqlens_padded: np.ndarray
    num_pad: int
    truncated: dict
    """``{sample_id: original num_tokens}`` for samples cut to ``seq_length``."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackedRow):
            return NotImplemented
        return (
            (self.sample_ids, self.lengths, self.modalities, self.num_images, self.num_patches)
            == (
                other.sample_ids,
                other.lengths,
                other.modalities,
                other.num_images,
                other.num_patches,
            )
            and (self.seq_length, self.num_pad, self.truncated)
            == (other.seq_length, other.num_pad, other.truncated)
            and np.array_equal(self.cu_seqlens, other.cu_seqlens)
            and np.array_equal(self.cu_seqlens_padded, other.cu_seqlens_padded)
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.cu_seqlens[-1])

    @property
    def position_starts(self) -> np.ndarray:
        """Offset where each sample starts (positions restart at 0 there)."""
        return self.cu_seqlens[:-1]

    def cu_seqlens_te_padded(self) -> np.ndarray:
        """Same length as ``cu_seqlens``, the padding appended to the last sample's slot
        (Transformer Engine THD ``cu_seqlens_q_padded`` convention)."""
        out = self.cu_seqlens.copy()
        out[-1] = self.cu_seqlens_padded[-1]
        return out

    def position_ids(self) -> np.ndarray:
        """1-D positions (int64, length ``cu_seqlens_padded[-1]``) restarting at 0 at every
        segment of ``cu_seqlens_padded`` (the pad segment counts from 0 too)."""
        cu = self.cu_seqlens_padded.astype(np.int64)
        total = int(cu[-1])
        starts = np.repeat(cu[:-1], np.diff(cu))
        return np.arange(total, dtype=np.int64) - starts


@dataclass
class PackResult:
    rows: list[PackedRow]
    stats: PackingStats
    skipped: list[tuple[Hashable, str]]
    """``(sample_id, reason)`` of every skipped sample, in arrival order."""


# ----------------------------------------------------------------------------- core


def _admit(
    samples: Sequence[SampleInfo], cfg: PackingConfig, stats: PackingStats
) -> tuple[list[tuple[int, int, int, int]], list[tuple[Hashable, str]], dict[int, int]]:
    """Filter / truncate. Returns items ``(arrival, tokens, images, patches)``, the skipped list
    and ``{arrival: original tokens}`` of truncated items."""
    S = cfg.seq_length
    max_i, max_p = cfg.max_images_per_row, cfg.max_patches_per_row
    items: list[tuple[int, int, int, int]] = []
    skipped: list[tuple[Hashable, str]] = []
    truncated: dict[int, int] = {}
    for idx, s in enumerate(samples):
        n, ni, npch = s.num_tokens, s.num_images, s.num_patches
        if n < 0 or ni < 0 or npch < 0:
            raise ValueError(f"sample {s.id!r}: negative count in {s}")
        reason = None
        if n == 0:
            reason = SKIP_EMPTY
        elif n > S:
            if cfg.truncate_text and s.is_pure_text:
                truncated[idx] = n
                stats.truncated += 1
                stats.truncated_tokens += n - S
                n = S
            else:
                reason = SKIP_TOO_LONG
        if reason is None and max_i is not None and ni > max_i:
            reason = SKIP_TOO_MANY_IMAGES
        if reason is None and max_p is not None and npch > max_p:
            reason = SKIP_TOO_MANY_PATCHES
        if reason is not None:
            skipped.append((s.id, reason))
            stats.skipped[reason] += 1
            continue
        items.append((idx, n, ni, npch))
    return items, skipped, truncated


def _best_fit(items: list[tuple[int, int, int, int]], cfg: PackingConfig) -> list[list[int]]:
    """Best fit over ``items`` in the given order. Returns bins of positions into ``items``."""
    S = cfg.seq_length
    max_i = cfg.max_images_per_row if cfg.max_images_per_row is not None else math.inf
    max_p = cfg.max_patches_per_row if cfg.max_patches_per_row is not None else math.inf
    bins: list[list[int]] = []
    rem_t: list[int] = []
    used_i: list[int] = []
    used_p: list[int] = []
    open_rows: list[tuple[int, int]] = []  # sorted (token room left, row index); full rows dropped
    for pos, (_, n, ni, npch) in enumerate(items):
        j = bisect_left(open_rows, (n, -1))
        chosen = -1
        while j < len(open_rows):
            r = open_rows[j][1]
            if used_i[r] + ni <= max_i and used_p[r] + npch <= max_p:
                chosen = r
                break
            j += 1
        if chosen < 0:
            chosen = len(bins)
            bins.append([])
            rem_t.append(S)
            used_i.append(0)
            used_p.append(0)
        else:
            open_rows.pop(j)
        bins[chosen].append(pos)
        rem_t[chosen] -= n
        used_i[chosen] += ni
        used_p[chosen] += npch
        if rem_t[chosen] > 0:
            insort(open_rows, (rem_t[chosen], chosen))
    return bins


def _first_fit(items: list[tuple[int, int, int, int]], cfg: PackingConfig) -> list[list[int]]:
    """First fit in the given order (the oldest row that has room)."""
    S = cfg.seq_length
    max_i = cfg.max_images_per_row if cfg.max_images_per_row is not None else math.inf
    max_p = cfg.max_patches_per_row if cfg.max_patches_per_row is not None else math.inf
    bins: list[list[int]] = []
    state: list[list[int]] = []  # [tokens used, images, patches]
    for pos, (_, n, ni, npch) in enumerate(items):
        for b, st in enumerate(state):
            if st[0] + n <= S and st[1] + ni <= max_i and st[2] + npch <= max_p:
                bins[b].append(pos)
                st[0] += n
                st[1] += ni
                st[2] += npch
                break
        else:
            bins.append([pos])
            state.append([n, ni, npch])
    return bins


def _bin_centric(items: list[tuple[int, int, int, int]], cfg: PackingConfig) -> list[list[int]]:
    """Fill one row at a time: keep adding the fitting item whose demand best matches the row's
    free capacity (largest weighted dot product demand . room, each budget normalised and
    weighted by how scarce it is over the buffer). Pairs image-heavy with image-free samples
    when a media budget binds, where the decreasing orders do poorly."""
    S = cfg.seq_length
    mi, mp = cfg.max_images_per_row, cfg.max_patches_per_row
    dem = np.array([(it[1], it[2], it[3]) for it in items], dtype=np.int64)
    cap = np.array([S, mi if mi else 1, mp if mp else 1], dtype=np.int64)
    scarcity = dem.sum(0) / cap * np.array([1.0, 1.0 if mi else 0.0, 1.0 if mp else 0.0])
    w = scarcity / scarcity.max()
    d = [dem[:, k] / cap[k] for k in range(3)]
    alive = np.ones(len(items), dtype=bool)
    left = len(items)
    bins: list[list[int]] = []
    while left:
        room = cap.copy()
        if not mi:
            room[1] = np.iinfo(np.int64).max // 2
        if not mp:
            room[2] = np.iinfo(np.int64).max // 2
        b: list[int] = []
        while left:
            feas = alive & (dem[:, 0] <= room[0]) & (dem[:, 1] <= room[1]) & (dem[:, 2] <= room[2])
            if not feas.any():
                break
            r = [room[k] / cap[k] for k in range(3)]
            # Element-wise (no reductions) so the scores, hence the picks, are bit-reproducible.
            score = w[0] * d[0] * r[0] + w[1] * d[1] * r[1] + w[2] * d[2] * r[2]
            k = int(np.argmax(np.where(feas, score, -np.inf)))  # ties: earliest position
            b.append(k)
            alive[k] = False
            left -= 1
            room -= dem[k]
        bins.append(b)
    return bins


def _lower_bound(items: list[tuple[int, int, int, int]], cfg: PackingConfig) -> int:
    """No packing can use fewer rows than this (per budget: total demand / row capacity)."""
    lb = math.ceil(sum(it[1] for it in items) / cfg.seq_length)
    if cfg.max_images_per_row:
        lb = max(lb, math.ceil(sum(it[2] for it in items) / cfg.max_images_per_row))
    if cfg.max_patches_per_row:
        lb = max(lb, math.ceil(sum(it[3] for it in items) / cfg.max_patches_per_row))
    return lb


def _assign(items: list[tuple[int, int, int, int]], cfg: PackingConfig) -> list[list[int]]:
    """Bins of arrival indices, each sorted, bins ordered by their first arrival."""
    if not items:
        return []
    strategy = cfg.strategy
    if strategy == "one_per_row":
        return [[it[0]] for it in items]

    S = cfg.seq_length
    mi, mp = cfg.max_images_per_row, cfg.max_patches_per_row

    def dominant(it: tuple[int, int, int, int]) -> float:
        d = it[1] / S
        if mi:
            d = max(d, it[2] / mi)
        if mp:
            d = max(d, it[3] / mp)
        return d

    def by_dominant() -> list[tuple[int, int, int, int]]:
        # Decreasing; ties by tokens, then arrival (stable -> deterministic).
        return sorted(items, key=lambda it: (-dominant(it), -it[1], it[0]))

    # Candidate packers, cheapest / usually best first. Each returns bins of positions into the
    # list it was given, which the pair also carries.
    candidates: list[tuple[Callable, Callable]]
    if strategy == "first_fit":
        candidates = [(lambda: items, _first_fit)]
    elif strategy == "best_fit_decreasing":
        candidates = [(by_dominant, _best_fit)]
    else:  # auto
        candidates = [(by_dominant, _best_fit)]
        if mi or mp:
            candidates += [
                (lambda: sorted(items, key=lambda it: (-it[1], -it[3], -it[2], it[0])), _best_fit),
                (lambda: items, _bin_centric),
            ]
        candidates.append((lambda: items, _first_fit))

    lb = _lower_bound(items, cfg)
    best: list[list[int]] | None = None
    for order, packer in candidates:
        ordered = order()
        bins = [[ordered[p][0] for p in b] for b in packer(ordered, cfg)]
        if best is None or len(bins) < len(best):
            best = bins
        if len(best) <= lb:
            break
    assert best is not None
    for b in best:
        b.sort()
    best.sort(key=lambda b: b[0])
    return best


def pack_samples(samples: Sequence[SampleInfo], config: PackingConfig) -> PackResult:
    """Pack one buffer of sample descriptors into rows (pure function; see module docstring)."""
    stats = PackingStats(seq_length=config.seq_length)
    items, skipped, truncated = _admit(samples, config, stats)
    length_of = {it[0]: it[1] for it in items}
    rows: list[PackedRow] = []
    S = config.seq_length
    for b in _assign(items, config):
        lengths = tuple(length_of[i] for i in b)
        cu = np.zeros(len(b) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        total = int(cu[-1])
        assert total <= S
        num_pad = S - total if config.pad_to_seq_length else 0
        cu_pad = np.append(cu, np.int32(S)).astype(np.int32) if num_pad else cu.copy()
        rows.append(
            PackedRow(
                sample_ids=tuple(samples[i].id for i in b),
                lengths=lengths,
                modalities=tuple(samples[i].modality for i in b),
                num_images=sum(samples[i].num_images for i in b),
                num_patches=sum(samples[i].num_patches for i in b),
                seq_length=S,
                cu_seqlens=cu,
                cu_seqlens_padded=cu_pad,
                num_pad=num_pad,
                truncated={samples[i].id: truncated[i] for i in b if i in truncated},
            )
        )
        stats.rows += 1
        stats.samples += len(b)
        stats.real_tokens += total
    return PackResult(rows=rows, stats=stats, skipped=skipped)


def select_samples_to_pack(
    samples: Sequence[T],
    config: PackingConfig,
    info: Callable[[T], SampleInfo] | None = None,
    stats: PackingStats | None = None,
) -> list[list[T]]:
    """Energon-hook shaped core: partition ``samples`` into groups, one group per packed row.

    ``info(sample)`` gives the descriptor (default: the sample is a :class:`SampleInfo`; its
    ``id`` is ignored here, groups hold the original objects). Skipped samples are left out of
    every group; pass ``stats`` to have them (and the rows) counted. Truncation is only recorded
    in ``stats`` here: the caller cuts the tokens of a truncated pure-text sample.
    """
    descs = [
        SampleInfo(i, d.num_tokens, d.num_images, d.num_patches, d.modality)
        for i, d in enumerate(samples if info is None else map(info, samples))
    ]
    res = pack_samples(descs, config)
    if stats is not None:
        stats += res.stats
    return [[samples[i] for i in row.sample_ids] for row in res.rows]


class Packer:
    """Streaming packer: :meth:`add` samples one by one; every ``buffer_size`` samples the buffer
    is packed and its rows returned; :meth:`flush` packs what is left. Deterministic for a given
    input order; equal to :func:`pack_samples` on consecutive chunks of ``buffer_size``."""

    def __init__(self, config: PackingConfig, buffer_size: int = 1024) -> None:
        if buffer_size <= 0:
            raise ValueError(f"buffer_size must be > 0, got {buffer_size}")
        self.config = config
        self.buffer_size = buffer_size
        self.stats = PackingStats(seq_length=config.seq_length)
        self.skipped: list[tuple[Hashable, str]] = []
        self._buffer: list[SampleInfo] = []

    def __len__(self) -> int:
        """Samples waiting in the buffer."""
        return len(self._buffer)

    def _pack_buffer(self) -> list[PackedRow]:
        res = pack_samples(self._buffer, self.config)
        self._buffer = []
        self.stats += res.stats
        self.skipped.extend(res.skipped)
        return res.rows

    def add(self, sample: SampleInfo) -> list[PackedRow]:
        """Buffer one sample; returns the rows of the buffer when it became full, else []."""
        self._buffer.append(sample)
        if len(self._buffer) >= self.buffer_size:
            return self._pack_buffer()
        return []

    def flush(self) -> list[PackedRow]:
        """Pack and return whatever is buffered (call at the end of the stream)."""
        return self._pack_buffer() if self._buffer else []

    def pack_iter(self, samples: Iterable[SampleInfo]) -> Iterator[PackedRow]:
        """Stream rows for a whole iterable (flushes at the end)."""
        for s in samples:
            yield from self.add(s)
        yield from self.flush()


# ----------------------------------------------------------------------------- workloads


def realistic_mix(num_samples: int, seed: int = 0) -> list[SampleInfo]:
    """A fixed-seed M2-omni-like mix of descriptors, for benchmarks and tests.

    40% image captions (one image of 100-2560 LLM tokens + 20-80 text tokens), 20% audio
    (256 audio tokens + 10-60 text; a 5-30 s clip of 83-500 SAN-M frames), 15% video
    (1024-6144 tokens + 10-60 text; 8 temporal slices), 25% long pure text (200-8000 tokens).
    Media samples carry their template overhead (chat headers 12 tokens, ``<image>``/``</image>``
    style wrappers 2 tokens); vision patches are 4x the vision tokens (2x2 merge).
    """
    rng = random.Random(seed)
    clip = random.Random(f"{seed}-audio")  # separate stream: the token draws stay as they were
    out: list[SampleInfo] = []
    for i in range(num_samples):
        u = rng.random()
        if u < 0.40:
            vis = rng.randint(100, 2560)
            n = vis + 2 + rng.randint(20, 80) + 12
            out.append(SampleInfo(i, n, 1, 4 * vis, "image", (4 * vis,)))
        elif u < 0.60:
            n = 256 + 2 + rng.randint(10, 60) + 12
            # a 5-30 s clip: SAN-M LFR frames ~ 16.7 per second
            out.append(SampleInfo(i, n, 0, 0, "audio", (), (clip.randint(83, 500),)))
        elif u < 0.75:
            vis = rng.randint(1024, 6144)
            n = vis + 2 + rng.randint(10, 60) + 12
            # 16 frames = 8 temporal slices, the ViT attends within each slice
            out.append(SampleInfo(i, n, 1, 4 * vis, "video", (4 * vis // 8,) * 8))
        else:
            out.append(SampleInfo(i, rng.randint(200, 8000), 0, 0, "text"))
    return out
