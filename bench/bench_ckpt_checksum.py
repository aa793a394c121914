#!/usr/bin/env python
"""Benchmark: cost of the per-file CRC-32 of checkpoints (``training/ckpt_integrity.py``).

At save, rank 0 computes the size and CRC-32 of every file of the step directory for
``complete.json``; before a resume it verifies them. Both are one sequential read of the
checkpoint. This script measures, on existing checkpoints (default: the demo's,
``demo_out/runs/*/step_*``):

* ``read``: reading every file once (no checksum) - the floor of any verification;
* ``crc32``: :func:`file_checksums` (what a save adds);
* ``verify``: :func:`verify_checkpoint` (what a resume adds: checksums + structural checks);
* ``save``: the wall time of the save that wrote the checkpoint is not known here, so the
  ratio reported is against ``read`` and per MiB.

Each is the best of ``--repeat`` runs (warm page cache: what rank 0 sees right after a save).
Cold-cache numbers depend on the file system; on a parallel file system expect roughly its
single-stream read bandwidth.

Usage: ``python bench/bench_ckpt_checksum.py [checkpoint dirs ...] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_omni.training.ckpt_integrity import file_checksums, verify_checkpoint  # noqa: E402


def read_all(d: Path) -> int:
    n = 0
    for p in sorted(d.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while True:
                    b = f.read(8 << 20)
                    if not b:
                        break
                    n += len(b)
    return n


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", help="step directories (default: demo_out/runs/*/step_*)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    dirs = [Path(d) for d in args.dirs] or sorted(
        Path(__file__).resolve().parents[1].glob("demo_out/runs/*/step_*"))
    if not dirs:
        print("no checkpoints found; run `make demo` first or pass step directories")
        return 1
    print(f"{'checkpoint':<40} {'files':>5} {'MiB':>8} {'read s':>8} {'crc32 s':>8} "
          f"{'verify s':>8} {'crc/read':>8} {'MiB/s crc':>9}")
    for d in dirs:
        size = read_all(d)
        files = len(file_checksums(d))
        t_read = best(lambda: read_all(d), args.repeat)
        t_crc = best(lambda: file_checksums(d), args.repeat)
        t_ver = best(lambda: verify_checkpoint(d), args.repeat)
        mib = size / 2**20
        print(f"{str(d)[-40:]:<40} {files:>5} {mib:>8.2f} {t_read:>8.4f} {t_crc:>8.4f} "
              f"{t_ver:>8.4f} {t_crc / t_read:>8.2f} {mib / t_crc:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
