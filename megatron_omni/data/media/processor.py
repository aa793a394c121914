"""Media file -> model input, on any backend; token counts from headers alone.

:class:`MediaProcessor` is the one object the data path talks to:

* planning (header probes only, no decoding): :meth:`~MediaProcessor.image_tokens`,
  :meth:`~MediaProcessor.video_plan` / :meth:`~MediaProcessor.video_tokens`,
  :meth:`~MediaProcessor.audio_num_samples` / :meth:`~MediaProcessor.audio_tokens`. Preprocessing
  stores these numbers; the packer budgets with them.
* decoding: :meth:`~MediaProcessor.image` / :meth:`~MediaProcessor.video` -> :class:`VisualInput`
  (ViT patches + grid_thw), :meth:`~MediaProcessor.audio` -> 16 kHz mono waveform. The plural
  methods take a batch and return a :class:`~.common.MediaError` in place of each bad input.

The decode path re-uses the very plan the token count came from (same resize, same frame
count), and checks the decoded grid against it, so the count stored at preprocessing time and
the number of features produced at training time cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megatron_omni.data.media.audio import TARGET_SAMPLE_RATE, prepare_audio, resampled_length
from megatron_omni.data.media.base import MediaBackend
from megatron_omni.data.media.common import MediaError, Source
from megatron_omni.data.media.probe import VideoInfo
from megatron_omni.data.media.select import select_backend
from megatron_omni.data.media.vision import (
    ImageSettings,
    VideoSettings,
    grid_thw_for,
    image_resized_size,
    num_sampled_frames,
    pixels_to_patches,
    sample_frame_indices,
    tokens_for_grid,
    video_resized_size,
)
from megatron_omni.data.special_tokens import AUDIO_TOKENS_PER_CLIP


@dataclass(frozen=True)
class VisualInput:
    """What the vision tower consumes for one image or video."""

    patches: torch.Tensor
    """float32 [t*h*w, 3 * temporal_patch * patch * patch] (1176 wide for Qwen2-VL)."""
    grid_thw: tuple[int, int, int]
    """(t, h, w) in patches; the LLM gets t*h*w / merge**2 tokens."""
    num_tokens: int


@dataclass(frozen=True)
class VideoPlan:
    """Everything decided about a video before decoding it."""

    info: VideoInfo
    indices: list[int]
    size: tuple[int, int]
    grid_thw: tuple[int, int, int]
    num_tokens: int


class MediaProcessor:
    """Images/videos -> ViT patches, audio -> 16 kHz mono, on the given backend.

    ``backend`` is a :class:`MediaBackend` or a name for :func:`select_backend`
    ("auto" | "dali" | "cpu"). ``seed`` seeds random frame sampling when a call gives none.
    """

    def __init__(
        self,
        backend: MediaBackend | str = "auto",
        image: ImageSettings = ImageSettings(),
        video: VideoSettings = VideoSettings(),
        audio_sample_rate: int = TARGET_SAMPLE_RATE,
        audio_tokens: int = AUDIO_TOKENS_PER_CLIP,
        seed: int | None = None,
    ):
        self.backend = select_backend(backend) if isinstance(backend, str) else backend
        self.image_settings, self.video_settings = image, video
        self.audio_sample_rate, self._audio_tokens, self.seed = (
            audio_sample_rate,
            audio_tokens,
            seed,
        )

    # ---------------------------------------------------------------------------------- planning
    def _image_size(self, height: int, width: int, src: Source) -> tuple[int, int]:
        try:
            return image_resized_size(height, width, self.image_settings)
        except ValueError as e:
            raise MediaError("bad_aspect_ratio", str(e), src) from None

    def image_size(self, src: Source) -> tuple[int, int]:
        """Resized (h, w) of an image, from its header."""
        h, w = self.backend.probe_image(src)
        return self._image_size(h, w, src)

    def image_grid(self, src: Source) -> tuple[int, int, int]:
        return grid_thw_for(1, *self.image_size(src), self.image_settings)

    def image_tokens(self, src: Source) -> int:
        """LLM tokens of an image, from its header alone."""
        return tokens_for_grid(self.image_grid(src), self.image_settings)

    def video_plan(
        self, src: Source, seed: int | None = None, info: VideoInfo | None = None
    ) -> VideoPlan:
        """Frames to decode, their size, grid and token count, from the container header."""
        info = info if info is not None else self.backend.probe_video(src)
        v, s = self.video_settings, self.image_settings
        n = num_sampled_frames(info.num_frames, info.fps, v)
        try:
            size = video_resized_size(n, info.height, info.width, v, s)
        except ValueError as e:
            raise MediaError("bad_aspect_ratio", str(e), src) from None
        indices = sample_frame_indices(
            info.num_frames, info.fps, v, self.seed if seed is None else seed
        )
        grid = grid_thw_for(n, *size, s)
        return VideoPlan(info, indices, size, grid, tokens_for_grid(grid, s))

    def video_tokens(self, src: Source) -> int:
        """LLM tokens of a video, from its header alone."""
        return self.video_plan(src).num_tokens

    def audio_num_samples(self, src: Source) -> int:
        """Length of the 16 kHz waveform :meth:`audio` will return, from the header alone."""
        frames, sr = self.backend.probe_audio(src)
        return resampled_length(frames, sr, self.audio_sample_rate)

    def audio_tokens(self, src: Source) -> int:
        """LLM tokens of an audio clip: fixed per clip (the encoder output is padded/truncated);
        the header is still probed so unreadable files are caught at planning time."""
        self.backend.probe_audio(src)
        return self._audio_tokens

    # ---------------------------------------------------------------------------------- decoding
    def _to_visual(
        self, frames: np.ndarray, expect: tuple[int, int, int], src: Source
    ) -> VisualInput:
        s = self.image_settings
        patches, grid = pixels_to_patches(frames, s)
        if grid != tuple(expect):
            raise MediaError(
                "corrupt_image",
                f"decoded grid {grid} differs from the planned {tuple(expect)}",
                src,
            )
        return VisualInput(torch.from_numpy(patches), grid, tokens_for_grid(grid, s))

    def images(self, sources: Sequence[Source]) -> list:
        """[VisualInput | MediaError] per image."""
        sizes: list = []
        out: list = [None] * len(sources)
        todo = []
        for i, src in enumerate(sources):
            try:
                sizes.append(self.image_size(src))
                todo.append(i)
            except MediaError as e:
                out[i] = e
        decoded = self.backend.decode_images([sources[i] for i in todo], sizes)
        for i, size, rgb in zip(todo, sizes, decoded):
            if isinstance(rgb, MediaError):
                out[i] = rgb
                continue
            try:
                out[i] = self._to_visual(
                    rgb[None], grid_thw_for(1, *size, self.image_settings), sources[i]
                )
            except MediaError as e:
                out[i] = e
        return out

    def image(self, src: Source) -> VisualInput:
        return _raise_or_return(self.images([src])[0])

    def videos(self, sources: Sequence[Source], seeds: Sequence[int | None] | None = None) -> list:
        """[VisualInput | MediaError] per video."""
        seeds = list(seeds) if seeds is not None else [None] * len(sources)
        out: list = [None] * len(sources)
        plans, todo = [], []
        for i, src in enumerate(sources):
            try:
                plans.append(self.video_plan(src, seeds[i]))
                todo.append(i)
            except MediaError as e:
                out[i] = e
        decoded = self.backend.decode_videos(
            [sources[i] for i in todo],
            [p.indices for p in plans],
            [p.size for p in plans],
            [p.info for p in plans],
        )
        for i, plan, frames in zip(todo, plans, decoded):
            if isinstance(frames, MediaError):
                out[i] = frames
                continue
            try:
                out[i] = self._to_visual(frames, plan.grid_thw, sources[i])
            except MediaError as e:
                out[i] = e
        return out

    def video(self, src: Source, seed: int | None = None) -> VisualInput:
        return _raise_or_return(self.videos([src], [seed])[0])

    def audios(self, sources: Sequence[Source]) -> list:
        """[float32 torch [samples] at 16 kHz | MediaError] per clip."""
        out = []
        for item in self.backend.decode_audios(list(sources)):
            if isinstance(item, MediaError):
                out.append(item)
            else:
                wav, sr = item
                out.append(
                    _checked_waveform(
                        torch.from_numpy(prepare_audio(wav, sr, self.audio_sample_rate)),
                        self.audio_sample_rate,
                    )
                )
        return out

    def audio(self, src: Source) -> torch.Tensor:
        return _raise_or_return(self.audios([src])[0])


def _raise_or_return(x):
    if isinstance(x, MediaError):
        raise x
    return x


MIN_AUDIO_SECONDS = 0.025
"""One 25 ms analysis frame: the audio front end (fbank) produces nothing from less."""


def _checked_waveform(wav: torch.Tensor, sample_rate: int):
    """The decoded clip, or a MediaError when the audio front end could not use it: NaN/Inf
    samples (a float WAV can hold them) or shorter than one analysis frame."""
    if wav.numel() < int(MIN_AUDIO_SECONDS * sample_rate):
        return MediaError(
            "audio_too_short",
            f"{wav.numel()} samples at {sample_rate} Hz, fewer "
            f"than one {MIN_AUDIO_SECONDS * 1000:.0f} ms analysis frame",
        )
    if not bool(torch.isfinite(wav).all()):
        bad = int((~torch.isfinite(wav)).sum())
        return MediaError("bad_audio", f"{bad} NaN/Inf samples of {wav.numel()}")
    return wav
