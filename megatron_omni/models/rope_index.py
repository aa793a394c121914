"""Multimodal rotary position ids (M-RoPE, Qwen2-VL rule) for the M2-omni LLM.

Every token gets three position ids: (temporal, height, width).

* Text tokens (and everything that is not an image/video patch: wrappers such as ``<image>``,
  audio patch tokens, padding) are 1-D: ``t = h = w = p`` where ``p`` is the running index.
* A contiguous block of ``<imagePatch>`` (or ``<videoPatch>``) tokens is one image (video). Its
  tokens enumerate the merged grid ``(t, h / m, w / m)`` (``m`` = spatial merge size, 2) in
  row-major (t, h, w) order, and each of the three ids is ``p0 + index along that axis``, where
  ``p0`` is the running index at the start of the block. The block therefore holds
  ``t * h * w / m**2`` tokens.
* The token after a block continues at ``max(all positions so far) + 1``, i.e.
  ``p0 + max(t, h / m, w / m)``.
* Images and videos are matched to their grids in order of appearance. Videos use the plain
  temporal patch index (Qwen2-VL), not Qwen2.5-VL's seconds-per-grid scaling.

Grids are ``(t, h, w)`` in 14-px patches *before* the spatial merge (the vision encoder's
``grid_thw``); ``t = 1`` for an image, ``t = frames / temporal_patch_size`` for a video.

The work is vectorised: one cumulative sum per sample for the running index and one small
``arange`` per media item; there is no Python loop over tokens.

Generation: for the token at sequence index ``i >= T`` (after a prompt of ``T`` tokens), all three
position ids are ``i + rope_delta`` (``rope_delta = max(positions) + 1 - T``), like transformers'
``rope_deltas``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "MRopeIndex",
    "get_rope_index",
    "get_packed_rope_index",
    "vision_block_position_offsets",
]

GridLike = Sequence[int] | torch.Tensor
GridsLike = torch.Tensor | Sequence[GridLike] | None


class MRopeIndex(NamedTuple):
    """Result of :func:`get_rope_index`."""

    position_ids: torch.Tensor
    """LongTensor [3, T]: (temporal, height, width) position of every token."""
    rope_delta: int
    """``max(position_ids) + 1 - T`` (0 for an empty or text-only sequence)."""

    @property
    def next_position(self) -> int:
        """Position (all three rows) of the first token generated after the sequence."""
        return self.position_ids.shape[1] + self.rope_delta


def vision_block_position_offsets(
    grid_thw: GridLike, spatial_merge_size: int = 2, device: torch.device | str | None = None
) -> tuple[torch.Tensor, int]:
    """Per-token (t, h, w) offsets of one image/video block and the block's position span.

    Returns ``(offsets [3, N], span)`` with ``N = t * (h / m) * (w / m)`` and
    ``span = max(t, h / m, w / m)`` (the next text token sits at block start + span).
    """
    t, h, w = _grid_triple(grid_thw)
    m = spatial_merge_size
    if t <= 0 or h <= 0 or w <= 0 or h % m or w % m:
        raise ValueError(
            f"invalid grid_thw {(t, h, w)}: all sizes must be positive and h, w divisible by the "
            f"spatial merge size {m}"
        )
    gh, gw = h // m, w // m
    idx = torch.arange(t * gh * gw, dtype=torch.long, device=device)
    offsets = torch.stack((idx // (gh * gw), (idx // gw) % gh, idx % gw))
    return offsets, max(t, gh, gw)


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: GridsLike = None,
    video_grid_thw: GridsLike = None,
    *,
    token_ids: Any = None,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    audio_token_id: int | None = None,
    spatial_merge_size: int = 2,
) -> MRopeIndex:
    """M-RoPE position ids of one sample.

    Args:
        input_ids: 1-D LongTensor [T] of token ids.
        image_grid_thw: the sample's image grids in order of appearance: LongTensor [N, 3] or a
            sequence of (t, h, w); ``None`` for none.
        video_grid_thw: the sample's video grids, same forms.
        token_ids: a :class:`~megatron_omni.data.special_tokens.SpecialTokenIds`-like object with
            ``image_patch``, ``video_patch`` (and ``audio_patch``) ids. Explicit ``*_token_id``
            arguments take precedence over it.
        image_token_id / video_token_id: the ``<imagePatch>`` / ``<videoPatch>`` ids.
        audio_token_id: the ``<audioPatch>`` id; audio is positioned like text, the id is only
            checked not to collide with the vision patch ids.
        spatial_merge_size: the vision encoder's spatial merge (2).

    Raises:
        ValueError: when a block's patch-token count differs from its grid's ``t*h*w/m**2``, when
            there are more blocks than grids or grids left unused.
    """
    img_id, vid_id = _resolve_ids(token_ids, image_token_id, video_token_id, audio_token_id)
    ids = _check_ids(input_ids)
    images = _grid_list(image_grid_thw)
    videos = _grid_list(video_grid_thw)
    img_iter = _Consumer(images, "image")
    vid_iter = _Consumer(videos, "video")
    pos, delta = _sample_positions(ids, img_id, vid_id, img_iter, vid_iter, spatial_merge_size, "")
    img_iter.check_exhausted("")
    vid_iter.check_exhausted("")
    return MRopeIndex(pos, delta)


def get_packed_rope_index(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    image_grid_thw: GridsLike | Sequence[GridsLike] = None,
    video_grid_thw: GridsLike | Sequence[GridsLike] = None,
    *,
    token_ids: Any = None,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    audio_token_id: int | None = None,
    spatial_merge_size: int = 2,
    return_deltas: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[int]]:
    """M-RoPE position ids of a packed row; every sample restarts at 0.

    Args:
        input_ids: 1-D LongTensor [T_total], the packed row.
        cu_seqlens: sample boundaries ``[0, end_0, end_1, ..., end_{S-1}]`` (non-decreasing,
            ``end_{S-1} <= T_total``). Tokens after the last boundary (a trailing pad segment not
            listed in ``cu_seqlens``) are one more segment positioned like text from 0.
        image_grid_thw / video_grid_thw: either the flat grids of the whole row (LongTensor
            [N, 3] or a sequence of (t, h, w)), consumed in order across samples, or one entry per
            sample in ``cu_seqlens`` (each a LongTensor [N_i, 3], a sequence of triples, or
            ``None``; not a bare (t, h, w) triple, which would read as the flat form), checked
            per sample. A 3-D tensor [S, N, 3] is read as per sample.
        return_deltas: also return each listed sample's ``rope_delta``.
        Other arguments as in :func:`get_rope_index`.

    Returns:
        LongTensor [3, T_total] (and the per-sample deltas when ``return_deltas``).
    """
    img_id, vid_id = _resolve_ids(token_ids, image_token_id, video_token_id, audio_token_id)
    ids = _check_ids(input_ids)
    total = ids.numel()
    bounds = [int(b) for b in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    decreasing = any(b > a for a, b in zip(bounds[1:], bounds))
    if not bounds or bounds[0] != 0 or decreasing or bounds[-1] > total:
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at most at the row length "
            f"{total}; got {bounds}"
        )
    num_samples = len(bounds) - 1
    img_per_sample, img_flat = _split_grids(image_grid_thw, num_samples, "image")
    vid_per_sample, vid_flat = _split_grids(video_grid_thw, num_samples, "video")
    shared_img = None if img_flat is None else _Consumer(img_flat, "image")
    shared_vid = None if vid_flat is None else _Consumer(vid_flat, "video")

    out = torch.empty((3, total), dtype=torch.long, device=ids.device)
    deltas: list[int] = []
    for s in range(num_samples):
        lo, hi = bounds[s], bounds[s + 1]
        where = f" in sample {s} (tokens {lo}:{hi})"
        img_iter = shared_img if shared_img is not None else _Consumer(img_per_sample[s], "image")
        vid_iter = shared_vid if shared_vid is not None else _Consumer(vid_per_sample[s], "video")
        pos, delta = _sample_positions(
            ids[lo:hi], img_id, vid_id, img_iter, vid_iter, spatial_merge_size, where
        )
        if shared_img is None:
            img_iter.check_exhausted(where)
        if shared_vid is None:
            vid_iter.check_exhausted(where)
        out[:, lo:hi] = pos
        deltas.append(delta)
    if shared_img is not None:
        shared_img.check_exhausted(" in the packed row")
    if shared_vid is not None:
        shared_vid.check_exhausted(" in the packed row")
    # Trailing padding not covered by cu_seqlens: text-like, restarting at 0.
    tail = total - bounds[-1]
    if tail:
        out[:, bounds[-1] :] = torch.arange(tail, dtype=torch.long, device=ids.device)
    return (out, deltas) if return_deltas else out


# --------------------------------------------------------------------------------------------
# internals


class _Consumer:
    """Hands out the grids of one modality in order and reports mismatches."""

    def __init__(self, grids: list[tuple[int, int, int]], kind: str):
        self.grids = grids
        self.kind = kind
        self.used = 0

    def next(self, where: str) -> tuple[int, int, int]:
        if self.used >= len(self.grids):
            raise ValueError(
                f"{self.kind} #{self.used}{where}: found a {self.kind} patch-token block but only "
                f"{len(self.grids)} {self.kind} grid(s) were given"
            )
        grid = self.grids[self.used]
        self.used += 1
        return grid

    def check_exhausted(self, where: str) -> None:
        if self.used != len(self.grids):
            raise ValueError(
                f"{len(self.grids)} {self.kind} grid(s) given{where} but only {self.used} "
                f"{self.kind} patch-token block(s) found"
            )


def _sample_positions(
    ids: torch.Tensor,
    img_id: int,
    vid_id: int,
    img_iter: _Consumer,
    vid_iter: _Consumer,
    merge: int,
    where: str,
) -> tuple[torch.Tensor, int]:
    """Positions [3, T] and rope delta of one sample (1-D ids)."""
    n = ids.numel()
    device = ids.device
    if n == 0:
        return torch.empty((3, 0), dtype=torch.long, device=device), 0
    # Modality per token: 0 text-like, 1 image patch, 2 video patch.
    kind = (ids == img_id).to(torch.int8) + 2 * (ids == vid_id).to(torch.int8)
    if not bool(kind.any()):
        return torch.arange(n, dtype=torch.long, device=device).expand(3, n).clone(), 0

    # Runs of equal nonzero kind = media blocks.
    change = torch.ones(n, dtype=torch.bool, device=device)
    change[1:] = kind[1:] != kind[:-1]
    run_starts = torch.nonzero(change).flatten()
    run_kinds = kind[run_starts]
    run_ends = torch.cat((run_starts[1:], torch.tensor([n], device=device)))
    media = run_kinds != 0
    starts = run_starts[media].tolist()
    ends = run_ends[media].tolist()
    kinds = run_kinds[media].tolist()

    # Step per token: text 1; media 0 except the block's last token, which carries the span.
    steps = (kind == 0).to(torch.long)
    blocks = []
    for start, end, k in zip(starts, ends, kinds):
        it = img_iter if k == 1 else vid_iter
        index = it.used
        grid = it.next(where)
        offsets, span = vision_block_position_offsets(grid, merge, device)
        if offsets.shape[1] != end - start:
            raise ValueError(
                f"{it.kind} #{index}{where} (tokens {start}:{end}): {end - start} "
                f"{it.kind} patch tokens but grid_thw {grid} needs "
                f"{offsets.shape[1]} (= t*h*w/{merge * merge})"
            )
        steps[end - 1] = span
        blocks.append((start, end, offsets))
    running = torch.cumsum(steps, 0) - steps  # exclusive prefix sum = running index at each token
    pos = running.expand(3, n).clone()
    for start, end, offsets in blocks:
        pos[:, start:end] = offsets + running[start]
    # max(pos) + 1 equals the running index after the last token.
    delta = int(running[-1] + steps[-1]) - n
    return pos, delta


def _resolve_ids(token_ids: Any, image_id, video_id, audio_id) -> tuple[int, int]:
    if image_id is None and token_ids is not None:
        image_id = token_ids.image_patch
    if video_id is None and token_ids is not None:
        video_id = token_ids.video_patch
    if audio_id is None and token_ids is not None:
        audio_id = getattr(token_ids, "audio_patch", None)
    if image_id is None or video_id is None:
        raise ValueError(
            "the image and video patch token ids are required (token_ids= or *_token_id=)"
        )
    image_id, video_id = int(image_id), int(video_id)
    if image_id == video_id or (audio_id is not None and int(audio_id) in (image_id, video_id)):
        raise ValueError(
            f"patch token ids must be distinct: image {image_id}, video {video_id}, audio "
            f"{audio_id}"
        )
    return image_id, video_id


def _check_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(input_ids) or input_ids.dim() != 1:
        raise ValueError(
            f"input_ids must be a 1-D tensor, got {type(input_ids).__name__} "
            f"{tuple(getattr(input_ids, 'shape', ()))}"
        )
    return input_ids


def _grid_triple(grid: GridLike) -> tuple[int, int, int]:
    vals = grid.tolist() if torch.is_tensor(grid) else list(grid)
    if len(vals) != 3:
        raise ValueError(f"grid_thw must have 3 entries (t, h, w), got {vals}")
    return int(vals[0]), int(vals[1]), int(vals[2])


def _grid_list(grids: GridsLike) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    if torch.is_tensor(grids):
        if grids.numel() == 0:
            return []
        if grids.dim() != 2 or grids.shape[1] != 3:
            raise ValueError(f"grid_thw tensor must be [N, 3], got {tuple(grids.shape)}")
        return [tuple(g) for g in grids.tolist()]
    return [_grid_triple(g) for g in grids]


def _is_triple(x: Any) -> bool:
    if torch.is_tensor(x):
        return x.dim() == 1 and x.numel() == 3
    if isinstance(x, (list, tuple)):
        return len(x) == 3 and all(
            isinstance(v, numbers.Integral) or (torch.is_tensor(v) and v.dim() == 0) for v in x
        )
    return False


def _split_grids(grids: Any, num_samples: int, kind: str):
    """-> (per-sample lists, None) or (None, flat list)."""
    if grids is None:
        return None, []
    if torch.is_tensor(grids) and grids.dim() != 3:
        return None, _grid_list(grids)
    items = list(grids)
    if all(_is_triple(g) for g in items):  # flat (an empty list counts as flat: no media)
        return None, _grid_list(items)
    if len(items) != num_samples:
        raise ValueError(
            f"per-sample {kind} grids: got {len(items)} entries for {num_samples} samples"
        )
    return [_grid_list(g) for g in items], None
