"""Loader-side rows/s with images/videos decoded in the workers vs left encoded for the training
process (deferred decoding, ``data.media_backend=deferred``), on the synthetic omni dataset.

    python bench/bench_deferred_decode.py [--rows 24] [--repeat 3]

Per modality (image, video, interleaved) and mode, times ``OmniLoaders.next`` in the process
(``num_workers: 0``: the worker-side work -- read, probe, plan, template, pack, and in ``cpu``
mode decode + patchify -- on one core), then the training-process CPU decode of the deferred
batches (TrainingDecoder on the CPU backend; on a GPU this is DALI's job). Best of ``--repeat``
passes, modes alternating pass by pass. Prints rows/s and the ratio deferred / cpu.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from make_synthetic_dataset import corpus_texts, make_synthetic_dataset  # noqa: E402

from megatron_omni.config.schema import DataConfig  # noqa: E402
from megatron_omni.data.loaders import OmniLoaders  # noqa: E402
from megatron_omni.data.media.cpu_decode import CPUBackend  # noqa: E402
from megatron_omni.data.media.deferred import TrainingDecoder  # noqa: E402
from megatron_omni.data.preprocess import preprocess  # noqa: E402
from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer  # noqa: E402

MODALITIES = ("image", "video", "interleaved")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=24, help="rows timed per modality and pass")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--samples", type=int, default=24, help="samples per modality in the dataset")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        make_synthetic_dataset(base / "raw", num_per_modality=a.samples, seed=7)
        tok_path = train_tiny_tokenizer(corpus_texts(base / "raw"), 400, base / "tok.json")
        tok = load_tokenizer(tok_path)
        preprocess(base / "raw", base / "prep", tok, workers=1, progress=False)
        cfg = DataConfig(path=str(base / "prep"), seq_length=1024, packing_buffer_size=6,
                         shuffle_buffer_size=4, seed=3, num_workers=0)
        print(
            f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
            f"torch {torch.__version__}; {a.rows} rows x best of {a.repeat}"
        )
        print(
            f"{'modality':12s} {'worker cpu decode':>18s} {'worker deferred':>16s} "
            f"{'ratio':>6s} {'train-proc decode':>18s}"
        )
        for m in MODALITIES:
            best = {"cpu": float("inf"), "deferred": float("inf"), "decode": float("inf")}
            for _ in range(a.repeat):
                for mode in ("cpu", "deferred"):
                    L = OmniLoaders(
                        dataclasses.replace(cfg, modalities=[m], media_backend=mode), tok
                    )
                    L.next(m)  # warm-up: shard open, first packing buffer
                    t = time.perf_counter()
                    raws = [L.next(m) for _ in range(a.rows)]
                    best[mode] = min(best[mode], time.perf_counter() - t)
                dec = TrainingDecoder(CPUBackend(num_threads=1), "cpu")
                t = time.perf_counter()
                for r in raws:
                    dec.decode(r)
                best["decode"] = min(best["decode"], time.perf_counter() - t)
                dec.close()
            rps = {k: a.rows / v for k, v in best.items()}
            print(
                f"{m:12s} {rps['cpu']:14.1f} r/s {rps['deferred']:12.1f} r/s "
                f"{rps['deferred'] / rps['cpu']:5.2f}x {rps['decode']:14.1f} r/s"
            )


if __name__ == "__main__":
    main()
