"""Media decoding (DALI or Pillow/PyAV/soundfile behind one interface) and the Qwen2-VL / audio
preprocessing math. See ``backends.py`` for the decoders, ``vision.py`` and ``audio.py`` for the
math, ``processor.py`` for file -> model input."""

from megatron_omni.data.media.audio import prepare_audio, resample, resampled_length, to_mono
from megatron_omni.data.media.backends import (
    AudioInfo,
    CPUBackend,
    DALIBackend,
    ImageInfo,
    MediaBackend,
    MediaError,
    VideoInfo,
    dali_available,
    probe_audio,
    probe_image,
    probe_video,
    select_backend,
)
from megatron_omni.data.media.processor import MediaProcessor, VideoPlan, VisualInput
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
