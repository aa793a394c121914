"""The DALI backend: NVIDIA DALI pipelines fed encoded bytes through ``fn.external_source``.

With CUDA: ``mixed`` image decoding (nvJPEG / hardware JPEG decoder), resize on the GPU and the
NVDEC video decoder (H.264, HEVC, AV1, VP8/9, MJPEG, MPEG-4). Without CUDA: the same pipelines
built with ``device_id=None`` run on the CPU, where DALI's video decoder handles only VP8, VP9 and
MJPEG - other codecs fall back to PyAV, and that is logged once. Images are not EXIF-rotated
(``adjust_orientation=False``, like the CPU decoders).

DALI quirks handled here (DALI 2.4):

* After any operator error a pipeline is permanently invalid ("Current pipeline object is no
  longer valid"); :class:`_DaliPipe` drops it and rebuilds on the next call, and a failing batch
  is retried sample by sample so one bad file costs only itself.
* ``fn.decoders.video`` silently pads frame indices beyond the end of the clip (default
  ``pad_mode``) instead of failing, so indices are validated against the header frame count first.
* External-source pipelines are run synchronously (``exec_async=False, exec_pipelined=False,
  prefetch_queue_depth=1``); with the default prefetching a single fed batch is not enough.
* DALI's RGB conversion drops alpha; images with transparency (and palette, CMYK, 16-bit or other
  unusual modes, TIFF/WebP/GIF containers) are decoded by Pillow on the DALI backend too
  (``cpu_decode.py``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import numpy as np

from megatron_omni.data.media.base import MediaBackend, fill_none
from megatron_omni.data.media.common import MediaError, describe_source, log_once, read_bytes
from megatron_omni.data.media.cpu_decode import CPUBackend, soundfile_decode
from megatron_omni.data.media.probe import (
    DEFAULT_MAX_IMAGE_PIXELS,
    VideoInfo,
    check_frame_indices,
    probe_image,
    probe_video,
)

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


def dali_import_error() -> BaseException | None:
    """Why NVIDIA DALI does not import (None when it does)."""
    return _import_dali()[1]


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
        sizes = fill_none(sizes, n)
        results: list[Any] = [None] * n
        groups: dict[str, list] = {"image": [], "image_resize": []}
        pillow: list[tuple[int, bytes]] = []
        for i, (src, size) in enumerate(zip(sources, sizes)):
            try:
                data = read_bytes(src, "corrupt_image")
                info = probe_image(data, self.max_image_pixels)  # cap checked on the header
            except MediaError as e:
                e.source = describe_source(src)
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
                    out.source = describe_source(sources[i])
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
        sizes, infos = fill_none(sizes, n), fill_none(infos, n)
        results: list[Any] = [None] * n
        groups: dict[str, list] = {"video": [], "video_resize": []}
        pyav: list[tuple[int, VideoInfo]] = []
        for i, src in enumerate(sources):
            try:
                info = infos[i] if infos[i] is not None else probe_video(src)
                idx = check_frame_indices(indices[i], info, src)  # DALI would silently pad bad ones
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
                    results[i] = soundfile_decode(data)
            except MediaError as e:
                e.source = describe_source(src)
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
