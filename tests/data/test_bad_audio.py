"""Audio that used to pass preprocessing and then kill training: a 20 ms clip, a WAV whose header
promises more samples than it holds, a float WAV with NaN samples. Preprocessing refuses the
first two (cheap header checks); whatever still reaches the shards is skipped and counted by the
loader, and training goes on."""

import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from megatron_omni.config.schema import DataConfig
from megatron_omni.data import preprocess as pp
from megatron_omni.data.loaders import OmniLoaders
from megatron_omni.data.synthetic import corpus_texts, make_synthetic_dataset
from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

BAD = {"short": "audio_too_short", "truncated": "audio_size_mismatch", "nan": "bad_audio"}


def _line(rel):
    return json.dumps({"messages": [{"role": "user", "content": "<audio>\nDescribe the sound."},
                                    {"role": "assistant", "content": "two low beeps"}],
                       "audios": [rel]})


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    base = tmp_path_factory.mktemp("badaudio")
    raw = base / "raw"
    make_synthetic_dataset(raw, num_per_modality=6, seed=4, num_val_per_modality=2)
    bad = raw / "bad"
    bad.mkdir()
    sr = 16000
    t = np.arange(sr) / sr
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(bad / "short.wav", tone[:320], sr, subtype="PCM_16")  # 20 ms
    sf.write(bad / "full.wav", tone, sr, subtype="PCM_16")
    data = (bad / "full.wav").read_bytes()
    (bad / "truncated.wav").write_bytes(data[: 44 + (len(data) - 44) // 2])  # header says 1 s
    nan = tone.copy()
    nan[100:200] = np.nan
    sf.write(bad / "nan.wav", nan, sr, subtype="FLOAT")
    with open(raw / "audio.jsonl", "a") as f:
        for name in BAD:
            f.write(_line(f"bad/{name}.wav") + "\n")
    tok = train_tiny_tokenizer(corpus_texts(raw), 400, base / "tokenizer.json")
    return {"base": base, "raw": raw, "tok": tok}


def _inputs(raw):
    return {m: {"train": raw / f"{m}.jsonl", "val": raw / f"{m}_val.jsonl"}
            for m in ("text", "audio")}


def test_preprocessing_refuses_short_and_truncated_audio(raw):
    report = pp.preprocess(_inputs(raw["raw"]), raw["base"] / "strict", raw["tok"], workers=1,
                           progress=False)
    assert report.skipped["audio_too_short"] == 1
    assert report.skipped["audio_size_mismatch"] == 1
    skipped = [json.loads(x) for x in (raw["base"] / "strict" / pp.SKIPPED_NAME).read_text()
               .splitlines()]
    assert {s["reason"]: "truncated" in s["message"] or "ms" in s["message"] for s in skipped
            if s["reason"].startswith("audio_")} == {"audio_too_short": True,
                                                     "audio_size_mismatch": True}
    # The NaN clip has a sound header: only decoding finds it (the loader's job).
    assert report.stats["audio"]["train"].written == 7


def test_loader_skips_and_counts_every_bad_clip_and_training_continues(raw, monkeypatch,
                                                                       single_rank, tmp_path):
    # Shards as an older preprocessing (or another tool) would have written them: no checks.
    monkeypatch.setattr(pp, "wav_truncation", lambda data: "")
    cfg = pp.PreprocessConfig(speech_codebook_size=64)
    object.__setattr__(cfg, "min_audio_seconds", 0.0)  # bypass the (now) refused setting
    out = raw["base"] / "lax"
    report = pp.preprocess(_inputs(raw["raw"]), out, raw["tok"], config=cfg, workers=1,
                           progress=False)
    assert report.stats["audio"]["train"].written == 9  # all three bad clips got in
    monkeypatch.undo()
    tok = load_tokenizer(raw["tok"], speech_codebook_size=64)
    dcfg = DataConfig(path=str(out), modalities=["audio"], seq_length=1024,
                      media_backend="cpu", packing_buffer_size=4, shuffle_buffer_size=2, seed=1)
    loaders = OmniLoaders(dcfg, tok, dp_rank=0, dp_size=1)
    seen = set()
    for _ in range(12):  # more than an epoch of 9 samples
        b = loaders.next("audio")
        seen.update(b["sample_names"])
        assert all(bool(np.isfinite(w.numpy()).all()) and w.numel() >= 400
                   for w in b["audio_waveforms"])
    skipped = loaders.skipped()["audio"]
    assert skipped["bad_audio"] >= 1 and skipped["audio_too_short"] >= 1
    assert skipped["audio_size_mismatch"] >= 1, skipped
    assert len(seen) == 6  # every good clip trained, no bad one

    # The trainer on these shards: the bad clips are skipped, counted, and training goes on.
    from omni_batch import tiny_omni_cfg

    from megatron_omni.training.trainer import Trainer

    tcfg = tiny_omni_cfg(f"model.llm.vocab_size={tok.vocab_size}", "model.speech_codebook_size=64",
                         f"data.path={out}", f"data.tokenizer={raw['tok']}",
                         "data.modalities=[audio]", "data.seq_length=1024",
                         "data.media_backend=cpu", "data.packing_buffer_size=4",
                         "data.shuffle_buffer_size=2", "training.train_iters=6",
                         "training.log_interval=1", f"training.save={tmp_path / 'run'}",
                         vision=False)
    lines = []
    t = Trainer(tcfg, printer=lines.append)
    t.setup()
    summary = t.train()
    assert summary.last_step == 6 and summary.nan_steps == 0
    assert t.data.skipped_total >= 3
    assert sum(Counter(t.data.loaders.skipped()["audio"]).values()) >= 3
