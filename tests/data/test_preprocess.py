"""tools/preprocess_data.py + megatron_omni.data.preprocess on the synthetic omni dataset."""

from __future__ import annotations

import functools
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from megatron.energon import (
    Cooker,
    TaskEncoder,
    WorkerConfig,
    get_loader,
    get_val_dataset,
    reraise_exception,
    stateless,
)

from megatron_omni.data.format import (
    image_settings_from,
    load_omni_meta,
    template_config_from,
    video_settings_from,
)
from megatron_omni.data.loaders import cook_omni_sample
from megatron_omni.data.media import CPUBackend, MediaProcessor
from megatron_omni.data.preprocess import (
    PreprocessConfig,
    SkipLine,
    _make_ctx,
    preprocess,
    process_line,
)
from megatron_omni.data.templates import template_sample
from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import preprocess_data  # noqa: E402
from make_synthetic_dataset import MODALITIES, corpus_texts, make_synthetic_dataset  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("pp")
    raw = base / "raw"
    manifest = make_synthetic_dataset(raw, num_per_modality=4, seed=3, broken=True,
                                      num_val_per_modality=2)
    tok_path = train_tiny_tokenizer(corpus_texts(raw), 400, base / "tok" / "tokenizer.json")
    report = preprocess(raw, base / "out", tok_path, workers=2, progress=False)
    return {"raw": raw, "out": base / "out", "manifest": manifest, "report": report,
            "tok_path": tok_path, "base": base}


class _CookOnly(TaskEncoder):
    cookers = [Cooker(cook_omni_sample)]
    decoder = None

    @stateless
    def batch(self, samples):
        return list(samples)


@functools.lru_cache(maxsize=None)
def _energon_samples(ds_dir: Path, split: str) -> list:
    """Every sample of a split, loaded through Energon (one pass, no shuffling)."""
    wc = WorkerConfig(rank=0, world_size=1, num_workers=0, global_error_handler=reraise_exception)
    ds = get_val_dataset(ds_dir, split_part=split, worker_config=wc, batch_size=1,
                         task_encoder=_CookOnly())
    return [s for batch in get_loader(ds) for s in batch]


def _expected_keys(raw: Path, manifest: dict, modality: str, split: str) -> set[str]:
    f = manifest["files"][modality]
    name, n = (f["train"], f["train_lines"]) if split == "train" else (f["val"], f["val_lines"])
    broken = {b["line_index"] for b in manifest["broken"] if b["file"] == name}
    stem = Path(name).stem
    return {f"{stem}-{i:09d}" for i in range(n) if i not in broken}


def test_broken_lines_skipped_with_their_reason(prepared):
    out, manifest, report = prepared["out"], prepared["manifest"], prepared["report"]
    broken = manifest["broken"]
    assert len(broken) == 8
    skipped = [json.loads(ln) for ln in (out / "skipped.jsonl").read_text().splitlines()]
    by_source = {s["source"]: s["reason"] for s in skipped}
    for b in broken:
        assert by_source.get(f"{b['file']}:{b['line_index']}") == b["reason"], b
    assert len(skipped) == len(broken)  # nothing else was skipped
    expected = Counter(b["reason"] for b in broken)
    assert report.skipped == expected
    saved = json.loads((out / "preprocess_report.json").read_text())
    assert saved["skipped"] == dict(expected)
    assert saved["num_skipped"] == 8
    assert set(expected) == {"corrupt_image", "unreadable_audio", "unreadable_video",
                             "missing_file", "placeholder_mismatch", "image_too_large",
                             "bad_utf8", "empty_conversation"}


def test_every_good_sample_written_and_loads_with_energon(prepared):
    raw, out, manifest, report = (prepared[k] for k in ("raw", "out", "manifest", "report"))
    total = 0
    for m in MODALITIES:
        assert report.datasets[m] == str(out / m)
        for split in ("train", "val"):
            want = _expected_keys(raw, manifest, m, split)
            samples = _energon_samples(out / m, split)
            keys = [s.__key__ for s in samples]
            assert sorted(keys) == sorted(want), (m, split)  # each exactly once
            assert report.stats[m][split].written == len(want)
            for s in samples:
                assert s.record["key"] == s.__key__ and s.record["modality"] == m
                assert s.record["split"] == split
                assert s.__subflavors__ == {"modality": m}
            total += len(want)
    lines = sum(f["train_lines"] + f["val_lines"] for f in manifest["files"].values())
    assert report.written == total == lines - 8


def test_stored_token_counts_equal_real_decoding_and_templating(prepared):
    out, tok = prepared["out"], load_tokenizer(prepared["tok_path"])
    seen = Counter()
    for m in MODALITIES:
        meta = load_omni_meta(out / m)
        proc = MediaProcessor(CPUBackend(), image=image_settings_from(meta["image"]),
                              video=video_settings_from(meta["video"]))
        tmpl = template_config_from(meta["template"])
        for split in ("train", "val"):
            for s in _energon_samples(out / m, split):
                r = s.record
                names = r["media"]
                images = [proc.image(s.media[p]) for p in names["images"]]
                videos = [proc.video(s.media[p]) for p in names["videos"]]
                audios = [proc.audio(s.media[p]) for p in names["audios"]]
                # Template with the token counts of the DECODED media, not the stored ones.
                t = template_sample(r["sample"], tok, image_tokens=[v.num_tokens for v in images],
                                    video_tokens=[v.num_tokens for v in videos], config=tmpl)
                assert len(t.input_ids) == r["num_tokens"], s.__key__
                assert [v.num_tokens for v in images] == r["image_tokens"]
                assert [v.num_tokens for v in videos] == r["video_tokens"]
                assert r["num_images"] == len(images) + len(videos)
                assert r["num_patches"] == sum(v.patches.shape[0] for v in images + videos)
                assert [a.numel() for a in audios] == r["audio_num_samples"]
                seen[m] += 1
    assert all(seen[m] >= 4 for m in MODALITIES), seen


def test_output_identical_for_any_worker_count(prepared):
    other = prepared["base"] / "out_1worker"
    preprocess(prepared["raw"], other, prepared["tok_path"], workers=1, progress=False)
    for m in MODALITIES:
        shards = sorted(p.name for p in (prepared["out"] / m).glob("*.tar"))
        assert shards == sorted(p.name for p in (other / m).glob("*.tar"))
        for name in shards:
            assert (prepared["out"] / m / name).read_bytes() == (other / m / name).read_bytes()


def test_shard_layout(prepared):
    out = prepared["out"]
    with tarfile.open(next((out / "interleaved").glob("train-*.tar"))) as tar:
        names = tar.getnames()
    key = names[0].split(".")[0]
    assert names[:3] == [f"{key}.json", f"{key}.img0.png", f"{key}.img1.png"] or \
        names[0] == f"{key}.json"
    dataset_yaml = (out / "image" / ".nv-meta" / "dataset.yaml").read_text()
    assert "CrudeWebdataset" in dataset_yaml and "modality: image" in dataset_yaml
    split = (out / "image" / ".nv-meta" / "split.yaml").read_text()
    assert "train-000000.tar" in split and "val-000000.tar" in split


def test_process_line_rejects(prepared, tmp_path):
    ctx = _make_ctx(prepared["tok_path"], PreprocessConfig(), prepared["raw"])
    kw = dict(key="k-000000000", modality="image", split="train", source="x:0", ctx=ctx)
    cases = {
        b"{not json": "bad_json",
        b"   ": "blank_line",
        b'{"text": ""}': "empty_text",
        json.dumps({"messages": [{"role": "user", "content": "<image>\nhi"},
                                 {"role": "assistant", "content": "a"}],
                    "images": ["../../etc/passwd"]}).encode(): "bad_media_path",
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "a"}],
                    "images": "a.png"}).encode(): "bad_media_field",
    }
    for raw, reason in cases.items():
        with pytest.raises(SkipLine) as e:
            process_line(raw, **kw)
        assert e.value.reason == reason, raw
    rec, parts = process_line(b'{"text": "12 + 7 = 19"}', **kw)
    assert parts == [] and rec["form"] == "text" and rec["num_tokens"] > 2


def test_cli(prepared, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        preprocess_data.main(["--help"])
    assert e.value.code == 0
    helptext = capsys.readouterr().out
    for opt in ("--workers", "--tokenizer", "--media-root", "--no-verify-images"):
        assert opt in helptext
    rc = preprocess_data.main([str(prepared["raw"]), str(tmp_path / "cli"), "--tokenizer",
                               str(prepared["tok_path"]), "--modalities", "text", "--quiet"])
    assert rc == 0
    report = json.loads((tmp_path / "cli" / "preprocess_report.json").read_text())
    assert report["skipped"] == {"bad_utf8": 1, "empty_conversation": 1}
    assert set(report["datasets"]) == {"text"}
