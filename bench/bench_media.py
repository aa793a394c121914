"""Media decode + preprocess throughput per backend (samples/s), on generated media.

    python bench/bench_media.py                      # all available backends
    python bench/bench_media.py --backends cpu --images 32 --repeat 5

Generates JPEG images, WAV clips and MJPEG / VP9 / H.264 videos in a temp dir, then times, per
backend, (a) decoding alone and (b) the full MediaProcessor path (decode + smart_resize inside
the decoder + CLIP normalisation + patchify, or mono + 16 kHz resampling for audio). Each figure
is the best of ``--repeat`` timed passes after one warm-up pass (DALI builds its pipelines then);
backends alternate pass by pass so background load on a shared machine hits them alike.
The DALI backend uses GPU decoders where CUDA is present and its CPU operators otherwise; H.264
is decoded by PyAV on DALI's CPU path (so the ratio there is ~1 by construction).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_omni.data.media import CPUBackend, DALIBackend, dali_available  # noqa: E402
from megatron_omni.data.media.processor import MediaProcessor  # noqa: E402
from megatron_omni.data.media.vision import VideoSettings  # noqa: E402


def _pixels(h, w, phase, seed):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 100 * np.sin(xx / 23.0 + phase)
    g = 127 + 100 * np.cos(yy / 17.0 - phase)
    b = 127 + 60 * np.sin((xx + yy) / 31.0 + 2 * phase)
    noise = np.random.default_rng(seed).normal(0, 8, (h, w, 3)).astype(np.float32)
    return np.clip(np.stack([r, g, b], -1) + noise, 0, 255).astype(np.uint8)


def make_media(root: Path, n_images: int, n_audio: int, n_videos: int) -> dict[str, list[Path]]:
    import av
    import soundfile as sf
    from PIL import Image

    out: dict[str, list[Path]] = {
        "image": [],
        "audio": [],
        "video_mjpeg": [],
        "video_vp9": [],
        "video_h264": [],
    }
    for i in range(n_images):
        h, w = (480, 640) if i % 2 == 0 else (720, 960)
        p = root / f"img{i}.jpg"
        Image.fromarray(_pixels(h, w, i * 0.1, i)).save(p, quality=90)
        out["image"].append(p)
    t = np.arange(44100 * 10) / 44100
    for i in range(n_audio):
        p = root / f"clip{i}.wav"
        x = np.stack(
            [0.4 * np.sin(2 * np.pi * (300 + 50 * i) * t), 0.2 * np.sin(2 * np.pi * 1100 * t)], 1
        )
        sf.write(p, x, 44100, subtype="PCM_16")
        out["audio"].append(p)
    for kind, codec, ext, pix in [
        ("video_mjpeg", "mjpeg", "avi", "yuvj420p"),
        ("video_vp9", "libvpx-vp9", "webm", "yuv420p"),
        ("video_h264", "libx264", "mp4", "yuv420p"),
    ]:
        for i in range(n_videos):
            p = root / f"{kind}{i}.{ext}"
            with av.open(str(p), "w") as c:
                s = c.add_stream(codec, rate=10)
                s.width, s.height, s.pix_fmt = 320, 240, pix
                if codec == "libvpx-vp9":
                    s.options = {"deadline": "realtime", "cpu-used": "8"}
                for k in range(60):  # 6 s at 10 fps -> 12 frames sampled at 2 fps
                    for pkt in s.encode(
                        av.VideoFrame.from_ndarray(_pixels(240, 320, 0.2 * k, k), "rgb24")
                    ):
                        c.mux(pkt)
                for pkt in s.encode():
                    c.mux(pkt)
            out[kind].append(p)
    return out


def _ok(results):
    bad = [r for r in results if isinstance(r, Exception)]
    if bad:
        raise SystemExit(f"benchmark media failed to decode: {bad[0]}")
    return results


def workloads(
    proc: MediaProcessor, media: dict[str, list[Path]], batch: int
) -> dict[str, tuple[int, object]]:
    """name -> (samples per call, zero-argument callable doing the work)."""
    be = proc.backend

    def chunks(items):
        return [(i, items[i : i + batch]) for i in range(0, len(items), batch)]

    imgs, aud = media["image"], media["audio"]
    sizes = [proc.image_size(p) for p in imgs]
    w = {
        "image decode": (len(imgs), lambda: [_ok(be.decode_images(b)) for _, b in chunks(imgs)]),
        "image decode+resize": (
            len(imgs),
            lambda: [_ok(be.decode_images(b, sizes[i : i + batch])) for i, b in chunks(imgs)],
        ),
        "image processor": (len(imgs), lambda: [_ok(proc.images(b)) for _, b in chunks(imgs)]),
        "audio decode": (len(aud), lambda: [_ok(be.decode_audios(b)) for _, b in chunks(aud)]),
        "audio processor": (len(aud), lambda: [_ok(proc.audios(b)) for _, b in chunks(aud)]),
    }
    for kind in ("video_mjpeg", "video_vp9", "video_h264"):
        vids = media[kind]
        plans = [proc.video_plan(p) for p in vids]
        w[f"{kind[6:]} decode"] = (
            len(vids),
            lambda v=vids, pl=plans: _ok(
                be.decode_videos(v, [p.indices for p in pl], None, [p.info for p in pl])
            ),
        )
        w[f"{kind[6:]} processor"] = (len(vids), lambda v=vids: _ok(proc.videos(v)))
    return w


def run_interleaved(
    procs: dict[str, MediaProcessor], media, repeat: int, batch: int
) -> dict[str, dict[str, float]]:
    """Best-of-``repeat`` samples/s per backend and workload. Backends alternate pass by pass so
    load from other processes on a shared box hits them alike; one warm-up pass each first."""
    works = {name: workloads(p, media, batch) for name, p in procs.items()}
    best = {name: {} for name in procs}
    for key in next(iter(works.values())):
        for name in procs:
            works[name][key][1]()  # warm-up: DALI pipeline build, filter tables, thread pools
        for _ in range(repeat):
            for name in procs:
                n, fn = works[name][key]
                t0 = time.perf_counter()
                fn()
                best[name][key] = max(best[name].get(key, 0.0), n / (time.perf_counter() - t0))
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="cpu,dali")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--audio", type=int, default=8)
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "dali" in names and not dali_available():
        print("DALI not importable: benchmarking the CPU backend only")
        names = [n for n in names if n != "dali"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        media = make_media(Path(tmp), args.images, args.audio, args.videos)
        print(
            f"generated {args.images} JPEG (640x480 / 960x720), {args.audio} WAV (10 s, "
            f"44.1 kHz stereo), {args.videos} each MJPEG/VP9/H.264 (6 s, 320x240, 10 fps) in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        procs = {}
        for name in names:
            if name == "cpu":
                be = CPUBackend(num_threads=args.threads)
            else:
                be = DALIBackend(num_threads=args.threads, max_batch_size=args.batch)
            procs[name] = MediaProcessor(be, video=VideoSettings())
            print(f"{name}: {be.describe()}")
        results = run_interleaved(procs, media, args.repeat, args.batch)

    cpu_count = os.cpu_count()
    print(
        f"\nhost: {platform.processor() or platform.machine()}, {cpu_count} CPUs visible, "
        f"threads={args.threads}, batch={args.batch}, best of {args.repeat}"
    )
    header = f"{'workload':<24}" + "".join(f"{n + ' samples/s':>18}" for n in names)
    if {"cpu", "dali"} <= set(names):
        header += f"{'dali/cpu':>10}"
    print(header)
    for key in results[names[0]]:
        line = f"{key:<24}" + "".join(f"{results[n][key]:>18.1f}" for n in names)
        if {"cpu", "dali"} <= set(names):
            line += f"{results['dali'][key] / results['cpu'][key]:>10.2f}"
        print(line)


if __name__ == "__main__":
    main()
