"""The CPU decoders: Pillow (images), PyAV (video), soundfile (audio), and :class:`CPUBackend`,
which runs them on a small thread pool. The helpers are shared with the DALI backend, which
hands Pillow the images DALI cannot decode alike (alpha, palette, CMYK, 16-bit, TIFF/WebP/GIF),
PyAV the video codecs its decoder lacks and soundfile the audio containers it does not read, so
both backends composite alpha on white exactly like transformers' ``convert_to_rgb``."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from megatron_omni.data.media.base import MediaBackend, fill_none
from megatron_omni.data.media.common import (
    MediaError,
    Size,
    Source,
    check_exists,
    is_buffer,
)
from megatron_omni.data.media.probe import (
    DEFAULT_MAX_IMAGE_PIXELS,
    av_open,
    check_frame_indices,
    pil_open,
    probe_video,
)


def _pil_to_rgb(im, src: Source) -> np.ndarray:
    from PIL import Image

    try:
        im.load()
        if im.mode == "RGB":
            rgb = im
        elif "A" in im.getbands() or "transparency" in im.info:
            # Same rule as transformers' convert_to_rgb: alpha composited on white.
            rgba = im.convert("RGBA")
            rgb = Image.alpha_composite(
                Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba
            ).convert("RGB")
        else:
            rgb = im.convert("RGB")
        return np.array(rgb, dtype=np.uint8)
    except MemoryError:
        raise MediaError("image_too_large", "out of memory while decoding", src) from None
    except Exception as e:  # truncated / corrupt data: OSError, SyntaxError, ValueError, ...
        raise MediaError(
            "corrupt_image", f"decoding failed ({type(e).__name__}: {e})", src
        ) from None


def pil_resize(rgb: np.ndarray, size: Size) -> np.ndarray:
    """Bicubic (antialiased) resize of uint8 HWC to (h, w) with Pillow - the reference resampler
    of transformers' Qwen2-VL image processor."""
    from PIL import Image

    if size is None or tuple(rgb.shape[:2]) == tuple(size):
        return rgb
    h, w = size
    return np.asarray(Image.fromarray(rgb).resize((int(w), int(h)), Image.BICUBIC))


def _cpu_decode_image(src: Source, size: Size, max_pixels: int) -> np.ndarray:
    im = pil_open(src, max_pixels)
    try:
        rgb = _pil_to_rgb(im, src)
    finally:
        im.close()
    return pil_resize(rgb, size)



def _pyav_decode_video(src: Source, indices: list[int], size: Size) -> np.ndarray:
    container = av_open(src)
    try:
        if not container.streams.video:
            raise MediaError("unreadable_video", "no video stream", src)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        wanted = set(indices)
        last = max(indices)
        got: dict[int, np.ndarray] = {}
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = pil_resize(frame.to_ndarray(format="rgb24"), size)
            if i >= last:
                break
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(
            "unreadable_video", f"decoding failed ({type(e).__name__}: {e})", src
        ) from None
    finally:
        container.close()
    missing = sorted(wanted - got.keys())
    if missing:
        raise MediaError(
            "unreadable_video",
            f"only {len(got)} of the requested frames decode (first missing {missing[0]})",
            src,
        )
    return np.stack([got[i] for i in indices])


def soundfile_decode(src: Source) -> tuple[np.ndarray, int]:
    import soundfile as sf

    check_exists(src)
    fp = io.BytesIO(bytes(src)) if is_buffer(src) else src
    try:
        data, sr = sf.read(fp, dtype="float32", always_2d=True)
    except Exception as e:
        raise MediaError("unreadable_audio", f"decoding failed ({type(e).__name__})", src) from None
    if data.shape[0] == 0:
        raise MediaError("unreadable_audio", "audio file has no samples", src)
    return data, int(sr)


def _guard(fn: Callable, *args) -> Any:
    try:
        return fn(*args)
    except MediaError as e:
        return e



class CPUBackend(MediaBackend):
    """Pillow + PyAV + soundfile, with a small thread pool for batches (all three release the GIL
    while decoding)."""

    name = "cpu"

    def __init__(self, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, num_threads: int = 2):
        super().__init__(max_image_pixels)
        self.num_threads = max(1, int(num_threads))
        self._pool: ThreadPoolExecutor | None = None

    def _map(self, fn: Callable, *iterables) -> list:
        args = list(zip(*iterables))
        if self.num_threads == 1 or len(args) <= 1:
            return [_guard(fn, *a) for a in args]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="media-cpu")
        return list(self._pool.map(lambda a: _guard(fn, *a), args))

    def decode_images(self, sources, sizes=None):
        n = len(sources)
        return self._map(
            lambda s, z: _cpu_decode_image(s, z, self.max_image_pixels), sources,
            fill_none(sizes, n),
        )

    def decode_videos(self, sources, indices, sizes=None, infos=None):
        n = len(sources)

        def one(src, idx, size, info):
            info = info if info is not None else probe_video(src)
            return _pyav_decode_video(src, check_frame_indices(idx, info, src), size)

        return self._map(one, sources, indices, fill_none(sizes, n), fill_none(infos, n))

    def decode_audios(self, sources):
        return self._map(soundfile_decode, sources)

    def describe(self) -> str:
        return f"cpu (Pillow, PyAV, soundfile; {self.num_threads} threads)"
