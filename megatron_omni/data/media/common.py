"""What every media module shares: the source types, :class:`MediaError` with its reasons, a
once-per-process logger and reading a source's bytes.

Every decoding problem - missing file, corrupt or truncated data, an image whose header claims
more pixels than the cap - raises :class:`MediaError` (a ``ValueError``) with a short
machine-readable ``reason``, so a loader can skip and count the sample instead of dying.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Union

log = logging.getLogger("megatron_omni.data.media")

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]
"""A file path or the encoded file content in memory."""
Size = Union[tuple[int, int], None]
"""Target (height, width) for a resize inside the decoder, or None to keep the decoded size."""

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
"""Every :attr:`MediaError.reason`."""

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
        self.source = describe_source(source) if source is not None else None

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" + (f" [{self.source}]" if self.source else "")

    def __reduce__(self):  # survives pickling across data-loader worker processes
        return (MediaError, (self.reason, self.message, self.source))


def describe_source(src: Any) -> str:
    """A short name of a source for messages: its path, or ``<N bytes>``."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else repr(src)


def is_buffer(src: Any) -> bool:
    """Whether ``src`` is encoded content in memory (not a path)."""
    return isinstance(src, (bytes, bytearray, memoryview))


def read_bytes(src: Source, reason: str) -> bytes:
    """File content (or the buffer itself); ``missing_file`` if absent, ``reason`` if empty or
    unreadable."""
    if is_buffer(src):
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


def check_exists(src: Source) -> None:
    """``missing_file`` unless ``src`` is a buffer or an existing file."""
    if not is_buffer(src) and not os.path.isfile(src):
        raise MediaError("missing_file", "no such file", src)

