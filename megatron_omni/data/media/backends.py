"""Media decoding behind one interface, two backends.

:class:`MediaBackend` decodes images, video frames and audio into plain numpy arrays:

* :class:`CPUBackend` - Pillow (images), PyAV (video), soundfile (audio). Always available.
* :class:`DALIBackend` - NVIDIA DALI pipelines. With CUDA: ``mixed`` image decoding (nvJPEG /
  hardware JPEG decoder), resize on the GPU and the NVDEC video decoder (H.264, HEVC, AV1, VP8/9,
  MJPEG, MPEG-4). Without CUDA: the same pipelines built with ``device_id=None`` run on the CPU,
  where DALI's video decoder handles only VP8, VP9 and MJPEG - other codecs fall back to PyAV,
  and that is logged once.

:func:`select_backend` picks one (``"auto"``: DALI when importable, else CPU) and logs the choice
once; asking for ``"dali"`` without DALI is an error, never a silent fallback.

The header probes (:func:`probe_image`, :func:`probe_video`, :func:`probe_audio`) read sizes,
frame counts and durations without decoding pixels or samples; token counts are computed from
them (see ``processor.py``). Every decoding problem - missing file, corrupt or truncated data, an
image whose header claims more pixels than the cap - raises :class:`MediaError` (a
``ValueError``) with a short machine-readable ``reason``, so a loader can skip and count the
sample instead of dying. The pixel cap is checked on the header, before any decoding.

Images are not EXIF-rotated on either backend (DALI is told ``adjust_orientation=False``): the
Qwen2-VL reference processor does not rotate either, and the header probe must describe the
same pixels the decoder returns.

DALI quirks handled here (DALI 2.4):

* After any operator error a pipeline is permanently invalid ("Current pipeline object is no
  longer valid"); :class:`_DaliPipe` drops it and rebuilds on the next call, and a failing batch
  is retried sample by sample so one bad file costs only itself.
* ``fn.decoders.video`` silently pads frame indices beyond the end of the clip (default
  ``pad_mode``) instead of failing, so indices are validated against the header frame count first.
* External-source pipelines are run synchronously (``exec_async=False, exec_pipelined=False,
  prefetch_queue_depth=1``); with the default prefetching a single fed batch is not enough.
* DALI's RGB conversion drops alpha; images with transparency (and palette, CMYK, 16-bit or other
  unusual modes, TIFF/WebP/GIF containers) are decoded by Pillow on the DALI backend too, so both
  backends composite alpha on white exactly like transformers' ``convert_to_rgb``.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np

log = logging.getLogger("megatron_omni.data.media")

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]
"""A file path or the encoded file content in memory."""
Size = Union[tuple[int, int], None]
"""Target (height, width) for a resize inside the decoder, or None to keep the decoded size."""

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
"""Images whose header claims more pixels than this are refused before decoding. (Pillow itself
refuses headers above 2 * ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 M pixels, whatever this cap
says; those are reported as ``image_too_large`` too.)"""

REASONS = (
    "missing_file",
    "corrupt_image",
    "image_too_large",
    "unreadable_video",
    "bad_frame_index",
    "unreadable_audio",
    "bad_aspect_ratio",
    "bad_audio",        # decoded, but NaN/Inf samples
    "audio_too_short",  # decoded, but shorter than one analysis frame
)

_logged: set[str] = set()
_log_lock = threading.Lock()


def log_once(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time it is seen in this process."""
    with _log_lock:
        if message in _logged:
            return
        _logged.add(message)
    log.log(level, message)


class MediaError(ValueError):
    """A media file that cannot be used. ``reason`` is one of :data:`REASONS` (for per-reason
    skip counters); ``source`` names the file (or ``<N bytes>`` for in-memory data)."""

    def __init__(self, reason: str, message: str, source: Any = None):
        super().__init__(reason, message)
        self.reason, self.message = reason, message
        self.source = _describe(source) if source is not None else None

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" + (f" [{self.source}]" if self.source else "")

    def __reduce__(self):  # survives pickling across data-loader worker processes
        return (MediaError, (self.reason, self.message, self.source))


def _describe(src: Any) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else repr(src)


def _is_buffer(src: Any) -> bool:
    return isinstance(src, (bytes, bytearray, memoryview))


def read_bytes(src: Source, reason: str) -> bytes:
    """File content (or the buffer itself); ``missing_file`` if absent, ``reason`` if empty or
    unreadable."""
    if _is_buffer(src):
        data = bytes(src)
    else:
        try:
            with open(src, "rb") as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise MediaError("missing_file", "no such file", src) from None
        except OSError as e:
            raise MediaError(reason, f"cannot read file: {e}", src) from None
    if not data:
        raise MediaError(reason, "file is empty", src)
    return data


def _check_exists(src: Source) -> None:
    if not _is_buffer(src) and not os.path.isfile(src):
        raise MediaError("missing_file", "no such file", src)


# --------------------------------------------------------------------------------------------------
# header probes (no decoding)


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


def _pil_open(src: Source, max_pixels: int):
    """Open an image lazily (header only) and enforce the pixel cap. Caller closes it."""
    from PIL import Image, UnidentifiedImageError

    _check_exists(src)
    fp = io.BytesIO(bytes(src)) if _is_buffer(src) else src
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
    im = _pil_open(src, max_pixels)
    try:
        return ImageInfo(im.size[1], im.size[0], im.format or "", im.mode)
    finally:
        im.close()


def _av_open(src: Source):
    import av

    _check_exists(src)
    try:
        return av.open(io.BytesIO(bytes(src)) if _is_buffer(src) else os.fspath(src))
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
    container = _av_open(src)
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

    _check_exists(src)
    fp = io.BytesIO(bytes(src)) if _is_buffer(src) else src
    try:
        info = sf.info(fp)
    except Exception as e:  # soundfile.LibsndfileError (RuntimeError), OSError, ...
        raise MediaError(
            "unreadable_audio", f"not a readable audio file ({type(e).__name__})", src
        ) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise MediaError("unreadable_audio", "audio file has no samples", src)
    return AudioInfo(int(info.frames), int(info.samplerate), int(info.channels))


# --------------------------------------------------------------------------------------------------
# Pillow / PyAV / soundfile helpers shared by both backends


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
    im = _pil_open(src, max_pixels)
    try:
        rgb = _pil_to_rgb(im, src)
    finally:
        im.close()
    return pil_resize(rgb, size)


def _check_indices(indices: Sequence[int], info: VideoInfo, src: Source) -> list[int]:
    idx = [int(i) for i in indices]
    if not idx:
        raise MediaError("bad_frame_index", "no frame indices requested", src)
    bad = [i for i in idx if i < 0 or i >= info.num_frames]
    if bad:
        raise MediaError(
            "bad_frame_index", f"indices {bad[:4]} outside [0, {info.num_frames})", src
        )
    return idx


def _pyav_decode_video(src: Source, indices: list[int], size: Size) -> np.ndarray:
    container = _av_open(src)
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


def _soundfile_decode(src: Source) -> tuple[np.ndarray, int]:
    import soundfile as sf

    _check_exists(src)
    fp = io.BytesIO(bytes(src)) if _is_buffer(src) else src
    try:
        data, sr = sf.read(fp, dtype="float32", always_2d=True)
    except Exception as e:
        raise MediaError("unreadable_audio", f"decoding failed ({type(e).__name__})", src) from None
    if data.shape[0] == 0:
        raise MediaError("unreadable_audio", "audio file has no samples", src)
    return data, int(sr)


# --------------------------------------------------------------------------------------------------
# interface


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


def _guard(fn: Callable, *args) -> Any:
    try:
        return fn(*args)
    except MediaError as e:
        return e


def _fill(seq, n):
    return list(seq) if seq is not None else [None] * n


# --------------------------------------------------------------------------------------------------
# CPU backend


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
            lambda s, z: _cpu_decode_image(s, z, self.max_image_pixels), sources, _fill(sizes, n)
        )

    def decode_videos(self, sources, indices, sizes=None, infos=None):
        n = len(sources)

        def one(src, idx, size, info):
            info = info if info is not None else probe_video(src)
            return _pyav_decode_video(src, _check_indices(idx, info, src), size)

        return self._map(one, sources, indices, _fill(sizes, n), _fill(infos, n))

    def decode_audios(self, sources):
        return self._map(_soundfile_decode, sources)

    def describe(self) -> str:
        return f"cpu (Pillow, PyAV, soundfile; {self.num_threads} threads)"


# --------------------------------------------------------------------------------------------------
# DALI backend

_dali_state: dict[str, Any] = {}


def _import_dali():
    """(dali module, None) or (None, the import error). DALI's import can fail with ImportError
    (not installed), OSError (missing shared libraries) or RuntimeError (CUDA/driver trouble)."""
    if "mod" not in _dali_state:
        try:
            import nvidia.dali as dali
            import nvidia.dali.fn  # noqa: F401
            import nvidia.dali.types  # noqa: F401

            _dali_state["mod"], _dali_state["err"] = dali, None
        except (ImportError, OSError, RuntimeError) as e:
            _dali_state["mod"], _dali_state["err"] = None, e
    return _dali_state["mod"], _dali_state["err"]


def dali_available() -> bool:
    """True when NVIDIA DALI imports."""
    return _import_dali()[0] is not None


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


class _DaliPipe:
    """One DALI pipeline fed by ``fn.external_source`` inputs, run synchronously.

    DALI marks a pipeline invalid after any operator error, so a failed run drops the pipeline
    and the next call builds a fresh one.
    """

    def __init__(self, graph: Callable, batch_size: int, num_threads: int, device_id: int | None):
        self.graph, self.batch_size, self.num_threads, self.device_id = (
            graph,
            batch_size,
            num_threads,
            device_id,
        )
        self._pipe = None
        self._lock = threading.Lock()

    def _build(self):
        from nvidia.dali import Pipeline

        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        with pipe:
            pipe.set_outputs(*self.graph())
        pipe.build()
        return pipe

    def run(self, feeds: dict[str, list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Feed one batch (<= batch_size samples) and return, per output, one array per sample."""
        n = len(next(iter(feeds.values())))
        with self._lock:
            if self._pipe is None:
                self._pipe = self._build()
            try:
                for name, data in feeds.items():
                    self._pipe.feed_input(name, data)
                outs = self._pipe.run()
            except Exception:
                self._pipe = None  # "Current pipeline object is no longer valid"
                raise
            result = []
            for out in outs:
                if hasattr(out, "as_cpu"):
                    out = out.as_cpu()
                result.append([np.array(out.at(i)) for i in range(n)])
            return result


def _short(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [
        ln
        for ln in lines
        if not ln.startswith(
            (
                "File ",
                "Current pipeline",
                "Critical error",
                "Error in",
                "which was used",
                "encountered",
            )
        )
    ]
    return (useful[-1] if useful else (lines[-1] if lines else type(e).__name__))[:200]


class DALIBackend(MediaBackend):
    """NVIDIA DALI decoding; GPU (``mixed``/``gpu`` operators) when CUDA is present, else DALI's
    CPU operators (``device_id=None``). Pipelines are built lazily, one per kind of work, and fed
    encoded bytes through ``fn.external_source``: decoding happens after packing, on whatever
    samples the packer chose, so a file reader (and its sharding) is not used here.
    """

    name = "dali"
    CPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
    GPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})
    IMAGE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "PPM", "JPEG2000"})
    IMAGE_MODES = frozenset({"RGB", "L"})
    _AUDIO_MAGIC = (b"RIFF", b"RF64", b"fLaC", b"OggS")

    def __init__(
        self,
        device: str = "auto",
        max_batch_size: int = 16,
        num_threads: int = 2,
        device_id: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        super().__init__(max_image_pixels)
        dali, err = _import_dali()
        if dali is None:
            raise RuntimeError(f"NVIDIA DALI cannot be imported ({type(err).__name__}: {err})")
        if device == "auto":
            device = "gpu" if cuda_available() else "cpu"
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DALIBackend device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        if device == "gpu":
            if not cuda_available():
                raise RuntimeError(
                    "DALIBackend(device='gpu') needs CUDA, which is not available; use device='cpu'"
                )
            if device_id is None:
                import torch

                device_id = torch.cuda.current_device()
            self._decode_dev, self._op_dev = "mixed", "gpu"
        else:
            device_id = None
            self._decode_dev = self._op_dev = "cpu"
        self.device, self.device_id = device, device_id
        self.max_batch_size, self.num_threads = int(max_batch_size), int(num_threads)
        self._fallback = CPUBackend(max_image_pixels, num_threads=num_threads)
        self._pipes: dict[str, _DaliPipe] = {}
        self.version = dali.__version__

    def describe(self) -> str:
        where = (
            f"GPU {self.device_id} (mixed decoders)" if self.device == "gpu" else "CPU operators"
        )
        return (
            f"dali {self.version} on {where}; {self.num_threads} threads, "
            f"batch <= {self.max_batch_size}"
        )

    # pipelines -----------------------------------------------------------------------------------
    def _pipe(self, kind: str) -> _DaliPipe:
        if kind not in self._pipes:
            from nvidia.dali import fn, types

            dec, op = self._decode_dev, self._op_dev

            def resize(x):
                size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
                return fn.resize(
                    x,
                    device=op,
                    size=size,
                    interp_type=types.INTERP_CUBIC,
                    antialias=True,
                    dtype=types.UINT8,
                )

            def image_graph(with_resize):
                def g():
                    enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
                    img = fn.decoders.image(
                        enc, device=dec, output_type=types.RGB, adjust_orientation=False
                    )
                    return (resize(img) if with_resize else img,)

                return g

            def video_graph(with_resize):
                def g():
                    enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
                    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
                    vid = fn.decoders.video(enc, device=dec, frames=frames)
                    return (resize(vid) if with_resize else vid,)

                return g

            def audio_graph():
                enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
                wav, sr = fn.decoders.audio(enc, downmix=False, dtype=types.FLOAT)
                return wav, sr

            graphs = {
                "image": image_graph(False),
                "image_resize": image_graph(True),
                "video": video_graph(False),
                "video_resize": video_graph(True),
                "audio": audio_graph,
            }
            self._pipes[kind] = _DaliPipe(
                graphs[kind], self.max_batch_size, self.num_threads, self.device_id
            )
        return self._pipes[kind]

    def _run_isolated(
        self,
        kind: str,
        items: list[tuple[int, dict[str, np.ndarray]]],
        on_error: Callable[[int, Exception], MediaError],
    ) -> dict:
        """Run ``items`` (index, feed dict) in batches; a failing batch is retried per sample so
        only the bad sample turns into a MediaError. Returns index -> tuple of outputs |
        MediaError."""
        pipe = self._pipe(kind)
        results: dict[int, Any] = {}
        for start in range(0, len(items), self.max_batch_size):
            chunk = items[start : start + self.max_batch_size]
            feeds = {k: [f[k] for _, f in chunk] for k in chunk[0][1]}
            try:
                outs = pipe.run(feeds)
                for j, (i, _) in enumerate(chunk):
                    results[i] = tuple(o[j] for o in outs)
                continue
            except Exception as e:
                if len(chunk) == 1:
                    results[chunk[0][0]] = on_error(chunk[0][0], e)
                    continue
            for i, f in chunk:
                try:
                    outs = pipe.run({k: [v] for k, v in f.items()})
                    results[i] = tuple(o[0] for o in outs)
                except Exception as e:
                    results[i] = on_error(i, e)
        return results

    # images --------------------------------------------------------------------------------------
    def decode_images(self, sources, sizes=None):
        n = len(sources)
        sizes = _fill(sizes, n)
        results: list[Any] = [None] * n
        groups: dict[str, list] = {"image": [], "image_resize": []}
        pillow: list[tuple[int, bytes]] = []
        for i, (src, size) in enumerate(zip(sources, sizes)):
            try:
                data = read_bytes(src, "corrupt_image")
                info = probe_image(data, self.max_image_pixels)  # cap checked on the header
            except MediaError as e:
                e.source = _describe(src)
                results[i] = e
                continue
            if info.format in self.IMAGE_FORMATS and info.mode in self.IMAGE_MODES:
                feed = {"enc": np.frombuffer(data, np.uint8)}
                if size is not None:
                    feed["size"] = np.asarray(size, np.float32)
                groups["image_resize" if size is not None else "image"].append((i, feed))
            else:  # alpha / palette / exotic formats: Pillow, same rule as the CPU backend
                pillow.append((i, data))
        if pillow:
            decoded = self._fallback.decode_images(
                [d for _, d in pillow], [sizes[i] for i, _ in pillow]
            )
            for (i, _), out in zip(pillow, decoded):
                if isinstance(out, MediaError):
                    out.source = _describe(sources[i])
                results[i] = out
        for kind, items in groups.items():
            if items:
                err = lambda i, e: MediaError("corrupt_image", f"DALI: {_short(e)}", sources[i])  # noqa: E731
                for i, out in self._run_isolated(kind, items, err).items():
                    results[i] = out if isinstance(out, MediaError) else out[0]
        return results

    # video ---------------------------------------------------------------------------------------
    def _dali_decodes(self, codec: str) -> bool:
        ok = codec in (self.GPU_VIDEO_CODECS if self.device == "gpu" else self.CPU_VIDEO_CODECS)
        if not ok:
            where = "GPU" if self.device == "gpu" else "CPU"
            log_once(
                f"DALI's {where} video decoder cannot decode {codec!r}; those videos are decoded "
                "with PyAV",
                logging.WARNING,
            )
        return ok

    def decode_videos(self, sources, indices, sizes=None, infos=None):
        n = len(sources)
        sizes, infos = _fill(sizes, n), _fill(infos, n)
        results: list[Any] = [None] * n
        groups: dict[str, list] = {"video": [], "video_resize": []}
        pyav: list[tuple[int, VideoInfo]] = []
        for i, src in enumerate(sources):
            try:
                info = infos[i] if infos[i] is not None else probe_video(src)
                idx = _check_indices(indices[i], info, src)  # DALI would silently pad bad ones
                if not self._dali_decodes(info.codec):
                    pyav.append((i, info))
                    continue
                feed = {
                    "enc": np.frombuffer(read_bytes(src, "unreadable_video"), np.uint8),
                    "frames": np.asarray(idx, np.int32),
                }
                if sizes[i] is not None:
                    feed["size"] = np.asarray(sizes[i], np.float32)
                groups["video_resize" if sizes[i] is not None else "video"].append((i, feed))
            except MediaError as e:
                results[i] = e
        if pyav:
            decoded = self._fallback.decode_videos(
                [sources[i] for i, _ in pyav],
                [indices[i] for i, _ in pyav],
                [sizes[i] for i, _ in pyav],
                [inf for _, inf in pyav],
            )
            for (i, _), out in zip(pyav, decoded):
                results[i] = out
        for kind, items in groups.items():
            if items:
                err = lambda i, e: MediaError("unreadable_video", f"DALI: {_short(e)}", sources[i])  # noqa: E731
                for i, out in self._run_isolated(kind, items, err).items():
                    if not isinstance(out, MediaError) and out[0].shape[0] != len(indices[i]):
                        out = MediaError(
                            "unreadable_video",
                            f"DALI returned {out[0].shape[0]} of {len(indices[i])} frames",
                            sources[i],
                        )
                    results[i] = out if isinstance(out, MediaError) else out[0]
        return results

    # audio ---------------------------------------------------------------------------------------
    def decode_audios(self, sources):
        results: list[Any] = [None] * len(sources)
        items = []
        for i, src in enumerate(sources):
            try:
                data = read_bytes(src, "unreadable_audio")
                if data[:4] in self._AUDIO_MAGIC:  # WAV, FLAC, OGG: DALI; anything else: soundfile
                    items.append((i, {"enc": np.frombuffer(data, np.uint8)}))
                else:
                    results[i] = _soundfile_decode(data)
            except MediaError as e:
                e.source = _describe(src)
                results[i] = e
        if items:
            err = lambda i, e: MediaError("unreadable_audio", f"DALI: {_short(e)}", sources[i])  # noqa: E731
            for i, out in self._run_isolated("audio", items, err).items():
                if isinstance(out, MediaError):
                    results[i] = out
                    continue
                wav, sr = out
                wav = wav.reshape(wav.shape[0], -1).astype(np.float32, copy=False)
                if wav.shape[0] == 0:
                    results[i] = MediaError(
                        "unreadable_audio", "audio file has no samples", sources[i]
                    )
                else:
                    results[i] = (wav, int(round(float(np.asarray(sr).reshape(-1)[0]))))
        return results


# --------------------------------------------------------------------------------------------------
# selection


def select_backend(
    name: str = "auto",
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    num_threads: int = 2,
    dali_device: str = "auto",
    max_batch_size: int = 16,
) -> MediaBackend:
    """Build the media backend ``name`` ("auto" | "dali" | "cpu") and log the choice once.

    "auto" takes DALI when it imports, else the CPU backend; "dali" without an importable DALI
    raises RuntimeError saying how to fix it.
    """
    key = (name or "auto").lower()
    if key not in ("auto", "dali", "cpu"):
        raise ValueError(f"media backend must be 'auto', 'dali' or 'cpu', got {name!r}")
    if key == "dali" and not dali_available():
        err = _import_dali()[1]
        raise RuntimeError(
            f"media backend 'dali' was requested but NVIDIA DALI cannot be imported "
            f"({type(err).__name__}: {err}); install nvidia-dali-cuda120 or set the media backend "
            "to 'cpu' or 'auto'"
        )
    if key == "dali" or (key == "auto" and dali_available()):
        backend: MediaBackend = DALIBackend(
            device=dali_device,
            max_batch_size=max_batch_size,
            num_threads=num_threads,
            max_image_pixels=max_image_pixels,
        )
    else:
        backend = CPUBackend(max_image_pixels=max_image_pixels, num_threads=num_threads)
    log_once(f"media backend ({key}): {backend.describe()}")
    return backend
