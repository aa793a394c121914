"""Decode work and loader worker processes per data-parallel rank at TP2 x PP2 (4 gloo ranks on
this machine, DP = 1): every rank reading (``data.load_once_per_mp_group=false``) vs one reader
per model-parallel group (the default), on the synthetic omni dataset.

    python bench/bench_load_once.py [--batches 6] [--workers 2] [--backend cpu]

Each rank builds the trainer's data source (``EnergonData``; no model) and draws ``--batches``
micro-batches of each modality (image, video, audio, interleaved; pure text mixed in at 0.25).
Decode work is counted where it happens: ``OmniTaskEncoder._decode_and_template`` in the loader
workers (samples decoded, seconds; every process appends to a file of its own) and, with
``--backend deferred``, ``TrainingDecoder.decode`` in the training process. Worker processes: the
child processes of each rank. Prints per mode the totals over the 4 ranks of one DP rank and the
ratio load-once / every-rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the workers' PYTHONPATH

MODALITIES = ("image", "video", "audio", "interleaved")
WORLD = 4


def prepare(base: Path) -> dict:
    from megatron_omni.data.preprocess import preprocess
    from megatron_omni.data.synthetic import corpus_texts, make_synthetic_dataset
    from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

    raw = base / "raw"
    make_synthetic_dataset(raw, num_per_modality=24, seed=11, num_val_per_modality=0)
    tok = train_tiny_tokenizer(corpus_texts(raw), 400, base / "tokenizer.json")
    tokenizer = load_tokenizer(tok, speech_codebook_size=64)
    preprocess(raw, base / "prepared", tokenizer, workers=1, progress=False)
    return {"prepared": str(base / "prepared"), "tok": str(tok), "vocab": tokenizer.vocab_size}


def worker(args) -> None:
    """One rank: build the data source, draw the batches, report the counts."""
    import psutil
    import torch

    from megatron_omni.parallel.cpu_compat import import_megatron_fast

    import_megatron_fast()
    from megatron_omni.config import load_config
    from megatron_omni.data import loaders as L
    from megatron_omni.data.media import deferred as D
    from megatron_omni.data.tokenizer import load_tokenizer
    from megatron_omni.parallel import runtime
    from megatron_omni.training.trainer import EnergonData

    torch.set_num_threads(1)
    log_dir = Path(args.log_dir)

    def counted(fn):
        def wrapper(self, items, *a, **kw):
            t0 = time.perf_counter()
            out = fn(self, items, *a, **kw)
            n = len(items) if isinstance(items, list) else len(items.get("sample_names", []))
            with open(log_dir / f"decode_{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps([n, time.perf_counter() - t0]) + "\n")
            return out
        return wrapper

    L.OmniTaskEncoder._decode_and_template = counted(L.OmniTaskEncoder._decode_and_template)
    D.TrainingDecoder.decode = counted(D.TrainingDecoder.decode)
    data = json.loads(args.data)
    cfg = load_config(None, [
        f"model.llm.vocab_size={data['vocab']}", "model.speech_codebook_size=64",
        f"data.path={data['prepared']}", f"data.tokenizer={data['tok']}",
        f"data.modalities=[{','.join(MODALITIES)}]", "data.seq_length=1024",
        "data.pure_text_ratio=0.25", f"data.num_workers={args.workers}",
        f"data.media_backend={args.backend}", "data.packing_buffer_size=8",
        "data.shuffle_buffer_size=4", "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        f"data.load_once_per_mp_group={'true' if args.mode == 'once' else 'false'}"])
    runtime.initialize(cfg.parallel, seed=cfg.training.seed)
    src = EnergonData(cfg, load_tokenizer(cfg.data.tokenizer, speech_codebook_size=64))
    me = psutil.Process()
    workers = set()
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        for m in MODALITIES:
            src.next(m)
            workers.update(p.pid for p in me.children(recursive=True))
    wall = time.perf_counter() - t0
    report = {"rank": torch.distributed.get_rank(), "pid": os.getpid(), "workers": len(workers),
              "worker_pids": sorted(workers), "loaders": int(src.loaders is not None),
              "wall": wall}
    (log_dir / f"rank{report['rank']}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    runtime.destroy()
    os._exit(0)  # loader workers are daemons; do not wait on their shutdown


def launch(mode: str, data: dict, args) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix=f"load_once_{mode}_"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--mode", mode, "--data", json.dumps(data),
             "--log-dir", str(log_dir), "--batches", str(args.batches),
             "--workers", str(args.workers), "--backend", args.backend],
            env=env, stdout=subprocess.DEVNULL, stderr=open(log_dir / f"err{rank}.log", "w")))
    for rank, p in enumerate(procs):
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"rank {rank} failed: {(log_dir / f'err{rank}.log').read_text()}")
    ranks = [json.loads((log_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    samples = seconds = 0.0
    for f in log_dir.glob("decode_*.jsonl"):
        for line in f.read_text().splitlines():
            n, dt = json.loads(line)
            samples += n
            seconds += dt
    return {"samples": samples, "seconds": seconds,
            "workers": sum(r["workers"] for r in ranks),
            "loader_ranks": sum(r["loaders"] for r in ranks),
            "wall": max(r["wall"] for r in ranks)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="cpu", choices=("cpu", "deferred"))
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--mode")
    ap.add_argument("--data")
    ap.add_argument("--log-dir")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp))
        res = {mode: launch(mode, data, args) for mode in ("every", "once")}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; TP2 x PP2 (4 gloo ranks, DP=1), {args.batches} "
          f"micro-batches x {len(MODALITIES)} modalities, num_workers={args.workers}, "
          f"media_backend={args.backend}")
    print(f"{'':22s}{'every rank reads':>18s}{'load once':>12s}{'ratio':>8s}")
    rows = (("loader ranks", "loader_ranks", "{:.0f}"), ("worker processes", "workers", "{:.0f}"),
            ("samples decoded", "samples", "{:.0f}"), ("decode seconds", "seconds", "{:.2f}"),
            ("wall seconds (draw)", "wall", "{:.2f}"))
    for label, key, fmt in rows:
        a, b = res["every"][key], res["once"][key]
        ratio = f"{b / a:.3f}" if a else "-"
        print(f"{label:22s}{fmt.format(a):>18s}{fmt.format(b):>12s}{ratio:>8s}")


if __name__ == "__main__":
    main()
