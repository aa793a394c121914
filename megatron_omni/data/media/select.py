"""Choosing the media backend: :func:`select_backend` (``"auto"``: DALI when importable, else
the CPU decoders) logs the choice once; asking for ``"dali"`` without DALI is an error, never a
silent fallback."""

from __future__ import annotations

from megatron_omni.data.media.base import MediaBackend
from megatron_omni.data.media.common import log_once
from megatron_omni.data.media.cpu_decode import CPUBackend
from megatron_omni.data.media.dali import DALIBackend, dali_available, dali_import_error
from megatron_omni.data.media.probe import DEFAULT_MAX_IMAGE_PIXELS


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
        err = dali_import_error()
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
