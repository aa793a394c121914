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

In training (``data.dp_balance: cost``, wired in ``training/trainer.py``'s ``EnergonData``):
Energon gives every DP rank its own shard slice and each rank packs its own rows, so no rank sees
a step's samples of the others. :class:`RowExchange` therefore keeps the packing as it is and
balances the step's micro-batches instead: the data-reading ranks all-gather the cost of every
micro-batch of the step (:meth:`CostModel.batch_cost`, from the batch's ``cu_seqlens``, grids and
audio lengths; a few floats per micro-batch), every one of them computes the same
:func:`swap_plan` (from the identity: pairwise swaps of two micro-batches of the SAME modality
group between the most-loaded rank and another while that lowers the maximum), and only the
swapped micro-batches travel, point to point, before decoding (with deferred decoding they move
still encoded). Exact resume needs nothing new: the plan is a pure function of the step's
micro-batches and no row is held across a step boundary. :class:`BalancedSteps` (a global view
with a look-ahead window) stays the reference for what a window could add; see BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .packing import PackedRow, PackingConfig, PackingStats, SampleInfo, pack_samples

__all__ = ["CostModel", "BalancedSteps", "RowExchange", "balance_step", "contiguous_step",
           "imbalance", "swap_plan"]

AUDIO_SAMPLES_PER_FRAME = 960
"""16 kHz samples per SAN-M frame (10 ms hop x LFR 6), as the trainer's FLOP count uses."""


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

    def batch_cost(self, batch: dict) -> float:
        """A loader micro-batch (``data/loaders.py`` batch dict, B rows of ``T`` tokens): the LLM's
        linear work on all ``B*T`` positions + attention per real sample (padding segments left out,
        as in :meth:`row_cost`) + the ViT per patch and per attention block (each image, each video
        temporal slice) + SAN-M per frame and per clip."""
        tokens = batch["tokens"]
        T = int(tokens.shape[-1])
        real = [int(n) for n in batch["num_tokens"].tolist()] if "num_tokens" in batch else None
        cu = [int(x) for x in batch["cu_seqlens"].tolist()]
        att = 0.0
        for a, b in zip(cu[:-1], cu[1:]):
            row = a // T
            if real is not None and row < len(real) and a - row * T >= real[row]:
                continue  # the row's padding segment
            att += float(b - a) ** 2
        c = self.llm_per_token * tokens.numel() + self.llm_per_sample_sq * att
        grids = batch.get("vision_grid_thw")
        for t, h, w in (grids.tolist() if grids is not None else []):
            c += self.vit_per_patch * t * h * w + self.vit_per_block_sq * t * float(h * w) ** 2
        lengths = batch.get("audio_lengths")
        for n in (lengths.tolist() if lengths is not None else []):
            f = max(1, int(n) // AUDIO_SAMPLES_PER_FRAME)
            c += self.sanm_per_frame * f + self.sanm_per_clip_sq * float(f) ** 2
        return c


def swap_plan(costs: Sequence[Sequence[float]], groups: Sequence[Sequence[Any]],
              target: float = 1.0, max_swaps: Optional[int] = None
              ) -> list[tuple[int, int, int, int]]:
    """Swaps ``(rank_a, slot_a, rank_b, slot_b)``, applied in order, that lower the most-loaded
    rank's total while any helps and max/mean is above ``target`` (1.0: as far as swaps go; a
    little above 1 moves fewer micro-batches for about the same step time).
    ``costs[r][k]`` / ``groups[r][k]``: cost and group (modality) of slot k of rank r; only
    slots of the same group swap, so every rank keeps its slots' groups. Starts from the
    identity (nothing moves unless it pays); deterministic (ties to the lower index): every rank
    computes the same plan from the same all-gathered costs."""
    import numpy as np

    ranks = len(costs)
    flat = np.array([float(c) for row in costs for c in row])
    owner = np.array([r for r, row in enumerate(costs) for _ in row])
    slot = np.array([k for row in costs for k in range(len(row))])
    keys = {g: i for i, g in enumerate(sorted({g for row in groups for g in row}, key=str))}
    group = np.array([keys[g] for row in groups for g in row])
    loads = np.zeros(ranks)
    np.add.at(loads, owner, flat)
    plan: list[tuple[int, int, int, int]] = []
    limit = max_swaps if max_swaps is not None else 4 * len(flat)
    mean = float(loads.mean()) if ranks else 0.0
    while len(plan) < limit:
        hi = int(np.argmax(loads))
        if loads[hi] <= mean * target:
            break
        best = None
        for a in np.nonzero(owner == hi)[0]:
            cand = np.nonzero((owner != hi) & (group == group[a]))[0]
            if not len(cand):
                continue
            d = flat[a] - flat[cand]
            gap = loads[hi] - loads[owner[cand]]
            score = np.maximum(loads[hi] - d, loads[owner[cand]] + d)
            score[~((d > 0) & (d < gap))] = np.inf
            k = int(np.argmin(score))
            if np.isfinite(score[k]) and (best is None or score[k] < best[0] * (1 - 1e-12)):
                best = (float(score[k]), int(a), int(cand[k]))
        if best is None:
            break
        _, a, b = best
        lo = int(owner[b])
        plan.append((hi, int(slot[a]), lo, int(slot[b])))
        d = flat[a] - flat[b]
        loads[hi] -= d
        loads[lo] += d
        owner[a], owner[b] = lo, hi
        slot[a], slot[b] = slot[b], slot[a]
    return plan


def apply_swaps(per_rank: Sequence[Sequence[Any]], plan) -> list[list[Any]]:
    """What every rank holds after ``plan`` (a check and a simulation of :class:`RowExchange`)."""
    out = [list(x) for x in per_rank]
    for ra, sa, rb, sb in plan:
        out[ra][sa], out[rb][sb] = out[rb][sb], out[ra][sa]
    return out


class RowExchange:
    """Cost-balance a step's micro-batches across the data-parallel ranks (module docstring).

    Collective over ``group`` (the data-reading ranks of the DP replicas); every member calls
    :meth:`exchange` with its step ``{group name: [batch, ...]}`` (same names and counts on every
    rank) and gets its balanced step back, batches in the same slots. ``moved`` counts the
    micro-batches this rank sent."""

    def __init__(self, cost: CostModel, group=None, target: float = 1.01) -> None:
        import torch.distributed as dist

        self.cost = cost
        self.group = group
        self.target = target
        self.ranks = dist.get_process_group_ranks(group) if group is not None else \
            list(range(dist.get_world_size()))
        self.me = self.ranks.index(dist.get_rank())
        self.moved = 0

    def exchange(self, step: dict) -> dict:
        import torch.distributed as dist

        from .mp_broadcast import recv_batch, send_batch

        failed = isinstance(step, BaseException)
        if len(self.ranks) == 1:
            if failed:
                raise step
            return step
        names = [] if failed else sorted(step)
        slots = [(m, k) for m in names for k in range(len(step[m]))]
        mine = (f"{type(step).__name__}: {step}" if failed else
                [self.cost.batch_cost(step[m][k]) for m, k in slots])
        everyone: list = [None] * len(self.ranks)
        dist.all_gather_object(everyone, mine, group=self.group)
        bad = [(self.ranks[r], x) for r, x in enumerate(everyone) if isinstance(x, str)]
        if failed:
            raise step
        if bad:
            raise RuntimeError(f"data-reading rank {bad[0][0]} failed: {bad[0][1]}")
        plan = swap_plan(everyone, [[m for m, _ in slots]] * len(self.ranks), self.target)
        out = {m: list(step[m]) for m in names}
        for ra, sa, rb, sb in plan:
            if self.me not in (ra, rb):
                continue
            mine_slot, peer = (sa, rb) if self.me == ra else (sb, ra)
            m, k = slots[mine_slot]
            dst = self.ranks[peer]
            if self.me < peer:  # the lower rank sends first: no two blocking sends meet
                send_batch(out[m][k], dst, self.group)
                got = recv_batch(dst, self.group)
            else:
                got = recv_batch(dst, self.group)
                send_batch(out[m][k], dst, self.group)
            out[m][k] = got
            self.moved += 1
        return out


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
