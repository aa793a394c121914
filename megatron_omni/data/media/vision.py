"""Backend-independent image/video math for the Qwen2-VL vision tower.

Everything here works on sizes or on already-decoded pixels, never on files, so the same numbers
come out whichever decoder (Pillow/PyAV or DALI) produced the pixels:

* :func:`smart_resize` - the Qwen2-VL rule that picks the resized (h, w) of an image or video frame.
* :func:`normalize` / :func:`patchify` - CLIP normalisation and the flat patch layout the ViT's
  Conv3d patch embedding expects (element order identical to transformers'
  ``Qwen2VLImageProcessor`` ``pixel_values``).
* token-count helpers (:func:`image_num_tokens`, :func:`video_num_tokens`, ...) that compute the
  number of LLM tokens from the media SIZE alone. Preprocessing stores these counts; packing and
  balancing plan with them long before any pixel is decoded (docs/architecture.md principle 4).
* video frame sampling (:func:`num_sampled_frames`, :func:`sample_frame_indices`): one function
  decides how many frames a video contributes, and the index sampler calls it, so the frame
  count used for the token budget and the frames actually decoded always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSettings:
    """How images are resized and cut into ViT patches (docs/recipe.md section 1, 'image input')."""

    patch_size: int = 14
    """Spatial ViT patch size in pixels."""
    temporal_patch_size: int = 2
    """Frames per temporal patch; a still image is repeated to fill it."""
    merge_size: int = 2
    """Side of the PatchMerger group (2x2 patches -> one LLM token)."""
    min_pixels: int = 100 * 28 * 28
    """Lower pixel bound after resize (100 LLM tokens)."""
    max_pixels: int = 2560 * 28 * 28
    """Upper pixel bound after resize (2560 LLM tokens)."""
    max_aspect_ratio: float = 200.0
    """long side / short side must be strictly below this, else the image is refused."""
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"ImageSettings.{name} must be positive, got {getattr(self, name)}"
                )
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"ImageSettings.min_pixels ({self.min_pixels}) exceeds max_pixels "
                f"({self.max_pixels}); "
                "lower min_pixels or raise max_pixels"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("ImageSettings.mean/std need one value per RGB channel")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (patch_size * merge_size = 28)."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class VideoSettings:
    """How many frames a video contributes and at which size (docs/recipe.md section 1, 'video
    input')."""

    fps: float = 2.0
    """Target sampling rate in frames per second of video."""
    min_frames: int = 4
    """Fewest frames per video (rounded up to an even count). Short clips repeat frames."""
    max_frames: int = 120
    """Most frames per video (rounded down to an even count)."""
    num_frames: int | None = None
    """If set, every video contributes exactly this many frames (rounded to an even count),
    regardless of its length; the paper's training likely used 16."""
    min_pixels: int = 128 * 28 * 28
    """Per-frame lower pixel bound after resize."""
    max_pixels: int = 768 * 28 * 28
    """Per-frame upper pixel bound after resize."""
    total_pixels: int = 6144 * 28 * 28
    """Budget over all frames: per-frame max becomes min(max_pixels, total_pixels / frames * 2),
    which caps a video at 6144 LLM tokens (but never below 1.05 * min_pixels per frame)."""
    sampling: str = "uniform"
    """'uniform': evenly spaced frames; 'random': one random frame per equal segment (seeded)."""

    def __post_init__(self):
        if self.fps <= 0:
            raise ValueError(f"VideoSettings.fps must be positive, got {self.fps}")
        if self.min_frames < 1 or self.max_frames < self.min_frames:
            raise ValueError(
                f"VideoSettings needs 1 <= min_frames <= max_frames, got {self.min_frames}, "
                f"{self.max_frames}"
            )
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(
                f"VideoSettings.num_frames must be >= 1 or None, got {self.num_frames}"
            )
        if self.min_pixels > self.max_pixels:
            raise ValueError("VideoSettings.min_pixels exceeds max_pixels; lower min_pixels")
        if self.sampling not in ("uniform", "random"):
            raise ValueError(
                f"VideoSettings.sampling must be 'uniform' or 'random', got {self.sampling!r}"
            )


# --------------------------------------------------------------------------------------------------
# resize rule


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: float = 100 * 28 * 28,
    max_pixels: float = 2560 * 28 * 28,
    max_aspect_ratio: float = 200.0,
) -> tuple[int, int]:
    """The Qwen2-VL resize rule: the (h, w) an image of ``height x width`` is resized to.

    Both sides become multiples of ``factor`` (nearest multiple first); if the area then falls
    outside ``[min_pixels, max_pixels]`` the image is scaled uniformly (floor when shrinking, ceil
    when growing) so it fits, keeping the aspect ratio as well as the grid allows. Raises
    ``ValueError`` for empty sizes or an aspect ratio of ``max_aspect_ratio`` or more.

    >>> smart_resize(480, 640)
    (476, 644)
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio >= max_aspect_ratio:
        raise ValueError(f"aspect ratio {ratio:.1f} is not below the limit {max_aspect_ratio:g}")
    # Python's round (half to even) on purpose: the reference implementation uses it, and the
    # token counts must match it bit for bit.
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def image_resized_size(
    height: int, width: int, s: ImageSettings = ImageSettings()
) -> tuple[int, int]:
    """Resized (h, w) of an image under ``s``."""
    return smart_resize(height, width, s.factor, s.min_pixels, s.max_pixels, s.max_aspect_ratio)


def grid_thw_for(
    num_frames: int, resized_h: int, resized_w: int, s: ImageSettings = ImageSettings()
) -> tuple[int, int, int]:
    """(t, h, w) patch grid of ``num_frames`` frames of an already-resized size."""
    t = -(
        -num_frames // s.temporal_patch_size
    )  # a trailing odd frame is repeated to fill the patch
    return t, resized_h // s.patch_size, resized_w // s.patch_size


def tokens_for_grid(grid_thw: Sequence[int], s: ImageSettings = ImageSettings()) -> int:
    """LLM tokens of a patch grid: t*h*w / merge_size**2."""
    t, h, w = grid_thw
    return t * h * w // (s.merge_size * s.merge_size)


def image_grid_thw(
    height: int, width: int, s: ImageSettings = ImageSettings()
) -> tuple[int, int, int]:
    """Patch grid of a still image of the given ORIGINAL size (t is always 1)."""
    return grid_thw_for(1, *image_resized_size(height, width, s), s)


def image_num_tokens(height: int, width: int, s: ImageSettings = ImageSettings()) -> int:
    """LLM tokens of an image of the given original size, from the size alone."""
    return tokens_for_grid(image_grid_thw(height, width, s), s)


# --------------------------------------------------------------------------------------------------
# video frame sampling


def _round_even(x: float) -> int:
    return int(math.floor(x / 2.0 + 0.5)) * 2


def num_sampled_frames(
    total_frames: int, video_fps: float, v: VideoSettings = VideoSettings()
) -> int:
    """How many frames a video of ``total_frames`` frames at ``video_fps`` contributes.

    ``v.fps`` frames per second of video, clipped to the even range [min_frames, max_frames]
    (or exactly ``v.num_frames``), always even and >= 2 so frames pair up into temporal patches.
    Clips shorter than that repeat frames instead of failing.
    """
    if total_frames <= 0:
        raise ValueError(f"video has no frames (total_frames={total_frames})")
    if v.num_frames is not None:
        return max(2, _round_even(v.num_frames))
    lo = 2 * math.ceil(v.min_frames / 2)
    hi = max(lo, 2 * (v.max_frames // 2))
    duration = total_frames / video_fps if video_fps > 0 else 0.0
    n = min(max(duration * v.fps, lo), hi)
    return max(2, min(hi, max(lo, _round_even(n))))


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    v: VideoSettings = VideoSettings(),
    seed: int | None = None,
) -> list[int]:
    """Frame indices to decode: ``num_sampled_frames(...)`` of them, non-decreasing, all valid.

    'uniform' spreads them evenly over [0, total_frames - 1]; 'random' splits the video into that
    many equal segments and picks one frame per segment with ``np.random.default_rng(seed)``.
    """
    n = num_sampled_frames(total_frames, video_fps, v)
    if v.sampling == "uniform" or total_frames == 1:
        idx = np.rint(np.linspace(0.0, total_frames - 1, n)).astype(np.int64)
    else:
        rng = np.random.default_rng(seed)
        edges = np.linspace(0.0, float(total_frames), n + 1)
        lo = np.floor(edges[:-1]).astype(np.int64)
        hi = np.maximum(lo, np.ceil(edges[1:]).astype(np.int64) - 1)
        idx = rng.integers(lo, hi + 1)
    idx = np.clip(idx, 0, total_frames - 1)
    return [int(i) for i in np.maximum.accumulate(idx)]


def video_resized_size(
    num_frames: int,
    height: int,
    width: int,
    v: VideoSettings = VideoSettings(),
    s: ImageSettings = ImageSettings(),
) -> tuple[int, int]:
    """Resized (h, w) of every frame when ``num_frames`` frames are sampled."""
    per_frame_max = max(
        min(v.max_pixels, v.total_pixels / num_frames * s.temporal_patch_size),
        int(v.min_pixels * 1.05),
    )
    return smart_resize(height, width, s.factor, v.min_pixels, per_frame_max, s.max_aspect_ratio)


def video_grid_thw(
    total_frames: int,
    video_fps: float,
    height: int,
    width: int,
    v: VideoSettings = VideoSettings(),
    s: ImageSettings = ImageSettings(),
) -> tuple[int, int, int]:
    """Patch grid of a video from its header numbers (frame count, fps, original size)."""
    n = num_sampled_frames(total_frames, video_fps, v)
    return grid_thw_for(n, *video_resized_size(n, height, width, v, s), s)


def video_num_tokens(
    total_frames: int,
    video_fps: float,
    height: int,
    width: int,
    v: VideoSettings = VideoSettings(),
    s: ImageSettings = ImageSettings(),
) -> int:
    """LLM tokens of a video from its header numbers alone."""
    return tokens_for_grid(video_grid_thw(total_frames, video_fps, height, width, v, s), s)


def frames_from_duration(duration_s: float, video_fps: float) -> int:
    """Frame count estimate when a container stores only duration and rate."""
    return max(1, int(round(duration_s * video_fps)))


# --------------------------------------------------------------------------------------------------
# pixels -> patches


def normalize(frames_thwc: np.ndarray, s: ImageSettings = ImageSettings()) -> np.ndarray:
    """uint8 [T, H, W, 3] (or [H, W, 3]) -> float32 [T, 3, H, W] of (x/255 - mean) / std.

    The result is a channels-first VIEW of a channels-last array: :func:`patchify` only splits
    its axes, so the one copy it makes anyway is the only one."""
    x = np.asarray(frames_thwc)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected [T, H, W, 3] pixels, got shape {x.shape}")
    mean = np.asarray(s.mean, np.float32)
    std = np.asarray(s.std, np.float32)
    y = (x.astype(np.float32) * np.float32(1.0 / 255.0) - mean) / std
    return y.transpose(0, 3, 1, 2)


def patchify(
    frames: np.ndarray, patch: int = 14, temporal_patch: int = 2, merge: int = 2
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Cut float frames [T, C, H, W] into the flat patches the Qwen2-VL ViT consumes.

    Returns ``(patches [t*h*w, C*temporal_patch*patch*patch], (t, h, w))`` with h, w counted in
    patches. Rows are ordered (t, h/merge, w/merge, merge, merge), so every 2x2 merge group is 4
    consecutive rows; each row is ordered (C, temporal, patch_y, patch_x), the layout of the
    Conv3d weight [width, C, 2, 14, 14]. A frame count that is not a multiple of
    ``temporal_patch`` is padded by repeating the last frame (a still image becomes 2 copies).
    """
    x = np.asarray(frames)
    if x.ndim != 4:
        raise ValueError(f"patchify expects [T, C, H, W], got shape {x.shape}")
    T, C, H, W = x.shape
    unit = patch * merge
    if H % unit or W % unit:
        raise ValueError(
            f"frame size {H}x{W} is not a multiple of patch*merge={unit}; resize first"
        )
    if T == 0:
        raise ValueError("patchify got zero frames")
    rem = (-T) % temporal_patch
    if rem:
        x = np.concatenate([x, np.repeat(x[-1:], rem, axis=0)], axis=0)
    t, gh, gw = x.shape[0] // temporal_patch, H // patch, W // patch
    x = x.reshape(t, temporal_patch, C, gh // merge, merge, patch, gw // merge, merge, patch)
    # -> (t, gh/m, gw/m, m_h, m_w, C, temporal, patch_y, patch_x)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(t * gh * gw, C * temporal_patch * patch * patch), (
        t,
        gh,
        gw,
    )


def pixels_to_patches(
    frames_thwc: np.ndarray, s: ImageSettings = ImageSettings()
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 [T, H, W, 3] -> (normalised float32 patches, grid): ``patchify(normalize(x))``, but
    the patch shuffle runs on the uint8 pixels (a quarter of the bytes) and normalisation is one
    scale-and-shift per channel afterwards. Agrees with the two-step form to ~1e-6."""
    x = np.asarray(frames_thwc)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected [T, H, W, 3] pixels, got shape {x.shape}")
    raw, grid = patchify(x.transpose(0, 3, 1, 2), s.patch_size, s.temporal_patch_size, s.merge_size)
    std = np.asarray(s.std, np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    shift = (-np.asarray(s.mean, np.float64) / std).astype(np.float32)
    out = raw.astype(np.float32).reshape(raw.shape[0], 3, -1)
    out *= scale[None, :, None]
    out += shift[None, :, None]
    return out.reshape(raw.shape), grid
