#!/usr/bin/env python
"""Benchmark: cost of the per-file CRC-32 of checkpoints (``training/ckpt_integrity.py``).

At save, rank 0 computes the size and CRC-32 of every file of the step directory for
``complete.json``; before a resume it verifies them. Both are one sequential read of the
checkpoint. This script measures, on existing checkpoints (default: the demo's,
``demo_out/runs/*/step_*``):

* ``read``: reading every file once (no checksum) - the floor of any verification;
* ``crc32``: :func:`file_checksums` (what a save adds);
* ``verify``: :func:`verify_checkpoint` (what a resume adds: checksums + structural checks);
* ``--save``: additionally builds the demo's model (``examples/model/tiny_omni.yaml``, one
  process, TP=PP=1, Adam state) and times ``save_checkpoint`` (which now includes the checksums)
  against the checksum part alone, as a fraction of the save.

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

from megatron_omni.training.ckpt_integrity import file_checksums, verify_checkpoint


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


def bench_save(repeat: int) -> None:
    """Time save_checkpoint of the demo model vs its checksum part, in one process."""
    import tempfile

    import torch

    from megatron_omni.parallel.cpu_compat import import_megatron_fast

    import_megatron_fast()
    import socket

    from megatron_omni.config import ParallelConfig, load_config
    from megatron_omni.models.omni import build_omni_chunks
    from megatron_omni.parallel import runtime
    from megatron_omni.training import checkpoint as ckpt
    from megatron_omni.training.optimizer import build_optimizer, build_scheduler, wrap_ddp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runtime.initialize(ParallelConfig(), seed=1,
                       env=runtime.DistEnv(0, 1, 0, "127.0.0.1", port, "single"))
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples" / "model" / "tiny_omni.yaml",
                      ["parallel.tensor_model_parallel_size=1"])
    model = wrap_ddp(cfg, build_omni_chunks(cfg))
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt)
    params = sum(p.numel() for c in model for p in c.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        saves, sums = [], []
        for i in range(repeat):
            t = time.perf_counter()
            path = ckpt.save_checkpoint(tmp, i + 1, model, opt, sched, {"step": i + 1}, cfg,
                                        keep_last=1)
            saves.append(time.perf_counter() - t)
            t = time.perf_counter()
            file_checksums(path)
            sums.append(time.perf_counter() - t)
        mib = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20
    s, c = min(saves), min(sums)
    print(f"demo model ({params / 1e6:.2f} M parameters, Adam), one process: checkpoint "
          f"{mib:.2f} MiB, save_checkpoint {s * 1000:.1f} ms (checksums included), checksums "
          f"alone {c * 1000:.2f} ms = {100 * c / s:.1f}% of the save")
    runtime.destroy()
    del torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", help="step directories (default: demo_out/runs/*/step_*)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--save", action="store_true", help="also time a save of the demo model")
    args = p.parse_args(argv)
    if args.save:
        bench_save(args.repeat)
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
