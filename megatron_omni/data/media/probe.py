"""Header probes: sizes, frame counts and durations of media files, without decoding pixels or
samples. Token counts are computed from them (``processor.py``); the pixel cap is checked on the
header, before any decoding.

Images are not EXIF-rotated (on either backend): the Qwen2-VL reference processor does not rotate
either, and the header probe must describe the same pixels the decoders return.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from megatron_omni.data.media.common import (
    MediaError,
    Source,
    check_exists,
    is_buffer,
)

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
"""Images whose header claims more pixels than this are refused before decoding. (Pillow itself
refuses headers above 2 * ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 M pixels, whatever this cap
says; those are reported as ``image_too_large`` too.)"""


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of an image; unpacks as ``(height, width)``."""

    height: int
    width: int
    format: str = ""
    mode: str = ""

    def __iter__(self) -> Iterator[int]:
        return iter((self.height, self.width))


@dataclass(frozen=True)
class VideoInfo:
    """Header facts of a video stream; unpacks as ``(num_frames, fps, height, width)``."""

    num_frames: int
    fps: float
    height: int
    width: int
    codec: str = ""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.num_frames, self.fps, self.height, self.width))

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio file; unpacks as ``(frames, sample_rate)``."""

    frames: int
    sample_rate: int
    channels: int = 1

    def __iter__(self) -> Iterator[int]:
        return iter((self.frames, self.sample_rate))

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def pil_open(src: Source, max_pixels: int):
    """Open an image lazily (header only) and enforce the pixel cap. Caller closes it."""
    from PIL import Image, UnidentifiedImageError

    check_exists(src)
    fp = io.BytesIO(bytes(src)) if is_buffer(src) else src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise MediaError("image_too_large", f"Pillow refuses it: {e}", src) from None
    except FileNotFoundError:
        raise MediaError("missing_file", "no such file", src) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(
            "corrupt_image", f"unrecognised image data ({type(e).__name__})", src
        ) from None
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise MediaError("corrupt_image", f"header size {w}x{h}", src)
    if w * h > max_pixels:
        im.close()
        raise MediaError(
            "image_too_large", f"header says {w}x{h} > cap of {max_pixels} pixels", src
        )
    return im


def probe_image(src: Source, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageInfo:
    """Size (and format, mode) from the image header alone; refuses images above ``max_pixels``."""
    im = pil_open(src, max_pixels)
    try:
        return ImageInfo(im.size[1], im.size[0], im.format or "", im.mode)
    finally:
        im.close()


def av_open(src: Source):
    import av

    check_exists(src)
    try:
        return av.open(io.BytesIO(bytes(src)) if is_buffer(src) else os.fspath(src))
    except FileNotFoundError:
        raise MediaError("missing_file", "no such file", src) from None
    except Exception as e:  # av.FFmpegError (a ValueError), OSError, ...
        raise MediaError(
            "unreadable_video", f"container cannot be opened ({type(e).__name__})", src
        ) from None


def probe_video(src: Source) -> VideoInfo:
    """Frame count, frame rate, size and codec of the first video stream, without decoding.

    Containers that store no frame count (Matroska/WebM) are demuxed to count packets, which
    reads the file but decodes nothing.
    """
    container = av_open(src)
    try:
        if not container.streams.video:
            raise MediaError("unreadable_video", "no video stream", src)
        stream = container.streams.video[0]
        cc = stream.codec_context
        codec = cc.name or ""
        h, w = int(cc.height or 0), int(cc.width or 0)
        if h <= 0 or w <= 0:
            raise MediaError("unreadable_video", f"video stream has size {w}x{h}", src)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        n = int(stream.frames or 0)
        if n <= 0:
            n = sum(1 for p in container.demux(stream) if p.size)
        if n <= 0:
            raise MediaError("unreadable_video", "video stream has no frames", src)
        if fps <= 0:
            dur = (container.duration or 0) / 1e6
            if dur <= 0:
                raise MediaError(
                    "unreadable_video", "neither frame rate nor duration is known", src
                )
            fps = n / dur
        return VideoInfo(n, fps, h, w, codec)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(
            "unreadable_video", f"probe failed ({type(e).__name__}: {e})", src
        ) from None
    finally:
        container.close()


def probe_audio(src: Source) -> AudioInfo:
    """Frame count, sample rate and channels from the audio header (soundfile)."""
    import soundfile as sf

    check_exists(src)
    fp = io.BytesIO(bytes(src)) if is_buffer(src) else src
    try:
        info = sf.info(fp)
    except Exception as e:  # soundfile.LibsndfileError (RuntimeError), OSError, ...
        raise MediaError(
            "unreadable_audio", f"not a readable audio file ({type(e).__name__})", src
        ) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise MediaError("unreadable_audio", "audio file has no samples", src)
    return AudioInfo(int(info.frames), int(info.samplerate), int(info.channels))


def check_frame_indices(indices: Sequence[int], info: VideoInfo, src: Source) -> list[int]:
    """``indices`` as ints, each inside ``[0, info.num_frames)`` (``bad_frame_index`` if not)."""
    idx = [int(i) for i in indices]
    if not idx:
        raise MediaError("bad_frame_index", "no frame indices requested", src)
    bad = [i for i in idx if i < 0 or i >= info.num_frames]
    if bad:
        raise MediaError(
            "bad_frame_index", f"indices {bad[:4]} outside [0, {info.num_frames})", src
        )
    return idx
