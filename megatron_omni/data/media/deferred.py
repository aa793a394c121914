"""Image/video decoding in the training process (DALI on its own GPU), not in loader workers.

Why: Energon forks its workers after the trainer initialised CUDA, so a worker cannot open a
GPU pipeline (see ``loaders.loader_media_backend``). With deferred decoding the split is:

* loader workers (CPU): read the shards, probe headers, plan every image/video (resize, frame
  indices, grid, token count -- the same plan :class:`MediaProcessor` decodes with), template and
  pack. The row carries the *encoded bytes* plus that plan (:class:`DeferredVisual`), no pixels.
  Audio is still decoded in the workers (CPU operators either way; fbank runs in the model).
* training process: :class:`TrainingDecoder` decodes the batch's images/videos with its backend
  (DALI ``device='mixed'`` on this process's GPU when CUDA + DALI are there, else the CPU
  backend), patchifies on the compute device, checks every grid against
  the plan and fills ``image_pixel_values`` / ``video_pixel_values`` / ``vision_patches``.
  ``submit(batch)`` / ``get()`` run this in a background thread, in order, so the next
  micro-batch can be decoded while the caller does something else.

A medium that passed the header probe but fails to decode cannot be dropped from an already
packed row; its sample is *masked* instead (loss and gen-audio masks zeroed over the sample's
tokens, its patches zero) and counted under the decode reason in ``batch["skipped"]``, which the
trainer adds to the loader's skip counts.

Selection (``data.media_backend``): ``auto`` defers to the training process when CUDA and DALI
are both there and decodes in the workers otherwise; ``dali_gpu`` requires the GPU path;
``deferred`` defers with whatever the training process has (used for CPU tests); ``dali`` and
``cpu`` decode in the workers as before.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megatron_omni.data.media.base import MediaBackend
from megatron_omni.data.media.common import MediaError, log_once
from megatron_omni.data.media.dali import cuda_available, dali_available
from megatron_omni.data.media.probe import VideoInfo
from megatron_omni.data.media.processor import MediaProcessor
from megatron_omni.data.media.select import select_backend
from megatron_omni.data.media.vision import ImageSettings, grid_thw_for, tokens_for_grid

log = logging.getLogger("megatron_omni.data.media.deferred")

DEFERRED_BACKENDS = ("dali_gpu", "deferred")
"""``data.media_backend`` values that always decode images/videos in the training process."""


def defers_decoding(name: str) -> bool:
    """Whether ``data.media_backend=name`` decodes images/videos in the training process."""
    key = (name or "auto").lower()
    if key == "dali_gpu":
        if not (cuda_available() and dali_available()):
            raise RuntimeError(
                "data.media_backend=dali_gpu needs CUDA and NVIDIA DALI in the training "
                "process (cuda: %s, dali: %s); set data.media_backend to 'auto' or 'cpu'"
                % (cuda_available(), dali_available())
            )
        return True
    if key == "deferred":
        return True
    return key == "auto" and cuda_available() and dali_available()


def worker_backend_name(name: str) -> str:
    """The backend name the loader workers probe (and, when not deferring, decode) with."""
    key = (name or "auto").lower()
    return "auto" if key in DEFERRED_BACKENDS else key


@dataclass
class DeferredVisual:
    """An image or video still encoded, with the plan its decode must match (picklable)."""

    kind: str  # "image" | "video"
    data: bytes
    size: tuple[int, int]  # resized (h, w)
    grid_thw: tuple[int, int, int]
    num_tokens: int
    settings: ImageSettings
    indices: list | None = None  # video frame indices
    info: VideoInfo | None = None  # video header
    span: tuple[int, int] = (0, 0)  # tokens of its sample in the row (set when packed)

    @property
    def patches(self) -> torch.Tensor:
        """No pixels yet: an empty [0, width] block (the row's pixel tensors stay empty)."""
        s = self.settings
        return torch.zeros(0, 3 * s.temporal_patch_size * s.patch_size * s.patch_size)


def _bytes(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    with open(src, "rb") as f:
        return f.read()


class DeferredMediaProcessor(MediaProcessor):
    """Loader-side processor that plans images/videos from their headers and keeps the bytes;
    audio is decoded as usual. Everything a decode-time grid check needs is in the plan."""

    def images(self, sources: Sequence) -> list:
        out = []
        for src in sources:
            try:
                size = self.image_size(src)
            except MediaError as e:
                out.append(e)
                continue
            grid = grid_thw_for(1, *size, self.image_settings)
            out.append(
                DeferredVisual(
                    "image",
                    _bytes(src),
                    size,
                    grid,
                    tokens_for_grid(grid, self.image_settings),
                    self.image_settings,
                )
            )
        return out

    def videos(self, sources: Sequence, seeds: Sequence | None = None) -> list:
        seeds = list(seeds) if seeds is not None else [None] * len(sources)
        out = []
        for src, seed in zip(sources, seeds):
            try:
                p = self.video_plan(src, seed)
            except MediaError as e:
                out.append(e)
                continue
            out.append(
                DeferredVisual(
                    "video",
                    _bytes(src),
                    p.size,
                    p.grid_thw,
                    p.num_tokens,
                    self.image_settings,
                    list(p.indices),
                    p.info,
                )
            )
        return out


def patchify_on(
    frames: torch.Tensor, s: ImageSettings
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 [T, H, W, 3] (any device) -> normalised float32 patches on that device; the torch twin
    of ``vision.pixels_to_patches`` (same row/column order, same float32 scale-and-shift)."""
    if frames.dim() == 3:
        frames = frames[None]
    T, H, W, C = frames.shape
    p, tp, m = s.patch_size, s.temporal_patch_size, s.merge_size
    if H % (p * m) or W % (p * m) or C != 3 or T == 0:
        raise ValueError(f"cannot patchify frames of shape {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2)
    rem = (-T) % tp
    if rem:
        x = torch.cat([x, x[-1:].expand(rem, -1, -1, -1)], dim=0)
    t, gh, gw = x.shape[0] // tp, H // p, W // p
    x = x.reshape(t, tp, C, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    raw = x.reshape(t * gh * gw, C * tp * p * p)
    std = np.asarray(s.std, np.float64)
    scale = torch.from_numpy((1.0 / (255.0 * std)).astype(np.float32)).to(raw.device)
    shift = torch.from_numpy((-np.asarray(s.mean, np.float64) / std).astype(np.float32)).to(
        raw.device
    )
    out = raw.to(torch.float32).reshape(raw.shape[0], C, -1)
    out = out * scale[None, :, None] + shift[None, :, None]
    return out.reshape(raw.shape), (t, gh, gw)


def training_backend(name: str) -> MediaBackend:
    """The training process's decoder: DALI ``mixed`` on this process's GPU when CUDA + DALI are
    there, else the CPU backend (the CPU fallback; DALI's CPU operators can be passed to
    :class:`TrainingDecoder` explicitly)."""
    if cuda_available() and dali_available():
        return select_backend("dali", dali_device="gpu")
    return select_backend("cpu")


class TrainingDecoder:
    """Decodes the deferred images/videos of loader batches in the training process.

    ``decode(batch)`` does it synchronously; ``submit(batch)`` queues it on one background thread
    and ``get()`` returns the batches in submission order (prefetch of the next micro-batch).
    """

    def __init__(self, backend: MediaBackend, device: torch.device | str | None = None):
        self.backend = backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="media-decode")
        self._pending: deque[Future] = deque()
        self.skipped: Counter = Counter()

    def describe(self) -> str:
        return (
            f"images/videos decoded in the training process by {self.backend.describe()}, "
            f"patchified on {self.device}"
        )

    # ------------------------------------------------------------------------- prefetch API
    def submit(self, batch: dict) -> None:
        self._pending.append(self._pool.submit(self.decode, batch))

    def get(self) -> dict:
        if not self._pending:
            raise RuntimeError("TrainingDecoder.get() without a submitted batch")
        return self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------------- decoding
    def _decode_kind(self, items: list[DeferredVisual]) -> list:
        if not items:
            return []
        datas = [d.data for d in items]
        try:
            if items[0].kind == "image":
                return self.backend.decode_images(datas, [d.size for d in items])
            return self.backend.decode_videos(
                datas, [d.indices for d in items], [d.size for d in items], [d.info for d in items]
            )
        except Exception:  # noqa: BLE001 - isolate the failing items, as the loader does
            if len(items) == 1:
                return [MediaError("decode_failed", "decoder raised")]
            return [x for d in items for x in self._decode_kind([d])]

    def decode(self, batch: dict) -> dict:
        """Fill the pixel tensors of a batch whose rows carry ``deferred_media``; other batches
        (pure text, worker-decoded) come back unchanged."""
        rows = batch.get("deferred_media")
        if rows is None:
            return batch
        out = dict(batch)
        masks = {k: batch[k].clone() for k in ("loss_mask", "gen_audio_mask")}
        skipped = Counter(batch.get("skipped") or {})
        vis, img_all, vid_all = [], [], []
        masked: set = set()
        for b, (items, order) in enumerate(zip(rows, batch["vision_order"])):
            per_kind = {}
            for kind in ("image", "video"):
                todo = [d for d in items if d.kind == kind]
                pix = []
                for d, got in zip(todo, self._decode_kind(todo)):
                    err = got if isinstance(got, MediaError) else None
                    if err is None:
                        x = torch.from_numpy(np.require(got, requirements=["C", "W"])).to(
                            self.device, non_blocking=True
                        )
                        try:
                            patches, grid = patchify_on(x, d.settings)
                        except ValueError as e:
                            err = MediaError("decode_failed", str(e))
                        else:
                            if grid != tuple(d.grid_thw):
                                err = MediaError(
                                    "corrupt_image",
                                    f"decoded grid {grid} differs "
                                    f"from the planned {tuple(d.grid_thw)}",
                                )
                    if err is not None:  # mask the sample; keep the row's shapes
                        t, h, w = d.grid_thw
                        patches = torch.zeros(t * h * w, d.patches.shape[1], device=self.device)
                        a, e = d.span
                        if (b, a) not in masked:  # one count per sample, as in the workers
                            masked.add((b, a))
                            skipped[err.reason] += 1
                            self.skipped[err.reason] += 1
                        masks["loss_mask"][b, a:e] = 0
                        masks["gen_audio_mask"][b, a:e] = False
                        log.debug("masking sample tokens %d:%d of row %d: %s", a, e, b, err)
                    pix.append(patches)
                per_kind[kind] = pix
            img_all += per_kind["image"]
            vid_all += per_kind["video"]
            vis += [per_kind[kind][i] for kind, i in order]
        width = batch["image_pixel_values"].shape[1]

        def cat(xs):
            return torch.cat(xs) if xs else torch.zeros(0, width, device=self.device)

        out.update(
            image_pixel_values=cat(img_all),
            video_pixel_values=cat(vid_all),
            vision_patches=cat(vis),
            skipped=dict(skipped),
            **masks,
        )
        del out["deferred_media"], out["vision_order"]
        return out


def make_training_decoder(name: str, device=None) -> TrainingDecoder | None:
    """The training-process decoder for ``data.media_backend=name``, or None when the workers
    decode; logs once which decode path runs and where."""
    if not defers_decoding(name):
        log_once(f"media decode: in the loader workers (CPU, data.media_backend={name})")
        return None
    if device is None:
        from megatron_omni.parallel.device import compute_device

        device = compute_device()
    dec = TrainingDecoder(training_backend(name), device)
    log_once(f"media decode: {dec.describe()} (data.media_backend={name})")
    return dec
