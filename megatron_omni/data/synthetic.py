"""Write a small, learnable, omni-modal raw dataset (JSONL + real media files), no downloads.

Every modality gets a task a tiny model can learn from the pixels / samples alone:

* image (``image.jsonl``): a red/green/blue circle/square/triangle on a plain neutral background,
  56-112 px, PNG or JPEG. Tasks: caption ("a red circle"), "What shape is this?" -> "circle",
  "What colour is the shape?" -> "red". The shape always covers the image centre.
* video (``video.jsonl``): 8-16 frames at 8 fps, 56-84 px, MJPEG in ``.avi`` or VP8 in ``.webm``
  (both decodable by DALI on the CPU), a shape moving left/right/up/down.
  "Which way does the shape move?" -> "left"; caption "a red circle moving left".
* audio (``audio.jsonl``): WAV, 16 kHz (some 22.05 / 44.1 kHz to exercise resampling),
  0.5-2 s, one or two beeps of a low (220 Hz) / mid (440 Hz) / high (880 Hz) tone.
  "Describe the sound." -> "two high beeps"; also beep count and pitch questions. Some answers are
  speech: the assistant message then carries ``speech_tokens`` (see below).
* interleaved (``interleaved.jsonl``): two images in one sample, "Which image is red?" ->
  "the first image"; "Do both images show the same shape?" -> "yes"/"no".
* text (``text.jsonl``): pure text ``{"text": ...}`` lines (arithmetic "12 + 7 = 19", word
  reversal), plus chat lines for image generation ("Draw a red circle." ->
  "<gen_image>a red circle</gen_image>") and text-to-speech ("Say: red circle" -> speech codes).

Line format (paths relative to the dataset root)::

    {"messages": [{"role": "user", "content": "<image>\\nWhat shape is this?"},
                  {"role": "assistant", "content": "circle"}],
     "images": ["images/000001.png"], "task": "image_qa",
     "meta": {"shape": "circle", "color": "red"}}

``videos`` / ``audios`` likewise; pure text is ``{"text": "..."}``. ``meta`` holds the ground
truth the media was drawn from (for evaluation and tests; loaders may ignore it). Speech answers:
the assistant message has ``"speech_tokens": [...]``, codes in ``[0, 64)`` from
:func:`text_to_speech_tokens` (one code per character), ``content`` is their transcript.

Every modality also gets a held-out validation file ``<modality>_val.jsonl``.
``manifest.json`` lists files, line counts, the seed and, with ``--broken``, every deliberately
broken line (``file``, 0-based ``line_index``, expected skip ``reason``, ``media``): a truncated
JPEG (corrupt_image), a zero-byte WAV (unreadable_audio), a text file named .mp4
(unreadable_video), a missing file (missing_file), more placeholders than media
(placeholder_mismatch), a PNG whose IHDR claims 20000x20000 (image_too_large), a line of invalid
UTF-8 (bad_utf8) and an empty conversation (empty_conversation). Broken lines only go into the
training files, at seeded positions; validation files are always clean.

The output is byte-identical for a given seed and arguments.

Usage: ``omni-synthetic-data OUT_DIR [--num-per-modality 64] [--seed 0] [--broken]`` (or
``python tools/make_synthetic_dataset.py``, megatron_omni/cli/make_synthetic_dataset.py); from
Python: ``make_synthetic_dataset(out_dir, num_per_modality=64, seed=0, broken=False)``.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

MODALITIES = ("text", "image", "video", "audio", "interleaved")
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (200, 200, 200), (128, 128, 128))
DIRECTIONS = ("left", "right", "up", "down")
PITCHES = {"low": 220.0, "mid": 440.0, "high": 880.0}
NUMBER_WORDS = {1: "one", 2: "two"}
SAMPLE_RATES = (16000, 16000, 16000, 22050, 44100)
VIDEO_FPS = 8
WORDS = ("cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "car", "book", "cup", "hat")

SPEECH_CODEBOOK_SIZE = 64
SPEECH_ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,?!'-+="
SPEECH_UNKNOWN = SPEECH_CODEBOOK_SIZE - 1

SKIP_REASONS = (
    "corrupt_image",
    "unreadable_audio",
    "unreadable_video",
    "missing_file",
    "placeholder_mismatch",
    "image_too_large",
    "bad_utf8",
    "empty_conversation",
)
_MANAGED = ("images", "videos", "audios", "broken", "manifest.json") + tuple(
    f"{m}{s}.jsonl" for m in MODALITIES + ("preference",) for s in ("", "_val")
)


def text_to_speech_tokens(text: str) -> list[int]:
    """Deterministic stand-in for a speech tokenizer: one code in [0, 64) per character
    (its index in ``SPEECH_ALPHABET``, case-folded; anything else -> 63)."""
    out = []
    for ch in text.lower():
        i = SPEECH_ALPHABET.find(ch)
        out.append(i if i >= 0 else SPEECH_UNKNOWN)
    return out


def _conv(user: str, answer: str, speech: bool = False) -> list[dict[str, Any]]:
    asst: dict[str, Any] = {"role": "assistant", "content": answer}
    if speech:
        asst["speech_tokens"] = text_to_speech_tokens(answer)
    return [{"role": "user", "content": user}, asst]


# ----------------------------------------------------------------------------- media


class _Writer:
    """Names media files with one running counter per folder and writes them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count: dict[str, int] = {}

    def name(self, folder: str, ext: str) -> str:
        self.count[folder] = self.count.get(folder, 0) + 1
        (self.root / folder).mkdir(parents=True, exist_ok=True)
        return f"{folder}/{self.count[folder]:06d}.{ext}"


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 20) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:  # isosceles triangle, apex up; contains the centre of its bounding box
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _shape_image(rng: random.Random, shape: str, color: str):
    from PIL import Image, ImageDraw

    w, h = rng.randint(56, 112), rng.randint(56, 112)
    m = min(w, h)
    img = Image.new("RGB", (w, h), rng.choice(BACKGROUNDS))
    r = m * rng.uniform(0.30, 0.42)
    cx = w / 2 + rng.uniform(-0.06, 0.06) * m
    cy = h / 2 + rng.uniform(-0.06, 0.06) * m
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, _jitter(rng, COLORS[color]))
    return img


def _save_image(wr: _Writer, rng: random.Random, img) -> str:
    if rng.random() < 1 / 3:
        rel = wr.name("images", "jpg")
        img.save(wr.root / rel, format="JPEG", quality=92)
    else:
        rel = wr.name("images", "png")
        img.save(wr.root / rel, format="PNG")
    return rel


def _write_video(path: Path, frames: list[np.ndarray], avi: bool) -> None:
    import av
    from av.codec.context import Flags

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as c:
        s = c.add_stream("mjpeg" if avi else "libvpx", rate=VIDEO_FPS)
        s.width, s.height = w, h
        s.pix_fmt = "yuvj420p" if avi else "yuv420p"
        s.bit_rate = 2_000_000 if avi else 800_000
        s.thread_count = 1
        s.codec_context.flags |= Flags.bitexact
        for a in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def _moving_shape_video(rng: random.Random, shape: str, color: str, direction: str):
    from PIL import Image, ImageDraw

    w, h = rng.choice((56, 64, 72, 84)), rng.choice((56, 64, 72, 84))
    n = rng.choice((8, 12, 16))
    bg = rng.choice(BACKGROUNDS)
    fill = _jitter(rng, COLORS[color])
    m = min(w, h)
    r = m * rng.uniform(0.12, 0.17)
    lo, hi = 0.22, 0.78
    fixed_x = w * rng.uniform(0.4, 0.6)
    fixed_y = h * rng.uniform(0.4, 0.6)
    frames = []
    for k in range(n):
        t = lo + (hi - lo) * k / (n - 1)
        cx, cy = {
            "right": (w * t, fixed_y),
            "left": (w * (1 - t), fixed_y),
            "down": (fixed_x, h * t),
            "up": (fixed_x, h * (1 - t)),
        }[direction]
        img = Image.new("RGB", (w, h), bg)
        _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, fill)
        frames.append(np.asarray(img, dtype=np.uint8))
    return frames


def _beeps(rng: random.Random, pitch: str, count: int) -> tuple[np.ndarray, int]:
    sr = rng.choice(SAMPLE_RATES)
    dur = rng.uniform(0.5, 2.0)
    n = int(sr * dur)
    t = np.arange(n) / sr
    tone = 0.5 * np.sin(2 * np.pi * PITCHES[pitch] * t + rng.uniform(0, 2 * np.pi))
    env = np.zeros(n)
    if count == 1:
        spans = [(rng.uniform(0.1, 0.25), rng.uniform(0.55, 0.8))]
    else:
        a = rng.uniform(0.05, 0.12)
        spans = [(a, a + rng.uniform(0.22, 0.3)),
                 (rng.uniform(0.58, 0.62), rng.uniform(0.85, 0.95))]
    fade = max(1, int(0.005 * sr))
    for s0, s1 in spans:
        i0, i1 = int(s0 * n), int(s1 * n)
        seg = np.ones(i1 - i0)
        ramp = np.linspace(0.0, 1.0, fade)
        seg[:fade] = ramp
        seg[-fade:] = ramp[::-1]
        env[i0:i1] = seg
    nrng = np.random.default_rng(rng.getrandbits(32))
    x = tone * env + 0.005 * nrng.standard_normal(n)
    return x.astype(np.float32), sr


# ----------------------------------------------------------------------------- per modality


def _image_lines(wr: _Writer, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        rel = _save_image(wr, rng, _shape_image(rng, shape, color))
        kind = i % 3
        if kind == 0:
            msgs = _conv("<image>\nDescribe the image briefly.", f"a {color} {shape}")
            task = "image_caption"
        elif kind == 1:
            msgs, task = _conv("<image>\nWhat shape is this?", shape), "image_qa"
        else:
            msgs, task = _conv("<image>\nWhat colour is the shape?", color), "image_qa"
        meta = {"shape": shape, "color": color}
        out.append({"messages": msgs, "images": [rel], "task": task, "meta": meta})
    return out


def _video_lines(wr: _Writer, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        direction = rng.choice(DIRECTIONS)
        frames = _moving_shape_video(rng, shape, color, direction)
        avi = i % 2 == 0
        rel = wr.name("videos", "avi" if avi else "webm")
        _write_video(wr.root / rel, frames, avi)
        if i % 3 == 2:
            msgs = _conv("<video>\nDescribe the video.", f"a {color} {shape} moving {direction}")
            task = "video_caption"
        else:
            msgs, task = _conv("<video>\nWhich way does the shape move?", direction), "video_qa"
        meta = {
            "shape": shape,
            "color": color,
            "direction": direction,
            "num_frames": len(frames),
            "fps": VIDEO_FPS,
        }
        out.append({"messages": msgs, "videos": [rel], "task": task, "meta": meta})
    return out


def _audio_lines(wr: _Writer, rng: random.Random, n: int) -> list[dict]:
    import soundfile as sf

    out = []
    for i in range(n):
        pitch, count = rng.choice(list(PITCHES)), rng.choice((1, 2))
        x, sr = _beeps(rng, pitch, count)
        rel = wr.name("audios", "wav")
        sf.write(str(wr.root / rel), x, sr, subtype="PCM_16", format="WAV")
        desc = f"{NUMBER_WORDS[count]} {pitch} beep{'s' if count > 1 else ''}"
        kind = i % 4
        if kind == 0:
            msgs, task = _conv("<audio>\nDescribe the sound.", desc), "audio_caption"
        elif kind == 1:
            msgs, task = (
                _conv("<audio>\nHow many beeps are there?", NUMBER_WORDS[count]),
                "audio_qa",
            )
        elif kind == 2:
            msgs, task = _conv("<audio>\nIs the tone low, mid or high?", pitch), "audio_qa"
        else:
            msgs, task = _conv("<audio>\nDescribe the sound.", desc, speech=True), "audio_qa_speech"
        meta = {
            "pitch": pitch,
            "frequency_hz": PITCHES[pitch],
            "beeps": count,
            "sample_rate": sr,
            "duration_s": round(len(x) / sr, 4),
        }
        out.append({"messages": msgs, "audios": [rel], "task": task, "meta": meta})
    return out


def _interleaved_lines(wr: _Writer, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        if i % 2 == 0:  # which image has colour C: exactly one does
            c1, c2 = rng.sample(list(COLORS), 2)
            s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
            ask, which = (c1, "first") if rng.random() < 0.5 else (c2, "second")
            q, a, task = f"Which image is {ask}?", f"the {which} image", "interleaved_qa"
        else:  # same shape?
            s1 = rng.choice(SHAPES)
            s2 = s1 if rng.random() < 0.5 else rng.choice([s for s in SHAPES if s != s1])
            c1, c2 = rng.choice(list(COLORS)), rng.choice(list(COLORS))
            q, a = "Do both images show the same shape?", "yes" if s1 == s2 else "no"
            task = "interleaved_compare"
        rels = [_save_image(wr, rng, _shape_image(rng, s, c)) for s, c in ((s1, c1), (s2, c2))]
        msgs = _conv(f"Image 1: <image>\nImage 2: <image>\n{q}", a)
        meta = {"shapes": [s1, s2], "colors": [c1, c2]}
        out.append({"messages": msgs, "images": rels, "task": task, "meta": meta})
    return out


def _text_lines(wr: _Writer, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        kind = i % 5
        if kind in (0, 1):
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            if rng.random() < 0.5:
                out.append({"text": f"{a} + {b} = {a + b}", "task": "arithmetic"})
            else:
                a, b = max(a, b), min(a, b)
                out.append({"text": f"{a} - {b} = {a - b}", "task": "arithmetic"})
        elif kind == 2:
            ws = rng.sample(WORDS, rng.randint(3, 5))
            text = f"reverse: {' '.join(ws)} -> {' '.join(reversed(ws))}"
            out.append({"text": text, "task": "word_order"})
        elif kind == 3:
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            cap = f"a {color} {shape}"
            msgs = _conv(f"Draw {cap}.", f"<gen_image>{cap}</gen_image>")
            meta = {"shape": shape, "color": color}
            out.append({"messages": msgs, "task": "image_generation", "meta": meta})
        else:
            phrase = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
            msgs = _conv(f"Say: {phrase}", phrase, speech=True)
            out.append({"messages": msgs, "task": "text_to_speech"})
    return out


PREFERENCE = "preference"
"""Preference-pair file (``preference.jsonl`` / ``preference_val.jsonl``), written on request."""


def _preference_lines(wr: _Writer, rng: random.Random, n: int) -> list[dict]:
    """DPO pairs in every modality, cycling image, video, audio, interleaved, text: the chosen
    answer is the true one (colour or shape, direction, pitch, which image or same shape, a sum).
    The rejected one is an answer of ANOTHER question's kind (a shape for a colour question and a
    colour for a shape question, a pitch word for a direction question, a direction for a pitch
    question, yes/no for "which image" and an image for "same shape?", a word for a sum), kinds
    balanced so that no answer word is simply penalised: a preference the tiny demo model learns
    from a few dozen pairs and carries over to held-out pairs. (A wrong answer of the same kind,
    e.g. the wrong colour, asks the model to read the media better
    than instruction tuning already taught it: more data than the demo trains on.)"""
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            rel = _save_image(wr, rng, _shape_image(rng, shape, color))
            if rng.random() < 0.5:
                q, good, bad = "What colour is the shape?", color, rng.choice(SHAPES)
            else:
                q, good, bad = "What shape is this?", shape, rng.choice(list(COLORS))
            rec = {
                "prompt": f"<image>\n{q}",
                "chosen": good,
                "rejected": bad,
                "images": [rel],
                "task": "image_pref",
                "meta": {"shape": shape, "color": color},
            }
        elif kind == 1:
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            direction = rng.choice(DIRECTIONS)
            frames = _moving_shape_video(rng, shape, color, direction)
            rel = wr.name("videos", "avi")
            _write_video(wr.root / rel, frames, True)
            wrong = rng.choice(list(PITCHES))
            rec = {
                "prompt": "<video>\nWhich way does the shape move?",
                "chosen": direction,
                "rejected": wrong,
                "videos": [rel],
                "task": "video_pref",
                "meta": {"direction": direction},
            }
        elif kind == 2:
            import soundfile as sf

            pitch, count = rng.choice(list(PITCHES)), rng.choice((1, 2))
            x, sr = _beeps(rng, pitch, count)
            rel = wr.name("audios", "wav")
            sf.write(str(wr.root / rel), x, sr, subtype="PCM_16", format="WAV")
            wrong = rng.choice(DIRECTIONS)
            rec = {
                "prompt": "<audio>\nIs the tone low, mid or high?",
                "chosen": pitch,
                "rejected": wrong,
                "audios": [rel],
                "task": "audio_pref",
                "meta": {"pitch": pitch, "beeps": count},
            }
        elif kind == 3:
            c1, c2 = rng.sample(list(COLORS), 2)
            s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
            first = rng.random() < 0.5
            rels = [_save_image(wr, rng, _shape_image(rng, s, c)) for s, c in ((s1, c1), (s2, c2))]
            if rng.random() < 0.5:
                q = f"Which image is {c1 if first else c2}?"
                good = "the first image" if first else "the second image"
                bad = rng.choice(("yes", "no"))
            else:
                q = "Do both images show the same shape?"
                good = "yes" if s1 == s2 else "no"
                bad = rng.choice(("the first image", "the second image"))
            rec = {
                "prompt": f"Image 1: <image>\nImage 2: <image>\n{q}",
                "chosen": good,
                "rejected": bad,
                "images": rels,
                "task": "interleaved_pref",
                "meta": {"colors": [c1, c2], "shapes": [s1, s2]},
            }
        else:
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            rec = {
                "prompt": f"What is {a} + {b}?",
                "chosen": str(a + b),
                "rejected": rng.choice(WORDS),
                "task": "text_pref",
                "meta": {"a": a, "b": b},
            }
        out.append(rec)
    return out


_BUILDERS = {
    "text": _text_lines,
    "image": _image_lines,
    "video": _video_lines,
    "audio": _audio_lines,
    "interleaved": _interleaved_lines,
}

# ----------------------------------------------------------------------------- broken inputs


def _huge_png_bytes(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose IHDR (valid CRC) claims ``width x height``; the pixel data is a token IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _broken_entries(root: Path, rng: random.Random) -> list[tuple[str, str, bytes, str | None]]:
    """Create the broken media; returns ``(file, reason, raw line bytes, media)``."""
    bdir = root / "broken"
    bdir.mkdir(parents=True, exist_ok=True)

    def media_line(file, reason, key, media, user, answer, task):
        rec = {"messages": _conv(user, answer), key: [media], "task": task}
        return file, reason, json.dumps(rec, ensure_ascii=False).encode("utf-8"), media

    buf = io.BytesIO()
    _shape_image(rng, "circle", "red").resize((112, 112)).save(buf, format="JPEG", quality=92)
    (bdir / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (bdir / "empty.wav").write_bytes(b"")
    (bdir / "not_a_video.mp4").write_text(
        "this is a text file, not an mp4 video\n", encoding="utf-8"
    )
    _shape_image(rng, "square", "blue").save(bdir / "mismatch.png", format="PNG")
    (bdir / "huge.png").write_bytes(_huge_png_bytes())

    shape_q, move_q = "<image>\nWhat shape is this?", "<video>\nWhich way does the shape move?"
    two_images = "Image 1: <image>\nImage 2: <image>\nWhich image is blue?"
    return [
        media_line(
            "image.jsonl",
            "corrupt_image",
            "images",
            "broken/truncated.jpg",
            shape_q,
            "circle",
            "image_qa",
        ),
        media_line(
            "audio.jsonl",
            "unreadable_audio",
            "audios",
            "broken/empty.wav",
            "<audio>\nDescribe the sound.",
            "one low beep",
            "audio_caption",
        ),
        media_line(
            "video.jsonl",
            "unreadable_video",
            "videos",
            "broken/not_a_video.mp4",
            move_q,
            "left",
            "video_qa",
        ),
        media_line(
            "video.jsonl",
            "missing_file",
            "videos",
            "videos/missing_999999.webm",
            move_q,
            "up",
            "video_qa",
        ),
        media_line(
            "interleaved.jsonl",
            "placeholder_mismatch",
            "images",
            "broken/mismatch.png",
            two_images,
            "the first image",
            "interleaved_qa",
        ),
        media_line(
            "image.jsonl",
            "image_too_large",
            "images",
            "broken/huge.png",
            shape_q,
            "square",
            "image_qa",
        ),
        (
            "text.jsonl",
            "bad_utf8",
            b'{"text": "3 + 4 = 7 \xff\xfe\xc3(", "task": "arithmetic"}',
            None,
        ),
        (
            "text.jsonl",
            "empty_conversation",
            json.dumps({"messages": [], "task": "text_to_speech"}).encode("utf-8"),
            None,
        ),
    ]


# ----------------------------------------------------------------------------- entry points


def make_synthetic_dataset(
    out_dir: str | Path,
    num_per_modality: int = 64,
    seed: int = 0,
    broken: bool = False,
    num_val_per_modality: int | None = None,
    overwrite: bool = True,
    preference: bool = False,
) -> dict[str, Any]:
    """Write the dataset under ``out_dir``; returns the manifest (also saved as manifest.json).

    ``num_per_modality`` training lines per modality file (before broken lines are inserted);
    ``num_val_per_modality`` defaults to ``max(4, num_per_modality // 4)``. With
    ``overwrite`` (default) the files this tool owns are replaced; other files are left alone.
    ``preference``: also write DPO pairs (``preference.jsonl`` / ``preference_val.jsonl``, the
    same line counts, see :func:`_preference_lines`) for the alignment stage.
    """
    if num_per_modality < 1:
        raise ValueError(f"num_per_modality must be >= 1, got {num_per_modality}")
    n_val = max(4, num_per_modality // 4) if num_val_per_modality is None else num_val_per_modality
    if n_val < 0:
        raise ValueError(f"num_val_per_modality must be >= 0, got {n_val}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    existing = [root / p for p in _MANAGED if (root / p).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{root} already holds a dataset ({existing[0].name}); pass overwrite=True"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    wr = _Writer(root)
    lines: dict[str, list[bytes]] = {}
    for split, count in (("train", num_per_modality), ("val", n_val)):
        for mod in MODALITIES:
            rng = random.Random(f"{seed}/{mod}/{split}")
            recs = _BUILDERS[mod](wr, rng, count)
            key = f"{mod}.jsonl" if split == "train" else f"{mod}_val.jsonl"
            lines[key] = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in recs]
        if preference:
            rng = random.Random(f"{seed}/{PREFERENCE}/{split}")
            recs = _preference_lines(wr, rng, count)
            key = f"{PREFERENCE}.jsonl" if split == "train" else f"{PREFERENCE}_val.jsonl"
            lines[key] = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in recs]

    broken_list: list[dict[str, Any]] = []
    if broken:
        rng = random.Random(f"{seed}/broken")
        for file, reason, raw, media in _broken_entries(root, rng):
            target = lines[file]
            target.insert(rng.randint(0, len(target)), raw)
            broken_list.append({"file": file, "reason": reason, "raw": raw, "media": media})
        # Line indices are known only once every insertion is done.
        for b in broken_list:
            b["line_index"] = next(i for i, ln in enumerate(lines[b["file"]]) if ln is b["raw"])
            del b["raw"]
        broken_list.sort(key=lambda b: (b["file"], b["line_index"]))

    files: dict[str, dict[str, Any]] = {}
    for key, ls in lines.items():
        (root / key).write_bytes(b"".join(ln + b"\n" for ln in ls))
    for mod in MODALITIES + ((PREFERENCE,) if preference else ()):
        files[mod] = {
            "train": f"{mod}.jsonl",
            "val": f"{mod}_val.jsonl",
            "train_lines": len(lines[f"{mod}.jsonl"]),
            "val_lines": len(lines[f"{mod}_val.jsonl"]),
        }
    manifest = {
        "format_version": 1,
        "seed": seed,
        "num_per_modality": num_per_modality,
        "num_val_per_modality": n_val,
        "files": files,
        "media_counts": dict(sorted(wr.count.items())),
        "speech_codebook_size": SPEECH_CODEBOOK_SIZE,
        "speech_alphabet": SPEECH_ALPHABET,
        "skip_reasons": list(SKIP_REASONS),
        "broken": broken_list,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def corpus_texts(out_dir: str | Path) -> list[str]:
    """Every text of a written dataset (pure-text lines and message contents, broken lines
    skipped): what a tokenizer for it is trained on."""
    out = []
    for f in sorted(Path(out_dir).glob("*.jsonl")):
        for line in f.read_bytes().splitlines():
            try:
                o = json.loads(line)
            except ValueError:
                continue
            out.append(o.get("text") or "")
            out += [
                m.get("content", "")
                for m in o.get("messages") or []
                if isinstance(m, dict) and isinstance(m.get("content"), str)
            ]
            out += [o[k] for k in ("prompt", "chosen", "rejected") if isinstance(o.get(k), str)]
    return out
