"""Turn raw JSONL + media files into Megatron-Energon WebDataset shards, one dataset per modality.

Input: a folder holding ``<modality>.jsonl`` (training) and ``<modality>_val.jsonl`` (held-out
validation, becomes the ``val`` split) for modalities text, image, video, audio, interleaved (see
docs/data_format.md). Media paths inside the lines are relative to --media-root (default: the
input folder).

Every line is validated (UTF-8, JSON, chat structure and placeholders, media files present,
headers readable, sizes sane, images cheaply verified) and its exact LLM token count computed from
the media headers, with nothing decoded. Bad lines are skipped and counted per reason, never fatal.

Output (OUT_DIR is what DataConfig.path points at):

    OUT_DIR/<modality>/train-000000.tar ...   shards (a JSON record + the raw media per sample)
    OUT_DIR/<modality>/val-000000.tar ...
    OUT_DIR/<modality>/.nv-meta/              Energon index, split.yaml, dataset.yaml, omni.json
    OUT_DIR/preprocess_report.json            written / skipped per modality, split and reason
    OUT_DIR/skipped.jsonl                     every skipped line with its reason

Example:

    python tools/preprocess_data.py data/raw data/energon --tokenizer tok/tokenizer.json --workers 8
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megatron_omni.data.media import ImageSettings, VideoSettings
from megatron_omni.data.preprocess import (
    MODALITIES,
    PreprocessConfig,
    discover_inputs,
    preprocess,
)
from megatron_omni.data.special_tokens import DEFAULT_SPEECH_CODEBOOK_SIZE
from megatron_omni.data.templates import DEFAULT_SYSTEM_PROMPT, TemplateConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="preprocess_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input_dir", type=Path,
                   help="folder with <modality>.jsonl / <modality>_val.jsonl")
    p.add_argument("out_dir", type=Path, help="output root (DataConfig.path)")
    p.add_argument("--tokenizer", required=True, type=Path,
                   help="tokenizer.json or SentencePiece model (the one training will use)")
    p.add_argument("--media-root", type=Path, default=None,
                   help="folder media paths are relative to (default: input_dir)")
    p.add_argument("--modalities", nargs="+", default=None, metavar="NAME",
                   help="only these modalities (default: every one found of "
                        f"{', '.join(MODALITIES)})")
    p.add_argument("--workers", type=int, default=1, help="validation processes (default 1)")
    p.add_argument("--shard-max-samples", type=int, default=1000,
                   help="samples per tar shard (default 1000)")
    p.add_argument("--shard-max-mb", type=float, default=1024.0,
                   help="close a shard after this many MB (default 1024)")
    p.add_argument("--no-verify-images", action="store_true",
                   help="only probe image headers; skip the cheap decode check that catches "
                        "truncated JPEG/PNG data (they are then caught, and skipped, at training)")
    p.add_argument("--max-audio-seconds", type=float, default=600.0,
                   help="skip longer audio clips (default 600; 0 = no limit)")
    p.add_argument("--speech-codebook-size", type=int, default=DEFAULT_SPEECH_CODEBOOK_SIZE,
                   help=f"speech codes of the tokenizer (default {DEFAULT_SPEECH_CODEBOOK_SIZE})")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="default system turn ('' = none); must match training")
    g = p.add_argument_group("media sizes (must match training; stored in .nv-meta/omni.json)")
    d_img, d_vid = ImageSettings(), VideoSettings()
    g.add_argument("--image-min-pixels", type=int, default=d_img.min_pixels,
                   help=f"lower pixel bound of a resized image (default {d_img.min_pixels})")
    g.add_argument("--image-max-pixels", type=int, default=d_img.max_pixels,
                   help=f"upper pixel bound of a resized image (default {d_img.max_pixels})")
    g.add_argument("--video-fps", type=float, default=d_vid.fps,
                   help=f"frames sampled per second of video (default {d_vid.fps})")
    g.add_argument("--video-num-frames", type=int, default=None,
                   help="fixed frames per video (default: from --video-fps within "
                        "[min, max] frames)")
    g.add_argument("--video-min-frames", type=int, default=d_vid.min_frames,
                   help=f"fewest frames per video (default {d_vid.min_frames})")
    g.add_argument("--video-max-frames", type=int, default=d_vid.max_frames,
                   help=f"most frames per video (default {d_vid.max_frames})")
    g.add_argument("--video-min-pixels", type=int, default=d_vid.min_pixels,
                   help=f"per-frame lower pixel bound (default {d_vid.min_pixels})")
    g.add_argument("--video-max-pixels", type=int, default=d_vid.max_pixels,
                   help=f"per-frame upper pixel bound (default {d_vid.max_pixels})")
    g.add_argument("--video-total-pixels", type=int, default=d_vid.total_pixels,
                   help=f"pixel budget over all frames of a video (default {d_vid.total_pixels})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = PreprocessConfig(
        image=ImageSettings(min_pixels=a.image_min_pixels, max_pixels=a.image_max_pixels),
        video=VideoSettings(fps=a.video_fps, num_frames=a.video_num_frames,
                            min_frames=a.video_min_frames, max_frames=a.video_max_frames,
                            min_pixels=a.video_min_pixels, max_pixels=a.video_max_pixels,
                            total_pixels=a.video_total_pixels),
        template=TemplateConfig(system_prompt=a.system_prompt or None),
        speech_codebook_size=a.speech_codebook_size,
        max_audio_seconds=a.max_audio_seconds or None,
        verify_images=not a.no_verify_images,
        shard_max_samples=a.shard_max_samples,
        shard_max_bytes=int(a.shard_max_mb * (1 << 20)),
    )
    inputs = discover_inputs(a.input_dir, a.modalities)
    if not inputs:
        print(f"error: no <modality>.jsonl files in {a.input_dir}", file=sys.stderr)
        return 2
    report = preprocess(inputs, a.out_dir, a.tokenizer, media_root=a.media_root or a.input_dir,
                        config=cfg, workers=a.workers, progress=not a.quiet)
    print(report.summary())
    print(f"report: {a.out_dir / 'preprocess_report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
