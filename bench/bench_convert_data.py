"""Memory and speed of ``omni-convert-data --format llava`` on a LLaVA-style JSON array.

    python bench/bench_convert_data.py                  # 20,000 vs 200,000 records
    python bench/bench_convert_data.py --small 2000 --large 20000

Writes two LLaVA-Instruct-like JSON arrays (one record = an id, an image path, two or four turns
with ``<image>``; the images are 16 small PNG/JPEG files reused, every 50th record points at a
missing file so the skip path runs too), then converts each in a fresh process and reports the
RSS after every tenth of the large run's records and the peak RSS growth of the conversion (the
kernel's high-water mark at the end minus the RSS just before it started, after imports) and
records/s. Constant memory means the large/small growth
ratio stays near 1 while the input grows 10x. For contrast the same process reports what
``json.load`` of the large file costs (the way a naive converter would read it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, sys, time
def status(key):
    for ln in open("/proc/self/status"):
        if ln.startswith(key):
            return int(ln.split()[1]) * 1024
mode, src, out, media = sys.argv[1:5]
from megatron_omni.data.converters.cli import convert
from megatron_omni.data.converters.common import Options
import tqdm, PIL.Image  # imported by the run anyway; keep them out of the growth
before = status("VmRSS:")
t0 = time.perf_counter()
trace = []
if mode == "convert":
    from pathlib import Path
    from megatron_omni.data.converters import cli
    total = int(sys.argv[5])
    inner = cli.CONVERTERS["llava"]
    def traced(opts, out_dir, progress):  # RSS after every tenth of the records
        for i, item in enumerate(inner(opts, out_dir, progress)):
            if i % max(1, total // 10) == 0:
                trace.append(status("VmRSS:"))
            yield item
    cli.CONVERTERS["llava"] = traced
    rep = convert(Options(format="llava", input=Path(src), out=Path(out), media_root=Path(media),
                          progress=False))
    n, written = rep.records, rep.written
else:
    data = json.load(open(src, encoding="utf-8"))
    n = written = len(data)
dt = time.perf_counter() - t0
print(json.dumps({{"before": before, "peak": status("VmHWM:"), "seconds": dt, "records": n,
                   "written": written, "trace": trace}}))
"""


def write_llava_array(path: Path, n: int) -> None:
    questions = ["What is shown in the image?", "Describe the colours.", "Is there text?",
                 "How many objects are there?"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n):
            img = f"coco/train2017/{i % 16:012d}.{'jpg' if i % 2 else 'png'}"
            if i % 50 == 49:
                img = f"coco/train2017/missing_{i}.jpg"
            conv = [{"from": "human", "value": f"<image>\n{questions[i % 4]}"},
                    {"from": "gpt", "value": f"Answer number {i}: a plain coloured square, "
                                             "nothing else in view."}]
            if i % 3 == 0:
                conv += [{"from": "human", "value": "Are you sure?"},
                         {"from": "gpt", "value": "Yes, quite sure."}]
            rec = {"id": f"{i:012d}", "image": img, "conversations": conv}
            f.write(("  " if i == 0 else ",\n  ") + json.dumps(rec))
        f.write("\n]\n")


def make_images(root: Path) -> None:
    from PIL import Image

    d = root / "coco" / "train2017"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(16):
        im = Image.new("RGB", (64 + 8 * i, 48 + 4 * i), (16 * i, 255 - 16 * i, 90))
        ext = "jpg" if i % 2 else "png"
        b = io.BytesIO()
        im.save(b, format="JPEG" if ext == "jpg" else "PNG")
        (d / f"{i:012d}.{ext}").write_bytes(b.getvalue())


def run_child(mode: str, src: Path, out: Path, media: Path, n: int = 0) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _CHILD.format(), mode, str(src),
                          str(out), str(media), str(n)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=20_000)
    p.add_argument("--large", type=int, default=200_000)
    a = p.parse_args(argv)
    mib = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        media = tmp / "images"
        make_images(media)
        rows = {}
        for n in (a.small, a.large):
            src = tmp / f"llava_{n}.json"
            write_llava_array(src, n)
            r = run_child("convert", src, tmp / f"out_{n}", media, n)
            r["size"] = src.stat().st_size
            rows[n] = r
        naive = run_child("json.load", tmp / f"llava_{a.large}.json", tmp / "unused", media)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    print(f"{'records':>9} {'file MiB':>9} {'written':>8} {'seconds':>8} {'records/s':>10} "
          f"{'peak RSS growth MiB':>20}")
    for n, r in rows.items():
        growth = (r["peak"] - r["before"]) / mib
        print(f"{n:>9} {r['size'] / mib:>9.1f} {r['written']:>8} {r['seconds']:>8.1f} "
              f"{r['records'] / r['seconds']:>10.0f} {growth:>20.1f}")
    g_small = (rows[a.small]["peak"] - rows[a.small]["before"]) / mib
    g_large = (rows[a.large]["peak"] - rows[a.large]["before"]) / mib
    g_naive = (naive["peak"] - naive["before"]) / mib
    print(f"peak RSS growth ratio {a.large}/{a.small} records: {g_large / max(g_small, 1e-9):.2f} "
          f"(input {a.large / a.small:.0f}x larger)")
    tr = rows[a.large]["trace"]
    print(f"RSS growth during the {a.large}-record run, after each tenth of the records (MiB): "
          + " ".join(f"{(x - rows[a.large]['before']) / mib:.1f}" for x in tr))
    print(f"for contrast, json.load of the {a.large}-record file: peak RSS growth "
          f"{g_naive:.1f} MiB ({g_naive / max(g_large, 1e-9):.0f}x the streaming converter)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
