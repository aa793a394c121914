"""Tests of megatron_omni/data/synthetic.py (omni-synthetic-data): the files open, the JSONL is
well formed, the labels agree with the media (so the tasks are learnable), the broken manifest is
true, and the output is byte-identical for a seed."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from megatron_omni.cli import make_synthetic_dataset as msd_cli
from megatron_omni.data import synthetic as msd

N = 9  # per modality; val gets max(4, N // 4) = 4
MODS = ("text", "image", "video", "audio", "interleaved")
PLACEHOLDER = {"images": "<image>", "videos": "<video>", "audios": "<audio>"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    manifest = msd.make_synthetic_dataset(root, num_per_modality=N, seed=3, broken=True)
    return root, manifest


def good_records(root: Path, manifest: dict):
    """(file, line_index, record) of every non-broken line of every train and val file."""
    broken = {(b["file"], b["line_index"]) for b in manifest["broken"]}
    for mod in MODS:
        for split in ("train", "val"):
            name = manifest["files"][mod][split]
            for i, raw in enumerate((root / name).read_bytes().splitlines()):
                if (name, i) in broken:
                    continue
                yield name, i, json.loads(raw.decode("utf-8"))


def media_records(ds, key):
    root, manifest = ds
    return [(r, [root / p for p in r[key]]) for _, _, r in good_records(root, manifest) if key in r]


# ----------------------------------------------------------------------------- structure


def test_files_counts_and_manifest(ds):
    root, manifest = ds
    assert json.loads((root / "manifest.json").read_text()) == manifest
    per_file = {}
    for b in manifest["broken"]:
        per_file[b["file"]] = per_file.get(b["file"], 0) + 1
    for mod in MODS:
        f = manifest["files"][mod]
        assert (f["train"], f["val"]) == (f"{mod}.jsonl", f"{mod}_val.jsonl")
        train = (root / f["train"]).read_bytes().splitlines()
        val = (root / f["val"]).read_bytes().splitlines()
        assert len(train) == f["train_lines"] == N + per_file.get(f["train"], 0)
        assert len(val) == f["val_lines"] == 4
    assert manifest["media_counts"] == {"audios": 13, "images": 13 + 2 * 13, "videos": 13}


def test_lines_parse_and_placeholders_match_media(ds):
    root, manifest = ds
    tasks = set()
    for name, i, rec in good_records(root, manifest):
        tasks.add(rec["task"])
        if "text" in rec:
            assert isinstance(rec["text"], str) and rec["text"] and "messages" not in rec
            continue
        msgs = rec["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"], (name, i)
        assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
        user = msgs[0]["content"]
        for key, ph in PLACEHOLDER.items():
            assert user.count(ph) == len(rec.get(key, [])), (name, i, key)
            for p in rec.get(key, []):
                assert (
                    not Path(p).is_absolute()
                    and (root / p).is_file()
                    and (root / p).stat().st_size > 0
                )
        assert "<image>" not in msgs[1]["content"]
    assert tasks == {
        "arithmetic",
        "word_order",
        "image_generation",
        "text_to_speech",
        "image_caption",
        "image_qa",
        "video_qa",
        "video_caption",
        "audio_caption",
        "audio_qa",
        "audio_qa_speech",
        "interleaved_qa",
        "interleaved_compare",
    }


def test_val_split_is_separate(ds):
    root, manifest = ds
    for mod in ("image", "video", "audio", "interleaved"):
        def media(f):
            lines = (root / f).read_text("utf-8", "replace").splitlines()
            return {p for ln in lines for k in PLACEHOLDER if k in (r := json.loads(ln))
                    for p in r[k]}
        assert not media(f"{mod}.jsonl") & media(f"{mod}_val.jsonl")


# ----------------------------------------------------------------------------- labels vs media


def _classify_image(img: Image.Image) -> tuple[str, str]:
    a = np.asarray(img.convert("RGB"), dtype=np.int32)
    h, w, _ = a.shape
    centre = a[h // 2, w // 2]
    color = ("red", "green", "blue")[int(np.argmax(centre))]
    bg = a[0, 0]
    mask = np.abs(a - bg).sum(-1) > 90
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box  # square 1.0, circle pi/4, triangle 1/2
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return shape, color


def test_image_labels_match_pixels(ds):
    recs = media_records(ds, "images")
    formats = set()
    for rec, paths in recs:
        with Image.open(paths[0]) as probe:
            formats.add(probe.format)
            assert 56 <= probe.width <= 112 and 56 <= probe.height <= 112
        got = [_classify_image(Image.open(p)) for p in paths]
        meta = rec["meta"]
        ans = rec["messages"][1]["content"]
        if rec["task"] in ("image_caption", "image_qa"):
            assert got == [(meta["shape"], meta["color"])]
            assert ans in (f"a {meta['color']} {meta['shape']}", meta["shape"], meta["color"])
            q = rec["messages"][0]["content"]
            if "What shape" in q:
                assert ans == meta["shape"]
            if "What colour" in q:
                assert ans == meta["color"]
        else:  # interleaved
            assert got == list(zip(meta["shapes"], meta["colors"]))
            q = rec["messages"][0]["content"]
            if rec["task"] == "interleaved_qa":
                asked = re.search(r"Which image is (\w+)\?", q).group(1)
                assert meta["colors"].count(asked) == 1
                assert ans == f"the {('first', 'second')[meta['colors'].index(asked)]} image"
            else:
                assert ans == ("yes" if meta["shapes"][0] == meta["shapes"][1] else "no")
    assert formats == {"PNG", "JPEG"}


def test_video_shape_moves_in_labelled_direction(ds):
    recs = media_records(ds, "videos")
    containers = set()
    for rec, (path,) in recs:
        with av.open(str(path)) as c:
            containers.add(c.streams.video[0].codec_context.name)
            assert float(c.streams.video[0].average_rate) == pytest.approx(8)
            frames = [f.to_ndarray(format="rgb24").astype(np.int32) for f in c.decode(video=0)]
        meta = rec["meta"]
        assert len(frames) == meta["num_frames"] and 8 <= len(frames) <= 16
        h, w, _ = frames[0].shape
        assert 56 <= h <= 84 and 56 <= w <= 84
        cents = []
        for f in frames:
            mask = np.abs(f - f[0, 0]).sum(-1) > 90
            ys, xs = np.nonzero(mask)
            cents.append((xs.mean(), ys.mean()))
            col = f[mask].mean(0)
            assert ("red", "green", "blue")[int(np.argmax(col))] == meta["color"]
        dx = cents[-1][0] - cents[0][0]
        dy = cents[-1][1] - cents[0][1]
        want = {
            "right": dx > 0.3 * w,
            "left": dx < -0.3 * w,
            "down": dy > 0.3 * h,
            "up": dy < -0.3 * h,
        }
        assert want[meta["direction"]], (path, meta["direction"], dx, dy)
        assert abs(dy if meta["direction"] in ("left", "right") else dx) < 3
        ans = rec["messages"][1]["content"]
        assert ans in (
            meta["direction"],
            f"a {meta['color']} {meta['shape']} moving {meta['direction']}",
        )
    assert containers == {"mjpeg", "vp8"}
    assert {p.suffix for _, (p,) in recs} == {".avi", ".webm"}


def _count_beeps(x: np.ndarray, sr: int) -> int:
    hop = int(0.01 * sr)
    env = np.array([np.abs(x[i : i + hop]).max() for i in range(0, len(x) - hop, hop)])
    on = env > 0.25
    return int(np.sum(on[1:] & ~on[:-1]) + on[0])


def test_audio_dominant_frequency_and_beep_count_match_label(ds):
    rates = set()
    for rec, (path,) in media_records(ds, "audios"):
        x, sr = sf.read(str(path), dtype="float32")
        rates.add(sr)
        meta = rec["meta"]
        assert x.ndim == 1 and sr == meta["sample_rate"]
        assert 0.5 <= len(x) / sr <= 2.0
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        f0 = np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)]
        assert abs(f0 - {"low": 220, "mid": 440, "high": 880}[meta["pitch"]]) < 6, (path, f0, meta)
        assert _count_beeps(x, sr) == meta["beeps"]
        n_word = {1: "one", 2: "two"}[meta["beeps"]]
        desc = f"{n_word} {meta['pitch']} beep" + ("s" if meta["beeps"] == 2 else "")
        assert rec["messages"][1]["content"] in (desc, n_word, meta["pitch"])
    assert 16000 in rates and rates & {22050, 44100}


def test_speech_tokens_text_and_generation_lines(ds):
    root, manifest = ds
    n_speech = 0
    for _, _, rec in good_records(root, manifest):
        if rec["task"] == "arithmetic":
            lhs, rhs = rec["text"].split(" = ")
            assert eval(lhs) == int(rhs)  # noqa: S307 - "a + b" / "a - b" from our own generator
        elif rec["task"] == "word_order":
            words, rev = rec["text"][len("reverse: ") :].split(" -> ")
            assert rev.split() == words.split()[::-1]
        elif rec["task"] == "image_generation":
            cap = f"a {rec['meta']['color']} {rec['meta']['shape']}"
            assert rec["messages"][0]["content"] == f"Draw {cap}."
            assert rec["messages"][1]["content"] == f"<gen_image>{cap}</gen_image>"
        for m in rec.get("messages", []):
            if "speech_tokens" in m:
                n_speech += 1
                assert m["role"] == "assistant"
                codes = m["speech_tokens"]
                assert codes == msd.text_to_speech_tokens(m["content"]) and len(codes) == len(
                    m["content"]
                )
                assert all(0 <= c < manifest["speech_codebook_size"] == 64 for c in codes)
    assert n_speech >= 4
    assert msd.text_to_speech_tokens("ab ?") == [1, 2, 0, msd.SPEECH_ALPHABET.index("?")]
    assert msd.text_to_speech_tokens("é") == [63]


# ----------------------------------------------------------------------------- broken inputs


def test_broken_manifest_lists_every_kind_and_each_is_really_broken(ds):
    root, manifest = ds
    broken = manifest["broken"]
    assert sorted(b["reason"] for b in broken) == sorted(msd.SKIP_REASONS)
    assert all(not b["file"].endswith("_val.jsonl") for b in broken)
    for b in broken:
        raw = (root / b["file"]).read_bytes().splitlines()[b["line_index"]]
        reason = b["reason"]
        if reason == "bad_utf8":
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")
            continue
        rec = json.loads(raw.decode("utf-8"))
        paths = [p for k in PLACEHOLDER for p in rec.get(k, [])]
        if b["media"] is not None:
            assert paths == [b["media"]]
        if reason == "empty_conversation":
            assert rec["messages"] == []
        elif reason == "missing_file":
            assert not (root / paths[0]).exists()
        elif reason == "placeholder_mismatch":
            assert rec["messages"][0]["content"].count("<image>") != len(rec["images"])
            Image.open(root / paths[0]).load()  # the media itself is fine
        elif reason == "corrupt_image":
            with pytest.raises(OSError):
                with Image.open(root / paths[0]) as im:
                    im.load()
        elif reason == "unreadable_audio":
            assert (root / paths[0]).stat().st_size == 0
            with pytest.raises(Exception):
                sf.read(str(root / paths[0]))
        elif reason == "unreadable_video":
            assert paths[0].endswith(".mp4")
            with pytest.raises(av.FFmpegError):
                with av.open(str(root / paths[0])) as c:
                    next(c.decode(video=0))
        elif reason == "image_too_large":
            data = (root / paths[0]).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
            (length,) = struct.unpack(">I", data[8:12])
            body = data[12 : 16 + length]
            assert struct.unpack(">II", body[4:12]) == (20000, 20000)
            assert struct.unpack(">I", data[16 + length : 20 + length])[0] == zlib.crc32(body)
            try:  # Pillow either refuses it as a decompression bomb or reports the claimed size
                with Image.open(root / paths[0]) as im:
                    assert im.size == (20000, 20000)
            except Image.DecompressionBombError:
                pass
        else:  # pragma: no cover
            pytest.fail(f"unknown reason {reason}")


def test_clean_dataset_has_no_broken_lines(tmp_path):
    m = msd.make_synthetic_dataset(tmp_path, num_per_modality=2, seed=0, num_val_per_modality=1)
    assert m["broken"] == [] and not (tmp_path / "broken").exists()
    for mod in MODS:
        for raw in (tmp_path / f"{mod}.jsonl").read_bytes().splitlines():
            json.loads(raw.decode("utf-8"))


# ----------------------------------------------------------------------------- determinism + CLI


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_for_a_seed(ds, tmp_path):
    root, _ = ds
    again = msd.make_synthetic_dataset(tmp_path / "a", num_per_modality=N, seed=3, broken=True)
    assert _digest(tmp_path / "a") == _digest(root)
    assert again == json.loads((root / "manifest.json").read_text())
    msd.make_synthetic_dataset(tmp_path / "b", num_per_modality=N, seed=4, broken=True)
    other = _digest(tmp_path / "b")
    assert other["image.jsonl"] != _digest(root)["image.jsonl"]


def test_cli_help_and_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        msd_cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--num-per-modality" in out and "--broken" in out and "--seed" in out
    assert msd_cli.main([str(tmp_path), "--num-per-modality", "1",
                         "--num-val-per-modality", "1"]) == 0
    assert (
        json.loads((tmp_path / "manifest.json").read_text())["files"]["video"]["train_lines"] == 1
    )
    with pytest.raises(FileExistsError):
        msd_cli.main([str(tmp_path), "--num-per-modality", "1", "--no-overwrite"])
