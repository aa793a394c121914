"""``omni-convert-data`` (also ``python tools/convert_dataset.py``): public dataset layouts -> our
JSONL, ready for ``tools/preprocess_data.py``.

    omni-convert-data --format llava --input llava_v1_5_mix665k.json --out data/raw \\
        --media-root data/llava_images
    python tools/preprocess_data.py data/raw data/prepared --tokenizer tok/tokenizer.json \\
        --media-root data/llava_images --modalities image

Writes ``OUT/<modality>.jsonl`` (extracted media under ``OUT/media/<modality>/``),
``OUT/convert_<modality>_report.json`` (records read / written / skipped per reason, the media
root to give preprocessing) and ``OUT/convert_<modality>_skipped.jsonl`` (every skipped record:
``source_id``, ``reason``, ``message``). Every written line has passed preprocessing's own line
check; each keeps the record's id as ``source_id``. docs/data_format.md describes each format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_omni.data.converters.chat import convert_conversations, convert_openai
from megatron_omni.data.converters.common import (
    FORMATS,
    ConvertError,
    ConvertReport,
    Options,
    check_modality_name,
    run_conversion,
)
from megatron_omni.data.converters.preference import convert_dpo
from megatron_omni.data.converters.speech import convert_funasr, convert_kaldi, kaldi_files
from megatron_omni.data.converters.webdataset import convert_webdataset

CONVERTERS = {
    "llava": convert_conversations,
    "sharegpt": convert_conversations,
    "openai": convert_openai,
    "kaldi": convert_kaldi,
    "funasr": convert_funasr,
    "webdataset": convert_webdataset,
    "dpo": convert_dpo,
}
DEFAULT_MODALITY = {"llava": "image", "sharegpt": "text", "openai": "text", "kaldi": "audio",
                    "funasr": "audio", "webdataset": "image", "dpo": "preference"}
EXTRACTS_MEDIA = ("openai", "webdataset")
"""Formats whose media are written into the output folder (which is then the media root)."""
TAKES_INSTRUCTION = ("kaldi", "funasr", "webdataset")


def _output_media_root(opts: Options) -> Path:
    if opts.format in EXTRACTS_MEDIA:
        return opts.out
    if opts.media_root is not None:
        return opts.media_root
    if opts.format == "kaldi":
        return kaldi_files(opts.input)[0].parent
    return opts.input.parent


def convert(opts: Options) -> ConvertReport:
    """Run one conversion (raises :class:`ConvertError` on bad arguments / existing output)."""
    if opts.format not in CONVERTERS:
        raise ConvertError(f"--format {opts.format!r}: use one of {', '.join(FORMATS)}")
    if not opts.input.exists():
        raise ConvertError(f"--input {opts.input} does not exist")
    if opts.media_root is not None and not opts.media_root.is_dir():
        raise ConvertError(f"--media-root {opts.media_root} is not a folder")
    if opts.instructions and opts.format not in TAKES_INSTRUCTION:
        raise ConvertError(f"--instruction / --instructions-file apply to "
                           f"{', '.join(TAKES_INSTRUCTION)}, not {opts.format}")
    if opts.limit is not None and opts.limit < 1:
        raise ConvertError("--limit must be >= 1")
    if opts.format in EXTRACTS_MEDIA:
        # The source tree must not be inside the output (we would read what we write).
        src, out = opts.input.resolve(), opts.out.resolve()
        if src == out or out in src.parents:
            raise ConvertError(f"--input {opts.input} is inside --out {opts.out}; use another "
                               "output folder")
    modality = opts.modality or DEFAULT_MODALITY[opts.format]
    return run_conversion(opts, CONVERTERS[opts.format], modality, _output_media_root(opts))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="omni-convert-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS, help="the source layout")
    p.add_argument("--input", required=True, type=Path,
                   help="source file (JSON array or JSONL), Kaldi data folder, or .tar / folder "
                        "of .tar files")
    p.add_argument("--out", required=True, type=Path, help="output folder (<modality>.jsonl)")
    p.add_argument("--media-root", type=Path, default=None,
                   help="folder the source's media paths are relative to (default: the input's "
                        "folder); also the --media-root for preprocessing, except for openai / "
                        "webdataset, whose media are placed in --out")
    p.add_argument("--modality", default=None,
                   help="output file name <modality>.jsonl (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_MODALITY.items()) + ")")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="stop after N source records (a quick look)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--instruction", default=None,
                   help="user turn of kaldi / funasr / webdataset samples (default: 'Transcribe "
                        "the audio.' / 'Describe the image briefly.')")
    g.add_argument("--instructions-file", type=Path, default=None,
                   help="one instruction per line; each sample draws one (see --seed)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the instruction draw (the draw depends on seed and source id)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="validate special strings with the training tokenizer (default: its "
                        "M2-omni special tokens over a byte stand-in, the same rules)")
    p.add_argument("--no-verify-images", action="store_true",
                   help="as in preprocess_data.py: only probe image headers")
    p.add_argument("--max-audio-seconds", type=float, default=600.0,
                   help="as in preprocess_data.py: skip longer clips (default 600; 0 = no limit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        instructions: list[str] = []
        if a.instruction is not None:
            instructions = [a.instruction]
        elif a.instructions_file is not None:
            instructions = [ln.strip() for ln in
                            a.instructions_file.read_text(encoding="utf-8").splitlines()
                            if ln.strip()]
            if not instructions:
                raise ConvertError(f"{a.instructions_file} holds no instruction")
        opts = Options(format=a.format, input=a.input, out=a.out, media_root=a.media_root,
                       modality=a.modality, limit=a.limit, force=a.force,
                       instructions=instructions, seed=a.seed, tokenizer=a.tokenizer,
                       verify_images=not a.no_verify_images,
                       max_audio_seconds=a.max_audio_seconds or None, progress=not a.quiet)
        report = convert(opts)
    except (ConvertError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    note = check_modality_name(report.modality)
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
