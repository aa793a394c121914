"""``omni-merge-parts``: combine the parts of a Slurm preprocessing job array into one Energon
dataset per modality (megatron_omni/data/merge.py; slurm/preprocess_array.sbatch runs it).

    omni-merge-parts rekey OUT/parts/part-00003
    omni-merge-parts merge OUT [--workers 8] [--allow-missing] [--quiet]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_omni.data import merge as M


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="omni-merge-parts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rekey", help="prefix one part's sample keys with its name")
    r.add_argument("part_dir", type=Path)
    r.add_argument("--prefix", help="default: the part directory's name")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    m = sub.add_parser("merge", help="combine OUT/parts/* into OUT/<modality>")
    m.add_argument("out_dir", type=Path)
    m.add_argument("--workers", type=int, default=1, help="Energon prepare processes")
    m.add_argument("--allow-missing", action="store_true",
                   help="merge the finished parts even if some array tasks failed")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        if a.cmd == "rekey":
            n = M.rekey_part(a.part_dir, a.prefix, progress=not a.quiet)
            print(f"rekeyed {n} shard(s) in {a.part_dir}")
        else:
            rep = M.merge(a.out_dir, a.workers, a.allow_missing, progress=not a.quiet)
            print(f"merged {len(rep['parts'])} part(s): {rep['written']} samples, "
                  f"{rep['num_skipped']} skipped; datasets {sorted(rep['datasets'])} in "
                  f"{a.out_dir} (data.path={a.out_dir})")
    except M.MergeError as e:
        print(f"merge_parts: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
