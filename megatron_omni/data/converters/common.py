"""What every converter shares: streaming readers, the output folder, validation, the run loop.

A converter is a generator ``convert(source, opts, out) -> Iterator[Sample | Skip]`` (one item per
source record, in source order). The runner (:func:`run_conversion`) adds ``source_id`` to each
sample, validates the exact bytes it is about to write with preprocessing's own
:func:`megatron_omni.data.preprocess.process_line` (the same structure, placeholder, media path,
media header and image checks ``tools/preprocess_data.py`` applies), writes it or counts it as
skipped with its reason, and shows a progress bar over the input bytes. Memory does not grow with
the input: records are read one at a time (a JSON array too, see :func:`iter_json_records`).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import logging
import os
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from megatron_omni.data.format import MODALITIES
from megatron_omni.data.preprocess import (
    PREPROCESS_REASONS,
    PreprocessConfig,
    SkipLine,
    _make_ctx,
    process_line,
)
from megatron_omni.data.tokenizer import OmniTokenizer, load_tokenizer

log = logging.getLogger("megatron_omni.data.converters")

FORMATS = ("llava", "sharegpt", "openai", "kaldi", "funasr", "webdataset", "dpo")

CONVERT_REASONS: dict[str, str] = {
    "bad_json": "a JSONL line that is not valid JSON",
    "bad_utf8": "a line that is not valid UTF-8",
    "bad_record": "not an object, or a required field missing / of the wrong type",
    "bad_role": "a speaker / role the format does not map to system, user or assistant",
    "unsupported_content": "tool calls, function results or a content part type we cannot carry",
    "remote_media": "an http(s) media URL (the converter never downloads)",
    "bad_data_url": "a data: URL that is not base64 media",
    "media_outside_root": "an absolute media path outside --media-root",
    "pipe_command": "a Kaldi wav.scp entry that is a shell pipe (`cmd |`)",
    "ark_entry": "a Kaldi wav.scp entry inside an ark archive (`file.ark:offset`)",
    "no_transcript": "an utterance in wav.scp without a line in text",
    "no_audio": "an utterance in text without a line in wav.scp",
    "no_caption": "a WebDataset sample without .txt and without a caption in its .json",
    "no_image": "a WebDataset sample without an image member",
    "unsafe_member": "a tar member with an absolute path, '..', or that is a link / device",
    "internal_error": "an unexpected error converting the record (a bug; logged with traceback)",
}
"""Reasons the converters themselves skip a record for (validation adds preprocessing's reasons,
``preprocess.PREPROCESS_REASONS``)."""

ALL_REASONS = frozenset(CONVERT_REASONS) | PREPROCESS_REASONS

_ROLE_MAP = {
    "system": "system", "developer": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
}
_UNSUPPORTED_ROLES = {"tool", "function", "function_call", "observation", "ipython"}


class ConvertError(Exception):
    """A problem that stops the whole conversion (bad arguments, existing output, an input that
    cannot be read on); the message says what to do."""


@dataclass
class Skip(Exception):
    """A source record that is not written: ``reason`` is a key of :data:`ALL_REASONS`."""

    reason: str
    message: str = ""

    def __post_init__(self):
        assert self.reason in ALL_REASONS, self.reason
        super().__init__(f"[{self.reason}] {self.message}")


@dataclass
class Sample:
    """One converted sample, our JSONL object (without ``source_id``; the runner adds it)."""

    obj: dict[str, Any]
    created: list[Path] = field(default_factory=list)
    """Media files the converter wrote for this sample (removed again if it is skipped)."""


@dataclass
class Item:
    """What a converter yields per source record: a sample, or the reason it is skipped."""

    source_id: str
    result: Sample | Skip


def attempt(source_id: str, fn: Callable[..., "Sample"], *args: Any) -> Item:
    """``Item(source_id, fn(*args))``, or the record's skip: a :class:`Skip` it raises, or
    ``internal_error`` for anything unexpected, so one odd record never stops a run."""
    try:
        return Item(source_id, fn(*args))
    except Skip as e:
        return Item(source_id, e)
    except ConvertError:
        raise
    except Exception as e:  # a converter bug or an input shape nobody foresaw
        log.exception("unexpected error converting %s", source_id)
        return Item(source_id, Skip("internal_error", f"unexpected {type(e).__name__}: {e}"))


def map_role(name: Any) -> str:
    """A speaker name of ShareGPT / LLaVA / OpenAI data -> system / user / assistant."""
    key = name.lower() if isinstance(name, str) else None
    if key in _UNSUPPORTED_ROLES:
        raise Skip("unsupported_content", f"a {name!r} turn (tool use) cannot be carried")
    if key not in _ROLE_MAP:
        raise Skip("bad_role", f"unknown speaker {name!r}")
    return _ROLE_MAP[key]


# ------------------------------------------------------------------------------------- options


@dataclass
class Options:
    """The parsed command line (see :mod:`megatron_omni.data.converters.cli`)."""

    format: str
    input: Path
    out: Path
    media_root: Path | None = None
    modality: str | None = None
    limit: int | None = None
    force: bool = False
    instructions: Sequence[str] = ()
    seed: int = 0
    tokenizer: Path | None = None
    verify_images: bool = True
    max_audio_seconds: float | None = 600.0
    progress: bool = True


class Instructions:
    """The user turn of ASR / caption samples: one fixed text, or one drawn per record from a
    list. The draw depends only on (seed, source id), so it does not change with --limit or with
    skipped records."""

    def __init__(self, texts: Sequence[str], seed: int = 0):
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ConvertError("the instruction list is empty")
        self.texts, self.seed = list(texts), seed

    def pick(self, source_id: str) -> str:
        if len(self.texts) == 1:
            return self.texts[0]
        return random.Random(f"{self.seed}\x00{source_id}").choice(self.texts)


def with_placeholder(instruction: str, placeholder: str) -> str:
    """``<audio>\\nTranscribe the audio.``; an instruction that already holds the placeholder is
    used as written."""
    return instruction if placeholder in instruction else f"{placeholder}\n{instruction}"


# ------------------------------------------------------------------------------- input reading


_WS = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 16
MAX_RECORD_CHARS = 1 << 28
"""A single JSON array element larger than this (256 Mi characters) stops the conversion."""


def _iter_json_array(f, name: str, progress: Callable[[int], None], first: bytes
                     ) -> Iterator[Any]:
    """The elements of a top-level JSON array, one at a time, from chunks of the file: each
    element is decoded with ``json.JSONDecoder.raw_decode`` once its text is complete, and the
    buffer keeps only the unread part, so memory is bounded by the largest element.
    ``first`` is the first chunk, already read from ``f``."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    pending = [first]
    buf, pos, eof, done_chars = "", 0, False, 0

    def more() -> bool:
        """Append the next chunk to the buffer (dropping what was read); False at the end."""
        nonlocal buf, pos, eof, done_chars
        data = pending.pop() if pending else f.read(_CHUNK)
        try:
            text = utf8.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise ConvertError(f"{name}: not UTF-8 near character {done_chars + len(buf)}: "
                               f"{e}") from None
        done_chars += pos
        buf, pos = buf[pos:] + text, 0
        if not data:
            eof = True
            return False
        progress(len(data))
        return True

    def skip_ws() -> bool:
        """Move pos to the next non-blank character; False at the end of the input."""
        nonlocal pos
        while True:
            pos = _WS.match(buf, pos).end()
            if pos < len(buf):
                return True
            if eof or not more():
                return False

    if not skip_ws() or buf[pos] != "[":
        raise ConvertError(f"{name}: a JSON file must hold an array of records")
    pos += 1
    expect_value = True
    n = 0
    while True:
        if not skip_ws():
            raise ConvertError(f"{name}: the JSON array is not closed (file cut short?) after "
                               f"{n} records")
        c = buf[pos]
        if c == "]" and (not expect_value or n == 0):
            if skip_trailing(f, buf, pos + 1, eof, progress):
                raise ConvertError(f"{name}: data after the end of the JSON array")
            return
        if not expect_value:
            if c != ",":
                raise ConvertError(f"{name}: expected ',' or ']' after record {n - 1} near "
                                   f"character {done_chars + pos}")
            pos += 1
            expect_value = True
            continue
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof and len(buf) - pos <= MAX_RECORD_CHARS and more():
                    continue
                raise ConvertError(f"{name}: record {n} is not valid JSON (near character "
                                   f"{done_chars + e.pos}): {e.msg}") from None
            if end == len(buf) and not eof and more():
                continue  # a number cut by the chunk edge: decode it again with what follows
            break
        pos = end
        n += 1
        expect_value = False
        yield obj


def skip_trailing(f, buf: str, pos: int, eof: bool, progress: Callable[[int], None]) -> bool:
    """True when anything but whitespace follows position ``pos`` (in the buffer or the file)."""
    if buf[pos:].strip():
        return True
    if eof:
        return False
    while chunk := f.read(_CHUNK):
        progress(len(chunk))
        if chunk.strip():
            return True
    return False


def iter_json_records(path: Path, progress: Callable[[int], None]
                      ) -> Iterator[tuple[int, Any | Skip]]:
    """``(index, record)`` for a JSON array file or a JSONL file (told apart by the first
    non-blank character), streamed. A JSONL line that is not JSON / not UTF-8 comes as
    ``(index, Skip)``; blank lines are passed over. A broken JSON *array* cannot be read past the
    damage and raises :class:`ConvertError`."""
    with open(path, "rb") as f:
        head = f.read(_CHUNK)
        stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if stripped.startswith(b"["):
            if head.startswith(b"\xef\xbb\xbf"):
                head = head[3:]
                progress(3)
            yield from enumerate(_iter_json_array(f, path.name, progress, head))
            return
        f.seek(0)
        for i, (_, raw) in enumerate(_nonblank_lines(f, progress)):
            try:
                yield i, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield i, Skip("bad_utf8", str(e))
            except ValueError as e:
                yield i, Skip("bad_json", str(e))


def _nonblank_lines(f, progress: Callable[[int], None] | None
                    ) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of a binary file, a leading UTF-8 BOM dropped, blank lines
    passed over; ``progress`` gets every line's byte count."""
    for n, raw in enumerate(f):
        if progress is not None:
            progress(len(raw))
        if n == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.strip():
            yield n, raw


def iter_text_lines(path: Path, progress: Callable[[int], None] | None = None
                    ) -> Iterator[tuple[int, str | Skip]]:
    """``(line number, text)`` of a UTF-8 text file without line ends (blank lines skipped)."""
    with open(path, "rb") as f:
        for i, raw in _nonblank_lines(f, progress):
            try:
                yield i, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield i, Skip("bad_utf8", str(e))


def input_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


# ------------------------------------------------------------------------------- media paths


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def media_reference(path: Any, media_root: Path) -> str:
    """A media path of the source -> the path our JSONL stores (relative to ``media_root``).

    ``file://`` URLs become paths; absolute paths must lie inside ``media_root``; http(s) and other
    URLs are refused (nothing is downloaded). A relative path is kept as written: preprocessing's
    own check (``bad_media_path``) refuses one that leaves the media root."""
    if not isinstance(path, str) or not path:
        raise Skip("bad_record", f"a media path must be a non-empty string, got {path!r}")
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif _URL.match(path):
        raise Skip("remote_media", f"{path[:80]}: remote media are not downloaded; fetch them "
                   "first and give local paths")
    if os.path.isabs(path):
        root = media_root.resolve()
        full = Path(os.path.normpath(path))
        try:
            rel = full.relative_to(root)
        except ValueError:
            raise Skip("media_outside_root", f"{path} is outside the media root {root}; pass "
                       "--media-root with a folder that holds it") from None
        return rel.as_posix()
    return Path(path).as_posix() if os.sep != "/" else path


_DATA_URL = re.compile(r"^data:([A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+)?((?:;[^;,]*)*);base64,", re.S)
_MIME_EXT = {"image/jpeg": "jpg", "image/jpg": "jpg", "image/png": "png", "image/webp": "webp",
             "image/gif": "gif", "image/bmp": "bmp", "audio/wav": "wav", "audio/x-wav": "wav",
             "audio/wave": "wav", "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/flac": "flac",
             "audio/ogg": "ogg", "video/mp4": "mp4", "video/webm": "webm"}


def decode_data_url(url: str) -> tuple[bytes, str]:
    """``data:<mime>;base64,<data>`` -> (bytes, file extension)."""
    m = _DATA_URL.match(url)
    if not m:
        raise Skip("bad_data_url", f"{url[:60]}...: only base64 data: URLs are supported")
    ext = _MIME_EXT.get((m.group(1) or "").lower(), "bin")
    return decode_base64(url[m.end():]), ext


def decode_base64(data: Any) -> bytes:
    if not isinstance(data, str):
        raise Skip("bad_data_url", "base64 media data must be a string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Skip("bad_data_url", f"invalid base64 media data: {e}") from None


# ------------------------------------------------------------------------------- output folder


_MODALITY = re.compile(r"[A-Za-z0-9_]+")


class OutputDir:
    """``out/<modality>.jsonl`` (written as ``.tmp`` and renamed when complete), extracted media
    under ``out/media/<modality>/``, the report and the skip list. Every path written is checked
    to lie inside ``out``; existing output is only replaced with ``force``."""

    def __init__(self, out: Path, modality: str, force: bool):
        if not _MODALITY.fullmatch(modality):
            raise ConvertError(f"--modality {modality!r} may only hold letters, digits and '_'")
        self.root = out.resolve()
        self.modality = modality
        self.jsonl = self.root / f"{modality}.jsonl"
        self.media_dir = self.root / "media" / modality
        self.report = self.root / f"convert_{modality}_report.json"
        self.skipped = self.root / f"convert_{modality}_skipped.jsonl"
        existing = [p for p in self.outputs() if p.exists() or p.is_symlink()]
        if existing and not force:
            raise ConvertError(f"{existing[0]} already exists; pass --force to replace the "
                               f"{modality!r} output in {out}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove()

    def outputs(self) -> list[Path]:
        return [self.jsonl, self.media_dir, self.report, self.skipped,
                self.jsonl.with_name(self.jsonl.name + ".tmp"),
                self.skipped.with_name(self.skipped.name + ".tmp")]

    def remove(self) -> None:
        """Delete this modality's output (an earlier run's, or a failed run's)."""
        for p in self.outputs():
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(self.inside(p))

    def inside(self, path: Path) -> Path:
        """``path`` with its links resolved; ConvertError if it would leave the output folder
        (also through a linked folder on the way)."""
        full = Path(path).resolve()
        if full != self.root and self.root not in full.parents:
            raise ConvertError(f"refusing to write {path}: outside the output folder {self.root}")
        return full

    def media_path(self, index: int, k: int, ext: str) -> Path:
        """Where the ``k``-th extracted medium of source record ``index`` goes (10000 per
        folder)."""
        ext = ext.lower() if re.fullmatch(r"[A-Za-z0-9]{1,8}", ext or "") else "bin"
        return self.media_dir / f"{index // 10000:05d}" / f"{index:09d}_{k}.{ext}"

    def write_media(self, index: int, k: int, ext: str, data: bytes) -> tuple[str, Path]:
        """Write one extracted medium; -> (path relative to the output folder, full path)."""
        p = self.inside(self.media_path(index, k, ext))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p.relative_to(self.root).as_posix(), p

    def link_media(self, index: int, k: int, src: Path) -> tuple[str, Path]:
        """A local source file placed in the output folder: hard link, else a copy."""
        p = self.inside(self.media_path(index, k, src.suffix.lstrip(".")))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
        try:
            os.link(src, p)
        except OSError:
            shutil.copyfile(src, p)
        return p.relative_to(self.root).as_posix(), p


# ------------------------------------------------------------------------------- validation


class _ByteBackend:
    """A stand-in base tokenizer (one id per UTF-8 byte, no chat tokens of its own) for
    validation without the training tokenizer. Validation never depends on how text splits into
    tokens, only on the special strings, which :class:`OmniTokenizer` itself matches."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str, parse_special: bool) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def lookup(self, token: str) -> int | None:
        return None

    def id_to_token(self, i: int) -> str:
        return chr(i)


def validation_tokenizer(path: Path | None) -> OmniTokenizer:
    """The training tokenizer when given, else the byte stand-in."""
    if path is not None:
        return load_tokenizer(path)
    return OmniTokenizer(_ByteBackend())


class Validator:
    """Runs preprocessing's per-line check on each line before it is written."""

    def __init__(self, media_root: Path, modality: str, opts: Options):
        cfg = PreprocessConfig(verify_images=opts.verify_images,
                               max_audio_seconds=opts.max_audio_seconds)
        self.ctx = _make_ctx(validation_tokenizer(opts.tokenizer), cfg, media_root)
        self.modality = modality

    def check(self, line: bytes, source_id: str) -> None:
        """Raises :class:`Skip` with preprocessing's reason when the line would be skipped."""
        try:
            process_line(line, key="convert-000000000", modality=self.modality, split="train",
                         source=source_id, ctx=self.ctx)
        except Exception as e:
            if not isinstance(e, SkipLine):  # preprocessing's own pool treats it the same way
                log.exception("unexpected error validating %s", source_id)
                raise Skip("internal_error", f"unexpected {type(e).__name__}: {e}") from None
            msg = e.message
            if msg.startswith(f"[{e.reason}] "):  # a templating error repeats its reason
                msg = msg[len(e.reason) + 3:]
            raise Skip(e.reason, msg) from None


# ------------------------------------------------------------------------------- the run


@dataclass
class ConvertReport:
    format: str
    input: str
    output: str
    modality: str
    media_root: str
    records: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    limited: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "input": self.input, "output": self.output,
                "modality": self.modality, "media_root": self.media_root,
                "records": self.records, "written": self.written,
                "num_skipped": sum(self.skipped.values()),
                "skipped": dict(sorted(self.skipped.items())), "limited": self.limited}

    def preprocess_command(self) -> str:
        out_dir = Path(self.output).parent
        mods = f" --modalities {self.modality}"
        return (f"python tools/preprocess_data.py {out_dir} PREPARED_DIR --tokenizer TOKENIZER "
                f"--media-root {self.media_root}{mods}")

    def summary(self) -> str:
        lines = [f"{self.format}: {self.records} records read, {self.written} written to "
                 f"{self.output}, {sum(self.skipped.values())} skipped"
                 + (" (stopped at --limit)" if self.limited else "")]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  skipped {reason}: {n}")
        lines.append(f"media root for preprocessing: {self.media_root}")
        lines.append(f"next: {self.preprocess_command()}")
        return "\n".join(lines)


Converter = Callable[[Options, OutputDir, Callable[[int], None]], Iterator[Item]]


def run_conversion(opts: Options, converter: Converter, modality: str, media_root: Path
                   ) -> ConvertReport:
    """Drive one converter: validate, write, count, report. ``media_root`` is the folder the
    written media paths are relative to (what preprocessing gets as ``--media-root``)."""
    from tqdm import tqdm

    out = OutputDir(opts.out, modality, opts.force)
    validator = Validator(media_root, modality, opts)
    report = ConvertReport(opts.format, str(opts.input), str(out.jsonl), modality,
                           str(media_root.resolve()))
    bar = tqdm(total=input_size(opts.input), desc=f"convert {opts.format}", unit="B",
               unit_scale=True, disable=not opts.progress, dynamic_ncols=True)
    tmp = out.inside(out.jsonl.with_name(out.jsonl.name + ".tmp"))
    tmp_skipped = out.inside(out.skipped.with_name(out.skipped.name + ".tmp"))
    items = converter(opts, out, bar.update)
    try:
        with open(tmp, "w", encoding="utf-8") as fout, \
                open(tmp_skipped, "w", encoding="utf-8") as fskip:
            for item in items:
                report.records += 1
                res = item.result
                try:
                    if isinstance(res, Skip):
                        raise res
                    obj = dict(res.obj)
                    obj["source_id"] = item.source_id
                    line = json.dumps(obj, ensure_ascii=False)
                    validator.check(line.encode("utf-8"), item.source_id)
                    fout.write(line + "\n")
                    report.written += 1
                except Skip as e:
                    if isinstance(res, Sample):
                        for p in res.created:
                            out.inside(p).unlink(missing_ok=True)
                    report.skipped[e.reason] += 1
                    fskip.write(json.dumps({"source_id": item.source_id, "reason": e.reason,
                                            "message": e.message}, ensure_ascii=False) + "\n")
                if opts.limit is not None and report.records >= opts.limit:
                    report.limited = True
                    break
    except BaseException:
        # A run that cannot finish leaves nothing half-written behind (the input is untouched).
        items.close()
        out.remove()
        raise
    finally:
        bar.close()
    items.close()
    os.replace(tmp, out.jsonl)
    os.replace(tmp_skipped, out.skipped)
    out.inside(out.report).write_text(json.dumps(report.as_dict(), indent=2) + "\n",
                                      encoding="utf-8")
    return report


def check_modality_name(modality: str) -> str | None:
    """A warning when preprocessing would not find the file without ``--modalities``."""
    if modality not in MODALITIES:
        return (f"note: {modality!r} is not one of {', '.join(MODALITIES)}; pass --modalities "
                f"{modality} to preprocess_data.py")
    return None


def get_field(rec: Mapping, *names: str) -> Any:
    """The first of ``names`` present in ``rec`` (None if none)."""
    for n in names:
        if n in rec:
            return rec[n]
    return None
