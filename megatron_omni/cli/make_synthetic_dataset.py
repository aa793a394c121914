"""``omni-synthetic-data``: write the small learnable omni-modal raw dataset of
:mod:`megatron_omni.data.synthetic` (JSONL + real media files, no downloads)."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_omni.data.synthetic import make_synthetic_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="omni-synthetic-data",
        description=(
            "Write a small learnable omni-modal dataset (raw JSONL + PNG/JPEG, AVI/WebM, WAV) for "
            "tests and demos: coloured shapes (image), moving shapes (video), beeps (audio), two-"
            "image questions (interleaved), arithmetic / word order / image-generation / "
            "text-to-speech (text). One <modality>.jsonl and <modality>_val.jsonl per modality, "
            "plus manifest.json. Nothing is downloaded; output is identical for a given seed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    p.add_argument("--num-per-modality", type=int, default=64, help="training lines per modality")
    p.add_argument(
        "--num-val-per-modality",
        type=int,
        default=None,
        help="validation lines per modality (None: max(4, num_per_modality // 4))",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    p.add_argument(
        "--broken",
        action="store_true",
        help="also insert deliberately broken lines/files (listed with their expected "
        "skip reason in manifest.json) to test preprocessing's error handling",
    )
    p.add_argument(
        "--preference",
        action="store_true",
        help="also write DPO preference pairs (preference.jsonl, preference_val.jsonl) "
        "in every modality for the alignment stage (AT)",
    )
    p.add_argument(
        "--no-overwrite",
        action="store_true",
        help="fail instead of replacing an existing dataset in out_dir",
    )
    a = p.parse_args(argv)
    m = make_synthetic_dataset(
        a.out_dir,
        a.num_per_modality,
        a.seed,
        a.broken,
        a.num_val_per_modality,
        overwrite=not a.no_overwrite,
        preference=a.preference,
    )
    n_train = sum(f["train_lines"] for f in m["files"].values())
    n_val = sum(f["val_lines"] for f in m["files"].values())
    print(
        f"wrote {a.out_dir}: {n_train} train lines, {n_val} val lines, media {m['media_counts']}, "
        f"{len(m['broken'])} broken lines"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
