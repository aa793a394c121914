"""The media backend interface: :class:`MediaBackend` decodes images, video frames and audio
into plain numpy arrays; ``cpu_decode.CPUBackend`` and ``dali.DALIBackend`` implement it and
``select.select_backend`` picks one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from megatron_omni.data.media.common import MediaError, Size, Source
from megatron_omni.data.media.probe import (
    DEFAULT_MAX_IMAGE_PIXELS,
    AudioInfo,
    ImageInfo,
    VideoInfo,
    probe_audio,
    probe_image,
    probe_video,
)


class MediaBackend(ABC):
    """Decodes media to numpy. Images: uint8 [H, W, 3] RGB. Video: uint8 [T, H, W, 3] RGB, one
    frame per requested index (indices may repeat). Audio: float32 [frames, channels] in [-1, 1]
    at the file's own rate. ``size=(h, w)`` resizes inside the decoder (bicubic, antialiased).

    The plural ``decode_*s`` methods take a batch and return one entry per input: the array,
    or the :class:`MediaError` for that input (never raised), so one bad file costs only itself.
    """

    name = "base"

    def __init__(self, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if max_image_pixels <= 0:
            raise ValueError("max_image_pixels must be positive")
        self.max_image_pixels = int(max_image_pixels)

    # probes ------------------------------------------------------------------------------------
    def probe_image(self, src: Source) -> ImageInfo:
        return probe_image(src, self.max_image_pixels)

    def probe_video(self, src: Source) -> VideoInfo:
        return probe_video(src)

    def probe_audio(self, src: Source) -> AudioInfo:
        return probe_audio(src)

    # batch decoding ----------------------------------------------------------------------------
    @abstractmethod
    def decode_images(self, sources: Sequence[Source], sizes: Sequence[Size] | None = None) -> list:
        """[uint8 HWC | MediaError] per source."""

    @abstractmethod
    def decode_videos(
        self,
        sources: Sequence[Source],
        indices: Sequence[Sequence[int]],
        sizes: Sequence[Size] | None = None,
        infos: Sequence[VideoInfo | None] | None = None,
    ) -> list:
        """[uint8 THWC | MediaError] per source; ``infos`` (from probe_video) saves a re-probe."""

    @abstractmethod
    def decode_audios(self, sources: Sequence[Source]) -> list:
        """[(float32 [frames, channels], sample_rate) | MediaError] per source."""

    # single-item conveniences (raise MediaError) -------------------------------------------------
    def decode_image(self, src: Source, size: Size = None) -> np.ndarray:
        return _raise_or_return(self.decode_images([src], [size])[0])

    def decode_video(
        self, src: Source, indices: Sequence[int], size: Size = None, info: VideoInfo | None = None
    ) -> np.ndarray:
        return _raise_or_return(self.decode_videos([src], [indices], [size], [info])[0])

    def decode_audio(self, src: Source) -> tuple[np.ndarray, int]:
        return _raise_or_return(self.decode_audios([src])[0])

    def describe(self) -> str:
        return self.name


def _raise_or_return(x):
    if isinstance(x, MediaError):
        raise x
    return x



def fill_none(seq, n):
    """``seq`` as a list, or ``n`` Nones when it is None (optional per-item arguments)."""
    return list(seq) if seq is not None else [None] * n

