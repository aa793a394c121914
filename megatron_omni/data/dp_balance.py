"""Encoder-aware balance of packed rows across the data-parallel ranks of a step.

Rows are packed to the LLM token budget (:mod:`megatron_omni.data.packing`), so every row costs
the LLM about the same, but not the encoders: a row of sixteen small images, one 6K-token video
and a row of pure text differ a lot in ViT work, and a long text sample costs more attention than
ten short ones. Every DP rank waits for the slowest at the gradient reduction, so the step runs at
the pace of the most expensive rank.

Cost of a row (:class:`CostModel`, training FLOPs from :mod:`megatron_omni.training.flops`, all
from stored counts, nothing decoded): the LLM's linear work on the whole (padded) row + causal
attention per packed sample (``s_i^2``) + the ViT per pre-merge patch and per attention block
(``n^2`` for each image / video temporal slice) + SAN-M per frame and per clip (``f^2``).

Balance (:func:`balance_step`): the ``ranks x micro_batches x micro_batch_size`` rows of a step
are dealt to ranks longest-first (each to the least-loaded rank with a free slot, ties to the
lower rank), then pairwise swaps between the most- and less-loaded ranks lower the maximum while
any helps; a rank's rows are grouped into micro-batches the same way. Rows themselves are not
changed, so the token efficiency is the packer's. Deterministic: a pure function of the rows in
order.

Streaming with exact resume: :class:`BalancedSteps` packs fixed chunks of ``buffer_size``
samples (exactly :class:`~megatron_omni.data.packing.Packer`'s rows), keeps the rows in packing
order and takes the next ``ranks x micro_batches x mbs`` of them for each step. Its state is the
chunk the oldest pending row came from and how many rows of it were already used: resuming
re-packs that chunk (packing is a pure function of the chunk) and continues bit for bit.

Not wired into ``data/loaders.py`` here (other work is changing it): a loader that sees all DP
ranks' samples of a step (e.g. the one rank per model-parallel group that reads) feeds
:class:`BalancedSteps` and hands rank ``r`` its ``step[r]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .packing import PackedRow, PackingConfig, PackingStats, SampleInfo, pack_samples

__all__ = ["CostModel", "BalancedSteps", "balance_step", "imbalance", "contiguous_step"]


@dataclass(frozen=True)
class CostModel:
    """FLOPs of one training step (forward + backward = 3 forward passes) per unit of each
    quantity a row's cost depends on."""

    seq_length: int
    llm_per_token: float
    llm_per_sample_sq: float
    vit_per_patch: float = 0.0
    vit_per_block_sq: float = 0.0
    sanm_per_frame: float = 0.0
    sanm_per_clip_sq: float = 0.0

    @classmethod
    def from_config(cls, cfg, seq_length: Optional[int] = None) -> "CostModel":
        """Coefficients of an :class:`~megatron_omni.config.schema.OmniConfig` (or its
        ``model``) from the FLOP formulas: exact, since each formula is linear + quadratic."""
        from ..training.flops import llm_forward_flops, sanm_forward_flops, vit_forward_flops
        model = getattr(cfg, "model", cfg)
        seq = seq_length or getattr(getattr(cfg, "data", None), "seq_length", None)
        if not seq:
            raise ValueError("give seq_length (or a full config with data.seq_length)")
        llm = model.llm
        one = llm_forward_flops(llm, [1])
        sq = one.layers_attention  # causal attention is exactly c * s^2: c = its value at s = 1
        per_token = one.layers_linear + one.other
        vit_patch = vit_sq = 0.0
        if model.vision.enabled:
            out = model.vision.merger_hidden_size or llm.hidden_size
            g = model.vision.spatial_merge_size
            a = vit_forward_flops(model.vision, [(1, g, g)], out)
            vit_sq = a.layers_attention / float((g * g) ** 2)
            vit_patch = (a.layers_linear + a.other + a.input_layer) / float(g * g)
        sanm_frame = sanm_sq = 0.0
        if model.audio.enabled:
            f1 = sanm_forward_flops(model.audio, [100]).total
            f2 = sanm_forward_flops(model.audio, [200]).total
            sanm_sq = (f2 - 2 * f1) / (200.0 ** 2 - 2 * 100.0 ** 2)
            sanm_frame = (f1 - sanm_sq * 100.0 ** 2) / 100.0
        return cls(int(seq), 3 * per_token, 3 * sq, 3 * vit_patch, 3 * vit_sq,
                   3 * sanm_frame, 3 * sanm_sq)

    def sample_cost(self, s: SampleInfo, tokens: Optional[int] = None) -> float:
        """What one sample adds to its row beyond the row's fixed LLM cost."""
        n = s.num_tokens if tokens is None else tokens
        blocks = s.attention_blocks or ((s.num_patches,) if s.num_patches else ())
        return (self.llm_per_sample_sq * n * n
                + self.vit_per_patch * s.num_patches
                + self.vit_per_block_sq * sum(b * b for b in blocks)
                + self.sanm_per_frame * sum(s.audio_frames)
                + self.sanm_per_clip_sq * sum(f * f for f in s.audio_frames))

    def row_cost(self, row: PackedRow, infos: dict) -> float:
        """A packed row: the LLM's linear work on all ``seq_length`` positions (padding runs
        through the layers too) + every sample's own cost (``infos``: id -> SampleInfo)."""
        return self.llm_per_token * row.seq_length + sum(
            self.sample_cost(infos[i], n) for i, n in zip(row.sample_ids, row.lengths))


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of per-rank loads (1.0 = perfectly balanced)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


def _deal(order: list[int], costs: Sequence[float], bins: int, slots: int) -> list[list[int]]:
    """Longest first to the least-loaded bin with a free slot, then improving swaps."""
    out: list[list[int]] = [[] for _ in range(bins)]
    load = [0.0] * bins
    for i in sorted(order, key=lambda i: (-costs[i], i)):
        b = min((k for k in range(bins) if len(out[k]) < slots), key=lambda k: (load[k], k))
        out[b].append(i)
        load[b] += costs[i]
    for _ in range(64 * bins):
        hi = max(range(bins), key=lambda k: (load[k], -k))
        best = None
        for lo in sorted(range(bins), key=lambda k: (load[k], k)):
            gap = load[hi] - load[lo]
            if gap <= 0:
                break
            for a in out[hi]:
                for b in out[lo]:
                    d = costs[a] - costs[b]
                    if 0 < d < gap:
                        # new max of the pair: max(load_hi - d, load_lo + d); smaller is better
                        score = max(load[hi] - d, load[lo] + d)
                        if best is None or score < best[0] - 1e-9:
                            best = (score, lo, a, b, d)
            if best is not None:
                break
        if best is None:
            break
        _, lo, a, b, d = best
        out[hi][out[hi].index(a)] = b
        out[lo][out[lo].index(b)] = a
        load[hi] -= d
        load[lo] += d
    return [sorted(x) for x in out]


def balance_step(costs: Sequence[float], ranks: int, micro_batches: int,
                 micro_batch_size: int = 1) -> list[list[list[int]]]:
    """Row indices for ``[rank][micro_batch]`` (each ``micro_batch_size`` long) balancing the
    per-rank and, within a rank, the per-micro-batch cost. Needs exactly
    ``ranks * micro_batches * micro_batch_size`` costs."""
    per_rank = micro_batches * micro_batch_size
    if len(costs) != ranks * per_rank:
        raise ValueError(f"a step needs {ranks * per_rank} rows, got {len(costs)}")
    out = []
    for rows in _deal(list(range(len(costs))), costs, ranks, per_rank):
        if micro_batch_size == 1:
            out.append([[i] for i in rows])
            continue
        sub = _deal(list(range(len(rows))), [costs[i] for i in rows], micro_batches,
                    micro_batch_size)
        out.append([[rows[j] for j in mb] for mb in sub])
    return out


def contiguous_step(n_rows: int, ranks: int, micro_batches: int,
                    micro_batch_size: int = 1) -> list[list[list[int]]]:
    """The token-only baseline: rank r takes the r-th consecutive slice of the step's rows (as
    when every rank packs its own stream), micro-batches in order."""
    per = micro_batches * micro_batch_size
    return [[list(range(r * per + m * micro_batch_size, r * per + (m + 1) * micro_batch_size))
             for m in range(micro_batches)] for r in range(ranks)]


class BalancedSteps:
    """Steps of cost-balanced rows from a sequence of sample descriptors (see module doc).

    ``next_step()`` returns ``[rank][micro_batch] -> list of PackedRow`` or None at the end
    (a final partial step is dropped, as a fixed-shape training step cannot use it).

    With ``balance`` the step's rows are chosen from a window of ``window_steps`` steps' worth of
    pending rows: sorted by cost, the step takes the block of consecutive rows that contains
    the oldest pending row (so every row is used within a bounded number of steps), i.e. rows of
    similar cost, and :func:`balance_step` deals them. Without ``balance`` (the token-only
    baseline) the step takes the next rows in packing order and rank r the r-th slice.
    """

    def __init__(self, samples: Sequence[SampleInfo], config: PackingConfig, cost: CostModel,
                 ranks: int, micro_batches: int, micro_batch_size: int = 1,
                 buffer_size: int = 1024, balance: bool = True, window_steps: int = 8) -> None:
        if min(buffer_size, ranks, micro_batches, micro_batch_size, window_steps) <= 0:
            raise ValueError("buffer_size, ranks, micro_batches, micro_batch_size and "
                             "window_steps must be > 0")
        self.samples, self.config, self.cost = samples, config, cost
        self.ranks, self.micro_batches, self.mbs = ranks, micro_batches, micro_batch_size
        self.buffer_size, self.balance = buffer_size, balance
        self.window = window_steps if balance else 1
        self.stats = PackingStats(seq_length=config.seq_length)
        """Packing counters of this run (since construction or resume)."""
        self.skipped: list = []
        """(sample id, reason) of samples the packer skipped."""
        self._infos = {s.id: s for s in samples}
        self._pending: list[tuple[int, int, PackedRow, float]] = []  # chunk, index, row, cost
        self._next_chunk = 0

    @property
    def rows_per_step(self) -> int:
        return self.ranks * self.micro_batches * self.mbs

    def _pack_chunk(self, count: bool = True) -> list[tuple[int, int, PackedRow, float]]:
        start = self._next_chunk
        if start >= len(self.samples):
            return []
        res = pack_samples(self.samples[start:start + self.buffer_size], self.config)
        if count:  # a chunk re-packed on resume was counted before the checkpoint
            self.stats += res.stats
            self.skipped += list(res.skipped)
        self._next_chunk = start + self.buffer_size
        return [(start, k, r, self.cost.row_cost(r, self._infos)) for k, r in enumerate(res.rows)]

    def next_step(self) -> Optional[list[list[list[PackedRow]]]]:
        need = self.rows_per_step
        while len(self._pending) < need * self.window:
            more = self._pack_chunk()
            if not more:
                break
            self._pending += more
        if len(self._pending) < need:
            return None
        if self.balance:
            order = sorted(range(len(self._pending)),
                           key=lambda k: (self._pending[k][3], k))
            at = order.index(0)  # the oldest pending row
            lo = min(max(0, at - need // 2), len(order) - need)
            take = sorted(order[lo:lo + need])
        else:
            take = list(range(need))
        chosen = [self._pending[k] for k in take]
        keep = set(take)
        self._pending = [x for k, x in enumerate(self._pending) if k not in keep]
        rows = [x[2] for x in chosen]
        if self.balance:
            plan = balance_step([x[3] for x in chosen], self.ranks, self.micro_batches,
                                self.mbs)
        else:
            plan = contiguous_step(len(rows), self.ranks, self.micro_batches, self.mbs)
        return [[[rows[i] for i in mb] for mb in rank] for rank in plan]

    def state_dict(self) -> dict[str, Any]:
        """The rows not used yet, as (chunk start, row index in the chunk), and the next chunk
        to pack; taken at a step boundary."""
        return {"next_chunk": self._next_chunk,
                "pending": [[c, k] for c, k, _, _ in self._pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        want = [(int(c), int(k)) for c, k in state["pending"]]
        rows: dict = {}
        for c in sorted({c for c, _ in want}):
            self._next_chunk = c
            rows.update({(x[0], x[1]): x for x in self._pack_chunk(count=False)})
        self._pending = [rows[w] for w in want]
        self._next_chunk = int(state["next_chunk"])
