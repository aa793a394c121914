"""Raw JSONL + media files -> Megatron-Energon WebDataset shards, one dataset per modality.

The data path starts here (docs/architecture.md section 3): every line of ``<modality>.jsonl``
(training) and ``<modality>_val.jsonl`` (held-out validation) is validated, its exact LLM token
count is computed *without decoding any media*, and it is written, with the raw media bytes, into
tar shards that Energon loads. The layout of the result (the on-disk format: folders, the
sample record, ``omni.json``) and its readers live in :mod:`megatron_omni.data.format`.

Validation, per line, cheapest first; the first failure skips the line with a reason
(:data:`PREPROCESS_REASONS`) and never stops the job (docs/architecture.md principle 6):

1. the line is UTF-8 (``bad_utf8``) and JSON (``bad_json``);
2. the sample's structure templates (every ``templates.SKIP_REASONS`` reason, e.g.
   ``empty_conversation``, ``placeholder_mismatch``), checked with stand-in media sizes before
   any file is touched;
3. media paths are relative and stay inside the media root (``bad_media_path``), the files
   exist (``missing_file``);
4. media headers are probed (:class:`~megatron_omni.data.media.MediaProcessor` planning calls:
   image size with the pixel cap -> ``image_too_large``, aspect ratio -> ``bad_aspect_ratio``,
   video container / stream / frame count -> ``unreadable_video``, audio header ->
   ``unreadable_audio``; audio longer than ``max_audio_seconds`` -> ``audio_too_long``,
   shorter than ``min_audio_seconds`` -> ``audio_too_short``, a WAV whose header promises more
   data bytes than the file holds -> ``audio_size_mismatch``);
5. **cheap image verify** (``verify_images``, on by default): a header can be intact while the
   pixel data is cut short (a truncated JPEG). JPEGs are decoded in Pillow's draft mode (DCT
   scaling at 1/8 size, a small fraction of a full decode, result thrown away); other formats run
   Pillow's ``verify()`` (PNG: every chunk read and CRC-checked, no inflating). Failures ->
   ``corrupt_image``. Videos and audio are *not* decoded: a container whose header probes fine but
   whose frames are damaged is caught at training time, where the loader skips and counts it;
6. the exact token count with the probed sizes (``templates.sequence_lengths``).

The output is deterministic: lines are processed by a worker pool (``workers``) but written in
input order, so the shards are identical for any worker count.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from megatron_omni.data.format import (
    MODALITIES,
    REPORT_NAME,
    SKIPPED_NAME,
    SPLITS,
    omni_meta_path,
    prepare_energon,
    settings_dict,
    settings_fingerprint,
)
from megatron_omni.data.media import (
    CPUBackend,
    ImageSettings,
    MediaError,
    MediaProcessor,
    VideoSettings,
)
from megatron_omni.data.media.audio import TARGET_SAMPLE_RATE, resampled_length
from megatron_omni.data.media.probe import DEFAULT_MAX_IMAGE_PIXELS
from megatron_omni.data.media.vision import tokens_for_grid
from megatron_omni.data.special_tokens import DEFAULT_SPEECH_CODEBOOK_SIZE
from megatron_omni.data.templates import (
    MEDIA_FIELDS,
    SKIP_REASONS,
    SampleError,
    TemplateConfig,
    sample_form,
    sequence_lengths,
)
from megatron_omni.data.tokenizer import OmniTokenizer, load_tokenizer

log = logging.getLogger("megatron_omni.data.preprocess")

__all__ = [
    "PREPROCESS_REASONS",
    "PreprocessConfig",
    "PreprocessReport",
    "SkipLine",
    "discover_inputs",
    "preprocess",
    "process_line",
]

PREPROCESS_REASONS = frozenset(SKIP_REASONS) | {
    "blank_line",       # an empty / whitespace-only line
    "bad_utf8",         # the line is not valid UTF-8
    "bad_json",         # the line is not valid JSON
    "bad_media_path",   # absolute, empty or escaping the media root
    "audio_too_long",   # longer than PreprocessConfig.max_audio_seconds
    "audio_too_short",  # shorter than PreprocessConfig.min_audio_seconds
    "audio_size_mismatch",  # a WAV header promises more sample bytes than the file holds
    "internal_error",   # an unexpected exception (a bug); logged with its traceback
    # media reasons (megatron_omni.data.media.common.REASONS)
    "missing_file", "corrupt_image", "image_too_large", "unreadable_video", "bad_frame_index",
    "unreadable_audio", "bad_aspect_ratio",
}
"""Every reason a line can be skipped for."""

_MEDIA_PART_PREFIX = {"image": "img", "video": "vid", "audio": "aud"}


@dataclass(frozen=True)
class PreprocessConfig:
    """What token counts depend on, and how shards are cut."""

    image: ImageSettings = ImageSettings()
    """Resize / patch rule of still images (must match training; stored in ``omni.json``)."""
    video: VideoSettings = VideoSettings()
    """Frame sampling / resize rule of videos (stored in ``omni.json``)."""
    template: TemplateConfig = TemplateConfig()
    """Chat template settings (system prompt, audio tokens per clip)."""
    speech_codebook_size: int = DEFAULT_SPEECH_CODEBOOK_SIZE
    """Speech codes of the tokenizer (when the tokenizer is given as a path)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images whose header claims more pixels are skipped (``image_too_large``)."""
    max_audio_seconds: float | None = 600.0
    """Longer audio clips are skipped (``audio_too_long``); None = no limit."""
    min_audio_seconds: float = 0.1
    """Shorter audio clips are skipped (``audio_too_short``): the audio front end needs at least
    one 25 ms analysis frame, and a clip under 0.1 s carries no speech."""
    verify_images: bool = True
    """Cheap decode check of images (JPEG draft decode / Pillow verify) to catch truncated data."""
    shard_max_samples: int = 1000
    """A shard is closed after this many samples."""
    shard_max_bytes: int = 1 << 30
    """... or once it holds this many bytes (whichever comes first)."""

    def __post_init__(self):
        if self.shard_max_samples < 1:
            raise ValueError("PreprocessConfig.shard_max_samples must be >= 1")
        if self.shard_max_bytes < 1:
            raise ValueError("PreprocessConfig.shard_max_bytes must be >= 1")
        if self.max_audio_seconds is not None and self.max_audio_seconds <= 0:
            raise ValueError("PreprocessConfig.max_audio_seconds must be positive or None")
        if self.min_audio_seconds < 0.025:
            raise ValueError("PreprocessConfig.min_audio_seconds must be >= 0.025 (one 25 ms "
                             "analysis frame of the audio front end)")


class SkipLine(Exception):
    """A line that is not written; ``reason`` is one of :data:`PREPROCESS_REASONS`."""

    def __init__(self, reason: str, message: str = ""):
        assert reason in PREPROCESS_REASONS, reason
        super().__init__(f"[{reason}] {message}")
        self.reason, self.message = reason, message


# ------------------------------------------------------------------------------- one line


def _media_lists(obj: Mapping) -> dict[str, list[str]]:
    out = {}
    for kind, fld in MEDIA_FIELDS.items():
        v = obj.get(fld)
        if v is None:
            v = []
        if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
            raise SkipLine("bad_media_field", f"{fld} must be a list of path strings")
        out[kind] = v
    return out


def _resolve(media_root: Path, rel: str) -> Path:
    if not rel or os.path.isabs(rel) or "\x00" in rel:
        raise SkipLine("bad_media_path", f"media path {rel!r} must be a non-empty relative path")
    full = (media_root / rel).resolve()
    root = media_root.resolve()
    if full != root and root not in full.parents:
        raise SkipLine("bad_media_path", f"media path {rel!r} leaves the media root")
    return full


def _read(path: Path, rel: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise SkipLine("missing_file", f"{rel}: no such file") from None
    except OSError as e:
        raise SkipLine("missing_file", f"{rel}: cannot read ({e})") from None


def wav_truncation(data: bytes) -> str:
    """For a RIFF/WAVE file: why its ``data`` chunk is shorter than its header says (empty
    string when it is whole, or when the bytes are not a WAV). Reads the chunk headers only."""
    import struct

    if len(data) < 12 or data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        return ""
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"data":
            if data[:4] == b"RF64" or size == 0xFFFFFFFF:
                return ""  # size lives in the ds64 chunk; soundfile's frame count is trusted
            have = len(data) - (pos + 8)
            if have < size:
                return (f"WAV header promises {size} data bytes, the file holds {have} "
                        f"(truncated)")
            return ""
        pos += 8 + size + (size & 1)
    return "WAV file has no complete data chunk"


def verify_image(data: bytes) -> None:
    """Cheap check that an image's pixel data is complete (see the module docstring)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
            else:
                im.verify()
    except MediaError:
        raise
    except Exception as e:  # OSError (truncated), SyntaxError (bad chunk), ValueError, ...
        raise MediaError("corrupt_image",
                         f"image data is damaged ({type(e).__name__}: {e})") from None


def _ext(rel: str) -> str:
    ext = Path(rel).suffix.lower().lstrip(".")
    return ext if re.fullmatch(r"[a-z0-9]{1,8}", ext) else "bin"


@dataclass
class _Ctx:
    tok: OmniTokenizer
    proc: MediaProcessor
    cfg: PreprocessConfig
    media_root: Path


def process_line(raw: bytes, *, key: str, modality: str, split: str, source: str,
                 ctx: _Ctx) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """Validate one JSONL line and describe it: ``(record, [(part name, bytes), ...])``.

    Raises :class:`SkipLine` with the reason when the line cannot be used.
    """
    if not raw.strip():
        raise SkipLine("blank_line", "empty line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipLine("bad_utf8", str(e)) from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise SkipLine("bad_json", str(e)) from None
    tok, proc, cfg = ctx.tok, ctx.proc, ctx.cfg
    try:
        form = sample_form(obj)
        media = _media_lists(obj)
        # Structure first, with stand-in sizes: no media file is touched for a broken sample.
        sequence_lengths(obj, tok, image_tokens=[1] * len(media["image"]),
                         video_tokens=[1] * len(media["video"]), config=cfg.template)
    except SampleError as e:
        raise SkipLine(e.reason, str(e)) from None

    parts: list[tuple[str, bytes]] = []
    part_names: dict[str, list[str]] = {"images": [], "videos": [], "audios": []}
    image_tokens, image_grids, video_tokens, video_grids, audio_samples = [], [], [], [], []
    try:
        for kind in ("image", "video", "audio"):
            for i, rel in enumerate(media[kind]):
                data = _read(_resolve(ctx.media_root, rel), rel)
                if kind == "image":
                    grid = proc.image_grid(data)
                    if cfg.verify_images:
                        verify_image(data)
                    image_grids.append(list(grid))
                    image_tokens.append(tokens_for_grid(grid, cfg.image))
                elif kind == "video":
                    plan = proc.video_plan(data)
                    video_grids.append(list(plan.grid_thw))
                    video_tokens.append(plan.num_tokens)
                else:
                    frames, sr = proc.backend.probe_audio(data)
                    if cfg.max_audio_seconds is not None and frames / sr > cfg.max_audio_seconds:
                        raise SkipLine("audio_too_long", f"{rel}: {frames / sr:.1f} s > "
                                       f"{cfg.max_audio_seconds} s")
                    if frames / sr < cfg.min_audio_seconds:
                        raise SkipLine("audio_too_short", f"{rel}: {frames / sr * 1000:.0f} ms "
                                       f"< {cfg.min_audio_seconds} s")
                    short = wav_truncation(data)
                    if short:
                        raise SkipLine("audio_size_mismatch", f"{rel}: {short}")
                    audio_samples.append(resampled_length(frames, sr, TARGET_SAMPLE_RATE))
                name = f"{_MEDIA_PART_PREFIX[kind]}{i}.{_ext(rel)}"
                parts.append((name, data))
                part_names[MEDIA_FIELDS[kind]].append(name)
    except MediaError as e:
        raise SkipLine(e.reason if e.reason in PREPROCESS_REASONS else "corrupt_image",
                       str(e)) from None
    try:
        lengths = sequence_lengths(obj, tok, image_tokens=image_tokens, video_tokens=video_tokens,
                                   config=cfg.template)
    except SampleError as e:  # pragma: no cover - the structure check above already passed
        raise SkipLine(e.reason, str(e)) from None

    grids = image_grids + video_grids
    record = {
        "key": key,
        "modality": modality,
        "split": split,
        "source": source,
        "form": form,
        "sample": obj,
        "num_tokens": int(sum(lengths)),
        "sequence_lengths": [int(n) for n in lengths],
        "num_images": len(grids),
        "num_patches": int(sum(t * h * w for t, h, w in grids)),
        "image_tokens": image_tokens,
        "image_grid_thw": image_grids,
        "video_tokens": video_tokens,
        "video_grid_thw": video_grids,
        "audio_num_samples": audio_samples,
        "media": part_names,
    }
    return record, parts


# ------------------------------------------------------------------------------- worker pool

_WORKER: dict[str, _Ctx] = {}


def _make_ctx(tokenizer: OmniTokenizer | str | os.PathLike, cfg: PreprocessConfig,
              media_root: Path) -> _Ctx:
    tok = tokenizer if isinstance(tokenizer, OmniTokenizer) else load_tokenizer(
        tokenizer, speech_codebook_size=cfg.speech_codebook_size)
    # Planning only ever probes headers; the CPU backend's probes are the same on any machine.
    proc = MediaProcessor(CPUBackend(max_image_pixels=cfg.max_image_pixels, num_threads=1),
                          image=cfg.image, video=cfg.video,
                          audio_tokens=cfg.template.audio_tokens_per_clip)
    return _Ctx(tok, proc, cfg, media_root)


def _init_worker(tokenizer, cfg, media_root) -> None:
    _WORKER["ctx"] = _make_ctx(tokenizer, cfg, media_root)


@dataclass(frozen=True)
class _Task:
    modality: str
    split: str
    key: str
    source: str
    raw: bytes


def _run_task(task: _Task):
    """-> ("ok", record, parts) | ("skip", reason, message)."""
    try:
        rec, parts = process_line(task.raw, key=task.key, modality=task.modality,
                                  split=task.split, source=task.source, ctx=_WORKER["ctx"])
        return "ok", rec, parts
    except SkipLine as e:
        return "skip", e.reason, e.message
    except Exception as e:  # a bug or an unforeseen library error: still never kill the job
        log.exception("unexpected error on %s", task.source)
        return "skip", "internal_error", f"unexpected {type(e).__name__}: {e}"


# ------------------------------------------------------------------------------- shard writing


class _ShardWriter:
    """Writes ``<prefix>-NNNNNN.tar`` shards (deterministic tar headers), rolling over by sample
    count and size. A shard is written as ``.tmp`` and renamed when complete."""

    def __init__(self, directory: Path, prefix: str, max_samples: int, max_bytes: int):
        self.directory, self.prefix = directory, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._path = self.directory / name
        self._tar = tarfile.open(self._path.with_suffix(".tar.tmp"), "w",
                                 format=tarfile.USTAR_FORMAT)
        self.shards.append(name)
        self._count = self._bytes = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        self._bytes += len(data) + 1024

    def write(self, key: str, record: dict, parts: Sequence[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._open()
        self._add(f"{key}.json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode())
        for part, data in parts:
            self._add(f"{key}.{part}", data)
        self._count += 1
        if self._count >= self.max_samples or self._bytes >= self.max_bytes:
            self.close()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._path.with_suffix(".tar.tmp"), self._path)
            self._tar = None


# ------------------------------------------------------------------------------- inputs


def discover_inputs(input_dir: str | Path, modalities: Iterable[str] | None = None
                    ) -> dict[str, dict[str, Path]]:
    """``{modality: {"train": path, "val": path}}`` for the ``<modality>.jsonl`` and
    ``<modality>_val.jsonl`` files found in ``input_dir`` (either may be absent)."""
    root = Path(input_dir)
    names = list(modalities) if modalities is not None else list(MODALITIES)
    out: dict[str, dict[str, Path]] = {}
    for m in names:
        if not re.fullmatch(r"[A-Za-z0-9_]+", m):
            raise ValueError(f"modality name {m!r} may only hold letters, digits and '_'")
        found = {}
        for split, fname in (("train", f"{m}.jsonl"), ("val", f"{m}_val.jsonl")):
            if (root / fname).is_file():
                found[split] = root / fname
        if found:
            out[m] = found
    return out


def _key_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)


def _iter_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for line in f:
            yield line.rstrip(b"\r\n")


def _count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


# ------------------------------------------------------------------------------- report


@dataclass
class SplitStats:
    lines: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    tokens: int = 0
    max_tokens: int = 0
    shards: list[str] = field(default_factory=list)
    token_hist: Counter = field(default_factory=Counter)  # num_tokens -> samples (omni.json)

    def as_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "written": self.written,
                "skipped": dict(sorted(self.skipped.items())),
                "num_skipped": sum(self.skipped.values()), "tokens": self.tokens,
                "max_tokens": self.max_tokens, "shards": list(self.shards)}


@dataclass
class PreprocessReport:
    """What a :func:`preprocess` run wrote and skipped (saved as ``preprocess_report.json``)."""

    out_dir: str
    settings: dict[str, Any]
    stats: dict[str, dict[str, SplitStats]]
    """``stats[modality][split]``."""
    datasets: dict[str, str]
    """Prepared Energon dataset folder per modality."""

    @property
    def written(self) -> int:
        return sum(s.written for d in self.stats.values() for s in d.values())

    @property
    def skipped(self) -> Counter:
        c: Counter = Counter()
        for d in self.stats.values():
            for s in d.values():
                c.update(s.skipped)
        return c

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "settings": self.settings,
            "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "num_skipped": sum(self.skipped.values()),
            "datasets": self.datasets,
            "modalities": {m: {sp: s.as_dict() for sp, s in d.items()}
                           for m, d in self.stats.items()},
        }

    def summary(self) -> str:
        lines = [f"{'modality':<12} {'split':<5} {'lines':>7} {'written':>8} {'skipped':>8} "
                 f"{'tokens':>10} {'max':>6}"]
        for m, d in self.stats.items():
            for sp, s in d.items():
                lines.append(f"{m:<12} {sp:<5} {s.lines:>7} {s.written:>8} "
                             f"{sum(s.skipped.values()):>8} {s.tokens:>10} {s.max_tokens:>6}")
        lines.append(f"written {self.written} samples; skipped {sum(self.skipped.values())}")
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {reason}: {n}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- driver


def preprocess(
    inputs: Mapping[str, Mapping[str, str | Path]] | str | Path,
    out_dir: str | Path,
    tokenizer: OmniTokenizer | str | Path,
    *,
    media_root: str | Path | None = None,
    config: PreprocessConfig = PreprocessConfig(),
    workers: int = 1,
    progress: bool = True,
    chunk_size: int = 256,
) -> PreprocessReport:
    """Validate, count and shard every input line; prepare one Energon dataset per modality.

    Args:
        inputs: ``{modality: {"train": jsonl, "val": jsonl}}`` or a folder searched by
            :func:`discover_inputs`.
        out_dir: output root (``DataConfig.path``); existing shards of a modality are replaced.
        tokenizer: an :class:`OmniTokenizer` or the path of its file.
        media_root: folder media paths are relative to (default: the inputs folder, else the
            folder of each JSONL file's parent for mapping inputs).
        config: settings token counts depend on, shard sizes, limits.
        workers: processes validating lines (1 = in this process).
        progress: show a tqdm progress bar.
    """
    if isinstance(inputs, (str, Path)):
        in_root = Path(inputs)
        files = discover_inputs(in_root)
        if not files:
            raise FileNotFoundError(
                f"no <modality>.jsonl files ({', '.join(MODALITIES)}) in {in_root}")
    else:
        in_root = None
        files = {m: {sp: Path(p) for sp, p in d.items()} for m, d in inputs.items()}
        for m, d in files.items():
            bad = set(d) - set(SPLITS)
            if bad:
                raise ValueError(f"inputs[{m!r}] has unknown splits {sorted(bad)}; use {SPLITS}")
    if media_root is None:
        if in_root is None:
            roots = {p.parent for d in files.values() for p in d.values()}
            if len(roots) != 1:
                raise ValueError("inputs come from several folders; pass media_root")
            media_root = roots.pop()
        else:
            media_root = in_root
    media_root = Path(media_root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, int(workers))

    tok = tokenizer if isinstance(tokenizer, OmniTokenizer) else load_tokenizer(
        tokenizer, speech_codebook_size=config.speech_codebook_size)
    settings = settings_dict(config, tok)

    # Clean what an earlier run of this modality left behind.
    for m in files:
        ds = out / m
        if ds.is_dir():
            for old in list(ds.glob("train-*.tar*")) + list(ds.glob("val-*.tar*")):
                old.unlink()

    stats = {m: {sp: SplitStats() for sp in SPLITS if sp in d} for m, d in files.items()}
    writers = {(m, sp): _ShardWriter(out / m, sp, config.shard_max_samples, config.shard_max_bytes)
               for m, d in files.items() for sp in SPLITS if sp in d}
    total = sum(_count_lines(p) for d in files.values() for p in d.values())

    def tasks() -> Iterator[_Task]:
        for m, d in files.items():
            for sp in SPLITS:
                if sp not in d:
                    continue
                path = d[sp]
                stem = _key_stem(path)
                for i, raw in enumerate(_iter_lines(path)):
                    yield _Task(m, sp, f"{stem}-{i:09d}", f"{path.name}:{i}", raw)

    from tqdm import tqdm

    bar = tqdm(total=total, desc="preprocess", unit="line", disable=not progress,
               dynamic_ncols=True)
    skipped_log = open(out / SKIPPED_NAME, "w", encoding="utf-8")
    pool = None
    try:
        if workers > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            tok_arg = tok if method == "fork" else tokenizer
            pool = multiprocessing.get_context(method).Pool(
                workers, initializer=_init_worker, initargs=(tok_arg, config, media_root))
            results = _chunked_imap(pool, tasks(), chunk_size * workers)
        else:
            _init_worker(tok, config, media_root)
            results = ((t, _run_task(t)) for t in tasks())
        for task, res in results:
            st = stats[task.modality][task.split]
            st.lines += 1
            if res[0] == "ok":
                rec, parts = res[1], res[2]
                writers[(task.modality, task.split)].write(task.key, rec, parts)
                st.written += 1
                st.tokens += rec["num_tokens"]
                st.max_tokens = max(st.max_tokens, rec["num_tokens"])
                st.token_hist[int(rec["num_tokens"])] += 1
            else:
                st.skipped[res[1]] += 1
                skipped_log.write(json.dumps({"source": task.source, "modality": task.modality,
                                              "split": task.split, "reason": res[1],
                                              "message": res[2]}, ensure_ascii=False) + "\n")
            bar.update(1)
    finally:
        bar.close()
        skipped_log.close()
        if pool is not None:
            pool.close()
            pool.join()
        for w in writers.values():
            w.close()

    datasets: dict[str, str] = {}
    for m in files:
        shards = [s for sp in SPLITS if (m, sp) in writers for s in writers[(m, sp)].shards]
        for sp in stats[m]:
            stats[m][sp].shards = list(writers[(m, sp)].shards)
        if not any(s.startswith("train-") for s in shards):
            log.warning("modality %s: no training sample survived; no dataset prepared", m)
            if (out / m / ".nv-meta").is_dir():  # never leave an index of deleted shards behind
                import shutil

                shutil.rmtree(out / m / ".nv-meta")
            continue
        prepare_energon(out / m, shards, m, workers)
        meta = dict(settings, modality=m, fingerprint=settings_fingerprint(settings),
                    splits={sp: stats[m][sp].written for sp in stats[m]},
                    # {split: {num_tokens: samples}}: lets training check data.seq_length
                    # against the stored lengths before it starts (config/validate_data.py).
                    token_counts={sp: {str(k): v for k, v in sorted(stats[m][sp].token_hist
                                                                    .items())}
                                  for sp in stats[m]})
        omni_meta_path(out / m).write_text(json.dumps(meta, indent=2, sort_keys=True))
        datasets[m] = str(out / m)

    report = PreprocessReport(str(out), settings, stats, datasets)
    (out / REPORT_NAME).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    return report


def _chunked_imap(pool, tasks: Iterator[_Task], window: int):
    """Ordered results with at most ``window`` lines in flight (bounded memory)."""
    while True:
        chunk = []
        for t in tasks:
            chunk.append(t)
            if len(chunk) >= window:
                break
        if not chunk:
            return
        yield from zip(chunk, pool.imap(_run_task, chunk, chunksize=8))
