"""Preference loader (alignment stage): every pair packed whole, chosen next to rejected, on one
data-parallel rank; ``dpo_pairs`` names their segments; media repeated per sequence."""

from __future__ import annotations

from collections import Counter

import pytest
from megatron.energon import reraise_exception

from megatron_omni.config.schema import DataConfig
from megatron_omni.data.loaders import OmniLoaders
from megatron_omni.data.preprocess import preprocess
from megatron_omni.data.synthetic import corpus_texts, make_synthetic_dataset
from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

N = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("pref")
    raw = base / "raw"
    make_synthetic_dataset(raw, num_per_modality=N, seed=2, num_val_per_modality=5,
                           preference=True)
    tok_path = train_tiny_tokenizer(corpus_texts(raw), 400, base / "tokenizer.json")
    inputs = {"preference": {"train": raw / "preference.jsonl",
                             "val": raw / "preference_val.jsonl"}}
    report = preprocess(inputs, base / "out", tok_path, media_root=raw, workers=1,
                        progress=False)
    assert report.stats["preference"]["train"].written == N
    return {"path": base / "out", "tok": load_tokenizer(tok_path)}


def _loaders(data, dp_rank=0, dp_size=1):
    cfg = DataConfig(path=str(data["path"]), modalities=["image"], seq_length=1024,
                     max_images_per_row=4, max_vision_patches_per_row=8192,
                     media_backend="cpu", packing_buffer_size=4, shuffle_buffer_size=4, seed=3,
                     pure_text_ratio=0.5)
    return OmniLoaders(cfg, data["tok"], dp_rank=dp_rank, dp_size=dp_size,
                       error_handler=reraise_exception, modalities=[],
                       preference_modality="preference")


def _check_batch(b):
    cu = b["cu_seqlens"].tolist()
    names = b["sample_names"]
    pairs = b["dpo_pairs"].tolist()
    assert pairs and len(names) >= 2 * len(pairs)
    seen = []
    for c, r in pairs:
        assert names[c].endswith("/chosen") and names[r].endswith("/rejected")
        key = names[c].rsplit("/", 1)[0]
        assert names[r] == f"{key}/rejected" and r == c + 1
        tc = b["tokens"].reshape(-1)[cu[c]:cu[c + 1]]
        tr = b["tokens"].reshape(-1)[cu[r]:cu[r + 1]]
        mc = b["loss_mask"].reshape(-1)[cu[c]:cu[c + 1]]
        mr = b["loss_mask"].reshape(-1)[cu[r]:cu[r + 1]]
        first_c = int(mc.nonzero()[0])
        # shared prompt: identical up to the first trained position, and answers differ
        assert first_c == int(mr.nonzero()[0])
        assert tc[:first_c + 1].tolist() == tr[:first_c + 1].tolist()
        assert tc.tolist() != tr.tolist()
        assert mc.sum() > 0 and mr.sum() > 0
        seen.append(key)
    # media repeated once per sequence: two vision items (or audio clips) per media pair
    return seen


def test_pairs_whole_and_media_per_sequence(data):
    ld = _loaders(data)
    keys = Counter()
    media = Counter()
    for _ in range(N):
        b = ld.next("preference")
        assert b["modality"] == "preference"  # never a mixed-in text row
        keys.update(_check_batch(b))
        tok = b["tokens"].reshape(-1)
        sp = data["tok"].special
        n_img_blocks = int((tok == sp.image_start).sum()) + int((tok == sp.video_start).sum())
        assert n_img_blocks == len(b["vision_grid_thw"]) and n_img_blocks % 2 == 0
        assert int((tok == sp.audio_start).sum()) == len(b["audio_waveforms"])
        assert len(b["audio_waveforms"]) % 2 == 0
        media.update(vision=n_img_blocks, audio=len(b["audio_waveforms"]))
    assert len(keys) >= N // 2
    assert media["vision"] > 0 and media["audio"] > 0


def test_each_pair_on_one_data_parallel_rank(data):
    per_rank = []
    for r in range(2):
        ld = _loaders(data, dp_rank=r, dp_size=2)
        keys = []
        for _ in range(3):
            keys += _check_batch(ld.next("preference"))
        per_rank.append(set(keys))
    assert per_rank[0] and per_rank[1]
    assert not per_rank[0] & per_rank[1]


def test_val_loader_keeps_pairs(data):
    ld = _loaders(data)
    n = 0
    for b in ld.val_loader("preference"):
        n += len(_check_batch(b))
    assert n == 5
