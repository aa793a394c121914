"""Speech manifests -> audio chat samples: Kaldi ``wav.scp`` + ``text``, FunASR JSONL.

Each utterance becomes ``{"messages": [{"role": "user", "content": "<audio>\\n<instruction>"},
{"role": "assistant", "content": "<transcript>"}], "audios": ["<path>"], "task": "asr"}``; the
instruction is "Transcribe the audio." unless --instruction / --instructions-file say otherwise.

Kaldi (LibriSpeech / AISHELL recipes): ``--input`` is the data folder holding ``wav.scp`` and
``text`` (or the ``wav.scp`` file, with ``text`` next to it). ``wav.scp`` lines are
``<utt> <path>``; everything after the first blank is the path, so paths with spaces work. Pipe
entries (``<utt> flac -c -d x.flac |``) and ark entries (``<utt> feats.ark:123``) cannot be
referenced as files and are skipped with their reason (``pipe_command`` / ``ark_entry``). Kaldi
data folders are sorted by utterance id (``utils/validate_data_dir.sh`` requires it), so the two
files are joined in one streaming pass; an unsorted folder stops with a message saying how to sort
it. Utterances present in only one of the files are skipped (``no_transcript`` / ``no_audio``).

FunASR: JSONL lines ``{"key", "source", "target"}`` (other keys ignored).

Audio paths: relative paths are relative to --media-root (default: the folder of the input);
absolute paths must lie inside it and are stored relative to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from megatron_omni.data.converters.common import (
    ConvertError,
    Instructions,
    Item,
    Options,
    OutputDir,
    Sample,
    Skip,
    attempt,
    iter_json_records,
    iter_text_lines,
    media_reference,
    with_placeholder,
)

DEFAULT_ASR_INSTRUCTION = "Transcribe the audio."


def asr_sample(path: str, transcript: str, instruction: str, media_root: Path) -> Sample:
    rel = media_reference(path, media_root)
    prompt = with_placeholder(instruction, "<audio>")
    return Sample({"messages": [{"role": "user", "content": prompt},
                                {"role": "assistant", "content": transcript}],
                   "audios": [rel], "task": "asr"})


def kaldi_files(input_path: Path) -> tuple[Path, Path]:
    """``(wav.scp, text)`` of a Kaldi data folder (or of a wav.scp path)."""
    scp = input_path / "wav.scp" if input_path.is_dir() else input_path
    text = scp.parent / "text"
    for p in (scp, text):
        if not p.is_file():
            raise ConvertError(f"{p} is missing: --input must be a Kaldi data folder with "
                               "wav.scp and text (or its wav.scp)")
    return scp, text


def _kaldi_entries(path: Path, progress: Callable[[int], None] | None
                   ) -> Iterator[tuple[str, str | None, Skip | None]]:
    """``(utt, rest of the line, Skip or None)`` in file order, checking the sort order."""
    prev = None
    for i, line in iter_text_lines(path, progress):
        if isinstance(line, Skip):
            yield f"{path.name}:{i}", None, line
            continue
        parts = line.strip().split(maxsplit=1)
        utt = parts[0]
        if prev is not None and utt <= prev:
            raise ConvertError(
                f"{path}:{i + 1}: utterance {utt!r} is not after {prev!r}; Kaldi data folders are "
                f"sorted by utterance id: run `LC_ALL=C sort -k1,1 -u -o {path.name} {path.name}` "
                "on wav.scp and text (or utils/fix_data_dir.sh)")
        prev = utt
        yield utt, (parts[1] if len(parts) > 1 else ""), None


def _scp_path(entry: str) -> str:
    """The file of a wav.scp entry, or Skip for entries that are not plain files."""
    e = entry.strip()
    if e.endswith("|"):
        raise Skip("pipe_command", f"{e[:80]!r} is a shell pipe; decode it to files first "
                   "(e.g. with Kaldi's wav-copy) and point wav.scp at them")
    if not e:
        raise Skip("bad_record", "a wav.scp line without a path")
    tail = e.rsplit(":", 1)
    if len(tail) == 2 and tail[1].isdigit() and tail[0].lower().endswith(".ark"):
        raise Skip("ark_entry", f"{e!r} points into an ark archive; write the audio out as files "
                   "(wav-copy ark:... ark,scp:...) first")
    return e


def convert_kaldi(opts: Options, out: OutputDir, progress: Callable[[int], None]
                  ) -> Iterator[Item]:
    scp, text = kaldi_files(opts.input)
    media_root = opts.media_root or scp.parent
    instr = Instructions(opts.instructions or [DEFAULT_ASR_INSTRUCTION], opts.seed)
    wavs = _kaldi_entries(scp, progress)
    texts = _kaldi_entries(text, None)
    w, t = next(wavs, None), next(texts, None)
    while w is not None or t is not None:
        if w is not None and w[2] is not None:  # an undecodable wav.scp line
            yield Item(w[0], w[2])
            w = next(wavs, None)
            continue
        if t is not None and t[2] is not None:
            yield Item(t[0], t[2])
            t = next(texts, None)
            continue
        if t is None or (w is not None and w[0] < t[0]):
            yield Item(w[0], Skip("no_transcript", f"{w[0]} is in wav.scp but not in text"))
            w = next(wavs, None)
        elif w is None or t[0] < w[0]:
            yield Item(t[0], Skip("no_audio", f"{t[0]} is in text but not in wav.scp"))
            t = next(texts, None)
        else:
            utt, entry, transcript = w[0], w[1], t[1]
            yield attempt(utt, lambda: asr_sample(_scp_path(entry), transcript.strip(),
                                                  instr.pick(utt), media_root))
            w, t = next(wavs, None), next(texts, None)


def convert_funasr(opts: Options, out: OutputDir, progress: Callable[[int], None]
                   ) -> Iterator[Item]:
    media_root = opts.media_root or opts.input.parent
    instr = Instructions(opts.instructions or [DEFAULT_ASR_INSTRUCTION], opts.seed)
    for i, rec in iter_json_records(opts.input, progress):
        sid = f"{opts.input.name}:{i}"
        if isinstance(rec, dict) and isinstance(rec.get("key"), (str, int)):
            sid = str(rec["key"])
        if isinstance(rec, Skip):
            yield Item(sid, rec)
            continue
        yield attempt(sid, funasr_sample, rec, instr.pick(sid), media_root)


def funasr_sample(rec: Any, instruction: str, media_root: Path) -> Sample:
    if not isinstance(rec, dict):
        raise Skip("bad_record", "a line must be a JSON object")
    src, tgt = rec.get("source"), rec.get("target")
    if not isinstance(src, str) or not isinstance(tgt, str):
        raise Skip("bad_record", "'source' and 'target' must be strings")
    return asr_sample(src, tgt.strip(), instruction, media_root)
