"""Media decoding (DALI or Pillow/PyAV/soundfile behind one interface) and the Qwen2-VL / audio
preprocessing math, one job per module:

* ``common.py``: source types, :class:`MediaError` and its reasons, ``log_once``;
* ``probe.py``: header probes (sizes, frame counts, durations) without decoding;
* ``base.py``: the :class:`MediaBackend` interface (batch decoding, one error per bad input);
* ``cpu_decode.py``: Pillow / PyAV / soundfile decoders and :class:`CPUBackend`;
* ``dali.py``: NVIDIA DALI pipelines (GPU ``mixed`` decoders or DALI's CPU operators) and
  :class:`DALIBackend`, with the DALI quirks it works around;
* ``select.py``: :func:`select_backend` (``auto`` / ``dali`` / ``cpu``, logged once);
* ``vision.py`` and ``audio.py``: the resize / patch / frame-sampling and audio math;
* ``processor.py``: file -> model input; ``deferred.py``: decoding in the training process.
"""

from megatron_omni.data.media.audio import prepare_audio, resample, resampled_length, to_mono
from megatron_omni.data.media.base import MediaBackend
from megatron_omni.data.media.common import MediaError
from megatron_omni.data.media.cpu_decode import CPUBackend
from megatron_omni.data.media.dali import DALIBackend, dali_available
from megatron_omni.data.media.probe import (
    AudioInfo,
    ImageInfo,
    VideoInfo,
    probe_audio,
    probe_image,
    probe_video,
)
from megatron_omni.data.media.processor import MediaProcessor, VideoPlan, VisualInput
from megatron_omni.data.media.select import select_backend
from megatron_omni.data.media.vision import (
    ImageSettings,
    VideoSettings,
    image_num_tokens,
    num_sampled_frames,
    patchify,
    sample_frame_indices,
    smart_resize,
    video_num_tokens,
)

__all__ = [
    "AudioInfo", "CPUBackend", "DALIBackend", "ImageInfo", "ImageSettings", "MediaBackend",
    "MediaError", "MediaProcessor", "VideoInfo", "VideoPlan", "VideoSettings", "VisualInput",
    "dali_available", "image_num_tokens", "num_sampled_frames", "patchify", "prepare_audio",
    "probe_audio", "probe_image", "probe_video", "resample", "resampled_length",
    "sample_frame_indices", "select_backend", "smart_resize", "to_mono", "video_num_tokens",
]
