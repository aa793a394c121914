"""omni-convert-data (megatron_omni/data/converters): each public layout -> our JSONL, line for
line, then through preprocessing with every good sample written and every bad record skipped
with its reason."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from megatron_omni.data.converters import common
from megatron_omni.data.converters.cli import main
from megatron_omni.data.converters.common import ConvertError, iter_json_records
from megatron_omni.data.preprocess import preprocess
from megatron_omni.data.templates import template_sample
from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ helpers


def png_bytes(color=(200, 30, 30), size=(40, 32)) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, format="PNG")
    return b.getvalue()


def jpeg_bytes(color=(30, 200, 30), size=(48, 40)) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, format="JPEG", quality=90)
    return b.getvalue()


def wav_bytes(seconds=0.25, sr=16000, hz=440.0) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    b = io.BytesIO()
    sf.write(b, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), sr, format="WAV",
             subtype="PCM_16")
    return b.getvalue()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def convert(*args) -> int:
    return main([str(a) for a in args] + ["--quiet"])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]


def skipped(out: Path, modality: str) -> dict[str, str]:
    return {s["source_id"]: s["reason"]
            for s in read_jsonl(out / f"convert_{modality}_skipped.jsonl")}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    texts = ["Transcribe the audio. Describe the image briefly. What is red? a cat on a mat",
             "hello world, the quick brown fox 12 + 7 = 19"] * 4
    return train_tiny_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def preprocess_all(out: Path, modality: str, media_root: Path, tok_path: Path, n_lines: int):
    """Run preprocessing on the converted file: every converted line must be written."""
    report = preprocess({modality: {"train": out / f"{modality}.jsonl"}}, out.parent / "prepared",
                        tok_path, media_root=media_root, workers=1, progress=False)
    st = report.stats[modality]["train"]
    assert dict(st.skipped) == {}, st.skipped
    assert st.lines == st.written == n_lines
    return report


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


# ------------------------------------------------------------------------------------ LLaVA


def test_llava_json_array(tmp_path, tok_path):
    imgs = tmp_path / "images"
    put(imgs / "coco/1.jpg", jpeg_bytes())
    put(imgs / "coco/2.png", png_bytes())
    put(imgs / "ocr/3.png", png_bytes((0, 0, 200)))
    records = [
        {"id": "a1", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "Green."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        # image given as a list; two <image> tags
        {"id": "a2", "image": ["coco/1.jpg", "coco/2.png"], "conversations": [
            {"from": "human", "value": "First <image> then <image>: same?"},
            {"from": "gpt", "value": "No."}]},
        # <image> missing from the text: kept as is, templating puts it first
        {"id": "a3", "image": "ocr/3.png", "conversations": [
            {"from": "human", "value": "Read the text."}, {"from": "gpt", "value": "STOP"}]},
        # text-only record of a LLaVA mix, and no id
        {"conversations": [{"from": "human", "value": "Say hi."},
                           {"from": "gpt", "value": "hi"}]},
        # bad ones
        {"id": "b1", "image": ["coco/1.jpg", "coco/2.png"], "conversations": [
            {"from": "human", "value": "<image> only one tag"}, {"from": "gpt", "value": "x"}]},
        {"id": "b2", "image": "coco/missing.jpg", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "b3", "image": "coco/1.jpg", "conversations": [
            {"from": "narrator", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "b4", "image": "../../etc/passwd", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "b5", "image": "coco/1.jpg", "conversations": []},
        {"id": "b6", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "<|eot_id|>"}]},
    ]
    src = tmp_path / "llava_instruct.json"
    src.write_text(json.dumps(records, indent=2), encoding="utf-8")  # a pretty-printed array
    out = tmp_path / "raw"
    assert convert("--format", "llava", "--input", src, "--out", out, "--media-root", imgs) == 0
    expected = [
        {"messages": [user("<image>\nWhat colour is it?"), assistant("Green."), user("Sure?"),
                      assistant("Yes.")], "images": ["coco/1.jpg"], "source_id": "a1"},
        {"messages": [user("First <image> then <image>: same?"), assistant("No.")],
         "images": ["coco/1.jpg", "coco/2.png"], "source_id": "a2"},
        {"messages": [user("Read the text."), assistant("STOP")], "images": ["ocr/3.png"],
         "source_id": "a3"},
        {"messages": [user("Say hi."), assistant("hi")], "source_id": "llava_instruct.json:3"},
    ]
    assert read_jsonl(out / "image.jsonl") == expected
    assert skipped(out, "image") == {"b1": "placeholder_mismatch", "b2": "missing_file",
                                     "b3": "bad_role", "b4": "bad_media_path",
                                     "b5": "bad_record", "b6": "special_token_in_text"}
    report = json.loads((out / "convert_image_report.json").read_text())
    assert (report["records"], report["written"], report["num_skipped"]) == (10, 4, 6)
    assert report["media_root"] == str(imgs.resolve())
    preprocess_all(out, "image", imgs, tok_path, 4)
    # The convention for a missing <image>: at the start of the first user turn.
    tok = load_tokenizer(tok_path)
    t = template_sample(expected[2], tok, image_tokens=[2])
    text = tok.decode(t.input_ids)
    assert "user<|end_header_id|>\n\n<image><imagePatch><imagePatch></image>\nRead the text." \
        in text


def test_llava_video_jsonl_and_bad_lines(tmp_path, tok_path):
    from megatron_omni.data.synthetic import _write_video

    vids = tmp_path / "videos"
    vids.mkdir()
    frames = [np.full((32, 48, 3), 40 * k, np.uint8) for k in range(6)]
    _write_video(vids / "clip.webm", frames, avi=False)
    src = write_jsonl(tmp_path / "video.jsonl", [
        # LLaVA-Video style: a video sample whose text says <image>
        {"id": "v1", "video": "clip.webm", "conversations": [
            {"from": "human", "value": "<image>\nWhat happens?"},
            {"from": "gpt", "value": "It fades in."}]},
        {"id": "v2", "video": ["clip.webm"], "conversations": [
            {"from": "human", "value": "<video> Again?"}, {"from": "gpt", "value": "Yes."}]},
        "{broken json",
        {"id": "v3", "video": "https://example.com/v.mp4", "conversations": [
            {"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}]},
    ])
    out = tmp_path / "raw"
    assert convert("--format", "llava", "--input", src, "--out", out, "--media-root", vids,
                   "--modality", "video") == 0
    assert read_jsonl(out / "video.jsonl") == [
        {"messages": [user("<video>\nWhat happens?"), assistant("It fades in.")],
         "videos": ["clip.webm"], "source_id": "v1"},
        {"messages": [user("<video> Again?"), assistant("Yes.")], "videos": ["clip.webm"],
         "source_id": "v2"},
    ]
    assert skipped(out, "video") == {"video.jsonl:2": "bad_json", "v3": "remote_media"}
    preprocess_all(out, "video", vids, tok_path, 2)


# ------------------------------------------------------------------------------------ ShareGPT


def test_sharegpt_text(tmp_path, tok_path):
    src = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"id": "s1", "conversations": [
            {"from": "system", "value": "You are terse."}, {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"}, {"from": "human", "value": "3+3?"},
            {"from": "gpt", "value": "6"}]},
        {"id": "s2", "system": "Be kind.", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "chatgpt", "value": "Hello!"}]},
        {"id": "s3", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "system", "value": "late"},
            {"from": "gpt", "value": "x"}]},
        {"id": "s4", "conversations": [
            {"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{}"},
            {"from": "gpt", "value": "sunny"}]},
        {"id": "s5", "conversations": [{"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "   "}]},
        {"id": "s6", "conversations": [{"from": "human", "value": "Hi"}]},
        {"id": "s7", "conversations": [{"from": ["human"], "value": "Hi"},
                                       {"from": "gpt", "value": "x"}]},
    ])
    out = tmp_path / "raw"
    assert convert("--format", "sharegpt", "--input", src, "--out", out) == 0
    assert read_jsonl(out / "text.jsonl") == [
        {"messages": [{"role": "system", "content": "You are terse."}, user("2+2?"),
                      assistant("4"), user("3+3?"), assistant("6")], "source_id": "s1"},
        {"messages": [{"role": "system", "content": "Be kind."}, user("Hi"),
                      assistant("Hello!")], "source_id": "s2"},
    ]
    assert skipped(out, "text") == {"s3": "misplaced_system", "s4": "unsupported_content",
                                    "s5": "empty_answer", "s6": "no_assistant_turn",
                                    "s7": "bad_role"}
    preprocess_all(out, "text", tmp_path, tok_path, 2)
    # Validating with the training tokenizer instead of the byte stand-in: the same result.
    first = (out / "text.jsonl").read_bytes()
    assert convert("--format", "sharegpt", "--input", src, "--out", out, "--force",
                   "--tokenizer", tok_path) == 0
    assert (out / "text.jsonl").read_bytes() == first


# ------------------------------------------------------------------------------------ OpenAI


def test_openai_messages(tmp_path, tok_path):
    png, wav, jpg = png_bytes(), wav_bytes(), jpeg_bytes()
    root = tmp_path / "src"
    put(root / "pics/local.jpg", jpg)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    src = write_jsonl(root / "chat.jsonl", [
        {"messages": [{"role": "developer", "content": "Answer briefly."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"id": "o2", "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red block."}]}]},
        {"id": "o3", "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": "pics/local.jpg"},
                {"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}},
                {"type": "text", "text": "Does the sound match the picture?"}]},
            {"role": "assistant", "content": "No."}]},
        {"id": "o4", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "https://example.com/cat.jpg"}}]},
            {"role": "assistant", "content": "x"}]},
        {"id": "o5", "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]},
        {"id": "o6", "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]},
            {"role": "assistant", "content": "x"}]},
        {"id": "o7", "messages": [{"role": "user", "content": [{"type": "file", "file": {}}]},
                                  {"role": "assistant", "content": "x"}]},
    ])
    out = tmp_path / "raw"
    assert convert("--format", "openai", "--input", src, "--out", out, "--media-root", root,
                   "--modality", "interleaved") == 0
    lines = read_jsonl(out / "interleaved.jsonl")
    assert lines == [
        {"messages": [{"role": "system", "content": "Answer briefly."}, user("Hi"),
                      assistant("Hello")], "source_id": "chat.jsonl:0"},
        {"messages": [user("What is in this picture?\n<image>"), assistant("A red block.")],
         "images": ["media/interleaved/00000/000000001_0.png"], "source_id": "o2"},
        {"messages": [user("<image>\n<audio>\nDoes the sound match the picture?"),
                      assistant("No.")],
         "images": ["media/interleaved/00000/000000002_0.jpg"],
         "audios": ["media/interleaved/00000/000000002_1.wav"], "source_id": "o3"},
    ]
    assert (out / lines[1]["images"][0]).read_bytes() == png
    assert (out / lines[2]["images"][0]).read_bytes() == jpg
    assert (out / lines[2]["audios"][0]).read_bytes() == wav
    assert skipped(out, "interleaved") == {"o4": "remote_media", "o5": "unsupported_content",
                                           "o6": "bad_data_url", "o7": "unsupported_content"}
    # nothing left behind by the skipped records (o6 decoded its first image before failing)
    media = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                   and "media" in p.parts)
    assert media == sorted(lines[1]["images"] + lines[2]["images"] + lines[2]["audios"])
    preprocess_all(out, "interleaved", out, tok_path, 3)


# ------------------------------------------------------------------------------------ Kaldi


def test_kaldi_wav_scp_and_text(tmp_path, tok_path):
    corpus = tmp_path / "corpus"
    put(corpus / "LibriSpeech/dev clean/84 121/a b.wav", wav_bytes(hz=220))  # spaces in the path
    put(corpus / "LibriSpeech/dev/c.wav", wav_bytes(hz=880))
    put(corpus / "LibriSpeech/dev/e.wav", b"not audio")
    data = tmp_path / "data" / "dev"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text(
        f"u1 {corpus}/LibriSpeech/dev clean/84 121/a b.wav\n"
        "u2 LibriSpeech/dev/c.wav\n"
        "u3 flac -c -d -s LibriSpeech/dev/x.flac |\n"
        "u4 raw/feats.ark:1234\n"
        "u5 LibriSpeech/dev/c.wav\n"
        "u7 /elsewhere/d.wav\n"
        "u8 LibriSpeech/dev/e.wav\n", encoding="utf-8")
    (data / "text").write_text(
        "u1 HELLO THERE\nu2 GOOD  MORNING\nu3 X\nu4 Y\nu6 ORPHAN\nu7 Z\nu8 BROKEN\n",
        encoding="utf-8")
    instr = tmp_path / "instructions.txt"
    instr.write_text("Transcribe the audio.\nWrite down what is said.\n\nWhat does the speaker "
                     "say?\n", encoding="utf-8")
    out = tmp_path / "raw"
    args = ["--format", "kaldi", "--input", data, "--out", out, "--media-root", corpus,
            "--instructions-file", instr, "--seed", "3"]
    assert convert(*args) == 0
    lines = read_jsonl(out / "audio.jsonl")
    choices = {"Transcribe the audio.", "Write down what is said.", "What does the speaker say?"}
    assert [ln["source_id"] for ln in lines] == ["u1", "u2"]
    for ln, (path, text) in zip(lines, [("LibriSpeech/dev clean/84 121/a b.wav", "HELLO THERE"),
                                        ("LibriSpeech/dev/c.wav", "GOOD  MORNING")]):
        assert ln["audios"] == [path] and ln["task"] == "asr"
        (u, a) = ln["messages"]
        assert u["role"] == "user" and u["content"].startswith("<audio>\n")
        assert u["content"][len("<audio>\n"):] in choices
        assert a == assistant(text)
    assert skipped(out, "audio") == {"u3": "pipe_command", "u4": "ark_entry",
                                     "u5": "no_transcript", "u6": "no_audio",
                                     "u7": "media_outside_root", "u8": "unreadable_audio"}
    preprocess_all(out, "audio", corpus, tok_path, 2)
    # The draw depends on (seed, utterance), so it is the same on a rerun.
    first = (out / "audio.jsonl").read_bytes()
    assert convert(*args, "--force") == 0
    assert (out / "audio.jsonl").read_bytes() == first
    # The default instruction
    assert convert("--format", "kaldi", "--input", data / "wav.scp", "--out", tmp_path / "raw2",
                   "--media-root", corpus) == 0
    assert read_jsonl(tmp_path / "raw2" / "audio.jsonl")[0]["messages"][0]["content"] == \
        "<audio>\nTranscribe the audio."


def test_kaldi_unsorted_folder_is_refused(tmp_path, capsys):
    data = tmp_path / "d"
    data.mkdir()
    (data / "wav.scp").write_text("b x.wav\na y.wav\n")
    (data / "text").write_text("a A\nb B\n")
    assert convert("--format", "kaldi", "--input", data, "--out", tmp_path / "o") == 2
    assert "sort -k1,1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ FunASR


def test_funasr_jsonl(tmp_path, tok_path):
    root = tmp_path / "asr"
    put(root / "wav/1.wav", wav_bytes())
    put(root / "wav/2.wav", wav_bytes(seconds=0.5))
    src = write_jsonl(tmp_path / "train.jsonl", [
        {"key": "BAC009S0002W0122", "source": "wav/1.wav", "source_len": 88,
         "target": "而对楼市成交抑制作用最大的限购", "target_len": 15},
        {"key": "k2", "source": str(root / "wav/2.wav"), "target": " two "},
        {"key": "k3", "source": "/tmp/not/under/root.wav", "target": "x"},
        {"key": "k4", "source": "https://host/x.wav", "target": "x"},
        {"key": "k5", "source": "wav/1.wav"},
    ])
    out = tmp_path / "raw"
    assert convert("--format", "funasr", "--input", src, "--out", out, "--media-root", root,
                   "--instruction", "Please transcribe: <audio>") == 0
    assert read_jsonl(out / "audio.jsonl") == [
        {"messages": [user("Please transcribe: <audio>"),
                      assistant("而对楼市成交抑制作用最大的限购")],
         "audios": ["wav/1.wav"], "task": "asr", "source_id": "BAC009S0002W0122"},
        {"messages": [user("Please transcribe: <audio>"), assistant("two")],
         "audios": ["wav/2.wav"], "task": "asr", "source_id": "k2"},
    ]
    assert skipped(out, "audio") == {"k3": "media_outside_root", "k4": "remote_media",
                                     "k5": "bad_record"}
    preprocess_all(out, "audio", root, tok_path, 2)


# ------------------------------------------------------------------------------------ WebDataset


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_img2dataset_tar(tmp_path, tok_path):
    jpg0, jpg1, png4 = jpeg_bytes(), jpeg_bytes((10, 10, 200)), png_bytes()
    src = tmp_path / "shards"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tar:
        _add(tar, "000000000.jpg", jpg0)
        _add(tar, "000000000.txt", b"a green square\n")
        _add(tar, "000000000.json", json.dumps({"key": "000000000", "status": "success"}).encode())
        _add(tar, "000000001.jpg", jpg1)
        _add(tar, "000000001.json", json.dumps({"caption": "a blue square"}).encode())
        _add(tar, "000000002.jpg", jpg0)  # caption missing
        _add(tar, "000000002.json", json.dumps({"status": "success"}).encode())
        _add(tar, "000000003.json", json.dumps({"status": "failed_to_download"}).encode())
        _add(tar, "../../escape.jpg", jpg0)  # path traversal
        _add(tar, "../../escape.txt", b"evil")
        link = tarfile.TarInfo("000000005.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _add(tar, "000000005.txt", b"linked")
    with tarfile.open(src / "00001.tar", "w") as tar:
        _add(tar, "sub/000000004.png", png4)
        _add(tar, "sub/000000004.txt", "ein Bild".encode())
    out = tmp_path / "raw"
    assert convert("--format", "webdataset", "--input", src, "--out", out) == 0
    cap = lambda c: [user("<image>\nDescribe the image briefly."), assistant(c)]  # noqa: E731
    lines = read_jsonl(out / "image.jsonl")
    assert lines == [
        {"messages": cap("a green square"), "images": ["media/image/00000/000000000_0.jpg"],
         "task": "caption", "source_id": "00000.tar/000000000"},
        {"messages": cap("a blue square"), "images": ["media/image/00000/000000001_0.jpg"],
         "task": "caption", "source_id": "00000.tar/000000001"},
        {"messages": cap("ein Bild"), "images": ["media/image/00000/000000006_0.png"],
         "task": "caption", "source_id": "00001.tar/sub/000000004"},
    ]
    assert [(out / ln["images"][0]).read_bytes() for ln in lines] == [jpg0, jpg1, png4]
    assert skipped(out, "image") == {"00000.tar/000000002": "no_caption",
                                     "00000.tar/000000003": "no_image",
                                     "00000.tar/../../escape": "unsafe_member",
                                     "00000.tar/000000005": "unsafe_member"}
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and "escape" in p.name)
    assert written == []
    media = sorted(p for p in (out / "media").rglob("*") if p.is_file())
    assert len(media) == 3  # the skipped no_caption image was not extracted
    preprocess_all(out, "image", out, tok_path, 3)


# ------------------------------------------------------------------------------------ DPO


def test_dpo_pairs(tmp_path, tok_path):
    imgs = tmp_path / "imgs"
    put(imgs / "p/1.png", png_bytes())
    put(imgs / "p/2.jpg", jpeg_bytes())
    src = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": "d1", "prompt": "Which animal is in <image>?", "chosen": "A cat.",
         "rejected": "A dog.", "image": "p/1.png"},
        {"id": "d2", "prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
        # TRL conversational layout with content parts
        {"id": "d3", "images": ["p/1.png", "p/2.jpg"],
         "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "Same colour?"}]}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "No."}]}],
         "rejected": [{"role": "assistant", "content": "Yes."}]},
        # implicit prompt: the shared conversation before the last turn
        {"id": "d4",
         "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go."}]},
        {"id": "d5", "prompt": "x", "chosen": "y"},
        {"id": "d6", "prompt": "x", "chosen": "", "rejected": "z"},
        {"id": "d7", "prompt": "<image> and <image>", "chosen": "a", "rejected": "b",
         "image": "p/1.png"},
    ])
    out = tmp_path / "raw"
    assert convert("--format", "dpo", "--input", src, "--out", out, "--media-root", imgs) == 0
    assert read_jsonl(out / "preference.jsonl") == [
        {"prompt": "Which animal is in <image>?", "chosen": "A cat.", "rejected": "A dog.",
         "images": ["p/1.png"], "source_id": "d1"},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon",
         "source_id": "d2"},
        {"prompt": [user("<image>\n<image>\nSame colour?")], "chosen": "No.", "rejected": "Yes.",
         "images": ["p/1.png", "p/2.jpg"], "source_id": "d3"},
        {"prompt": [user("Hi")], "chosen": "Hello!", "rejected": "Go.", "source_id": "d4"},
    ]
    assert skipped(out, "preference") == {"d5": "bad_record", "d6": "empty_answer",
                                    "d7": "placeholder_mismatch"}
    report = preprocess_all(out, "preference", imgs, tok_path, 4)
    assert report.written == 4


# ------------------------------------------------------------------------------------ common


def test_refuses_to_overwrite_and_limit(tmp_path, capsys):
    src = write_jsonl(tmp_path / "s.jsonl", [
        {"id": str(i), "conversations": [{"from": "human", "value": "q"},
                                         {"from": "gpt", "value": f"a{i}"}]} for i in range(5)])
    out = tmp_path / "raw"
    assert convert("--format", "sharegpt", "--input", src, "--out", out, "--limit", "2") == 0
    assert [ln["source_id"] for ln in read_jsonl(out / "text.jsonl")] == ["0", "1"]
    assert json.loads((out / "convert_text_report.json").read_text())["limited"] is True
    capsys.readouterr()
    assert convert("--format", "sharegpt", "--input", src, "--out", out) == 2
    assert "--force" in capsys.readouterr().err
    assert len(read_jsonl(out / "text.jsonl")) == 2  # untouched
    assert convert("--format", "sharegpt", "--input", src, "--out", out, "--force") == 0
    assert len(read_jsonl(out / "text.jsonl")) == 5
    # --instruction only where it means something
    assert convert("--format", "sharegpt", "--input", src, "--out", tmp_path / "o2",
                   "--instruction", "x") == 2


def test_json_array_streaming_matches_json_load(tmp_path, monkeypatch):
    """Chunk edges inside strings, escapes, multi-byte characters and numbers; a tiny chunk size
    makes every record cross several edges."""
    records = [{"id": i, "s": "ü€😀 \"q\" [not] {a} \\ ,", "n": 12345.678e-3 * i,
                "l": [1, [2, {"x": None}], True, False], "big": 10 ** 20 + i} for i in range(50)]
    records += [7, "a string", [], {}]
    path = tmp_path / "a.json"
    path.write_text("\ufeff \n" + json.dumps(records, ensure_ascii=False, indent=1) + "\n\n",
                    encoding="utf-8")
    monkeypatch.setattr(common, "_CHUNK", 7)
    seen = []
    got = [rec for _, rec in iter_json_records(path, seen.append)]
    assert got == records
    assert sum(seen) == path.stat().st_size
    for bad, msg in [("[{\"a\": 1}, {\"b\": ", "not valid JSON"), ("[1, 2", "not closed"),
                     ("[1 2]", "expected ','"), ("[1] x", "after the end"),
                     ("{\"a\": 1} x", None)]:
        path.write_text(bad)
        if msg is None:  # a JSONL line that is not JSON: a counted skip, not an error
            assert [r.reason for _, r in iter_json_records(path, lambda n: None)] == ["bad_json"]
            continue
        with pytest.raises(ConvertError, match=msg):
            list(iter_json_records(path, lambda n: None))


def test_tar_member_outside_output_never_written(tmp_path):
    """Even a tar whose sample key climbs out produces nothing outside --out."""
    src = tmp_path / "in" / "x.tar"
    src.parent.mkdir()
    with tarfile.open(src, "w") as tar:
        _add(tar, "/abs/000.jpg", jpeg_bytes())
        _add(tar, "/abs/000.txt", b"cap")
    out = tmp_path / "o"
    assert convert("--format", "webdataset", "--input", src, "--out", out) == 0
    assert skipped(out, "image") == {"x.tar//abs/000": "unsafe_member"}
    assert not any(p.is_file() for p in (out / "media").rglob("*")) if (out / "media").exists() \
        else True
    assert sorted(os.listdir(tmp_path)) == ["in", "o"]


def test_console_script_and_tool_shim():
    """pyproject's omni-convert-data points at the CLI's main; the tool runs it."""
    import importlib
    import subprocess
    import tomllib

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][
        "omni-convert-data"]
    module, attr = target.split(":")
    assert getattr(importlib.import_module(module), attr) is main
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_dataset.py"), "--help"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0
    for opt in ("--format", "--media-root", "--instructions-file", "--limit", "--force"):
        assert opt in res.stdout


def test_failed_run_leaves_nothing_half_written(tmp_path, capsys):
    """A JSON array damaged in the middle stops the run with the position; the output folder
    holds no partial file (and an old output replaced with --force is gone, not mixed)."""
    rec = {"id": "x", "conversations": [{"from": "human", "value": "q"},
                                        {"from": "gpt", "value": "a"}]}
    src = tmp_path / "cut.json"
    src.write_text("[" + ",".join([json.dumps(rec)] * 3) + ', {"id": "y", "conv', encoding="utf-8")
    out = tmp_path / "raw"
    assert convert("--format", "sharegpt", "--input", src, "--out", out) == 2
    assert "record 3 is not valid JSON" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == []


def test_linked_media_folder_is_not_written_through(tmp_path, capsys):
    """out/media linked to a folder elsewhere: refused before anything lands there."""
    src = tmp_path / "in" / "x.tar"
    src.parent.mkdir()
    with tarfile.open(src, "w") as tar:
        _add(tar, "000.jpg", jpeg_bytes())
        _add(tar, "000.txt", b"cap")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "o"
    out.mkdir()
    (out / "media").symlink_to(elsewhere, target_is_directory=True)
    assert convert("--format", "webdataset", "--input", src, "--out", out) == 2
    assert "outside the output folder" in capsys.readouterr().err
    assert list(elsewhere.rglob("*")) == []
