"""megatron_omni.data.loaders: Energon loaders per modality over preprocessed synthetic data.

Data-parallel ranks are simulated in one process: each rank's loaders are built with Energon's
WorkerConfig(rank=r, world_size=2). That is the code path of a real DP run: Energon slices the
shards from (rank, world_size) alone, and save/restore uses the per-rank ``save_state_rank`` /
``restore_state_rank`` (no collective), so 2 gloo processes would execute the same calls.
"""

from __future__ import annotations

import json
import pickle
import tarfile

import pytest
import torch
from megatron.energon import reraise_exception

from megatron_omni.config.schema import DataConfig
from megatron_omni.data.loaders import OmniLoaders, is_text_batch
from megatron_omni.data.preprocess import PreprocessConfig, preprocess
from megatron_omni.data.synthetic import corpus_texts, make_synthetic_dataset
from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

SEQ = 1024
MAX_IMAGES = 3
MAX_PATCHES = 2600




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("ld")
    raw = base / "raw"
    manifest = make_synthetic_dataset(raw, num_per_modality=8, seed=5, broken=True,
                                      num_val_per_modality=3)
    tok_path = train_tiny_tokenizer(corpus_texts(raw), 400, base / "tokenizer.json")
    # Header probes only: the truncated JPEG gets into the shards and must be caught (skipped and
    # counted) at decode time by the loader.
    report = preprocess(raw, base / "out", tok_path, config=PreprocessConfig(verify_images=False),
                        workers=1, progress=False)
    assert report.skipped["corrupt_image"] == 0
    records = {}
    for tar_path in (base / "out").glob("*/*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(m).read())
                    records[rec["key"]] = rec
    truncated = next(b for b in manifest["broken"] if b["reason"] == "corrupt_image")
    return {"path": base / "out", "tok": load_tokenizer(tok_path), "records": records,
            "truncated_key": f"image-{truncated['line_index']:09d}"}


def _cfg(data, **kw) -> DataConfig:
    args = dict(path=str(data["path"]),
                modalities=["text", "image", "video", "audio", "interleaved"],
                seq_length=SEQ, max_images_per_row=MAX_IMAGES,
                max_vision_patches_per_row=MAX_PATCHES,
                media_backend="cpu", packing_buffer_size=6, shuffle_buffer_size=4, seed=11)
    args.update(kw)
    return DataConfig(**args)


def _loaders(data, cfg=None, **kw) -> OmniLoaders:
    return OmniLoaders(cfg or _cfg(data), data["tok"], error_handler=reraise_exception, **kw)


def _keys(batch) -> list[str]:
    return [k for row in batch["sample_keys"] for k in row]


def test_is_text_batch():
    assert [n for n in range(12) if is_text_batch(n, 0.25)] == [3, 7, 11]
    assert not any(is_text_batch(n, 0.0) for n in range(10))
    assert sum(is_text_batch(n, 0.3) for n in range(100)) == 30


def test_batches_respect_budgets_and_keep_samples_whole(data):
    records, tok = data["records"], data["tok"]
    L = _loaders(data)
    for m in L.modalities:
        for _ in range(3):
            b = L.next(m)
            assert b["modality"] == m and b["group"] == m
            tokens, labels, mask = b["tokens"], b["labels"], b["loss_mask"]
            assert tokens.shape == labels.shape == mask.shape == (1, SEQ)
            assert b["position_ids"].shape == (3, 1, SEQ)
            cu = b["cu_seqlens"].tolist()
            keys = _keys(b)
            recs = [records[k] for k in keys]
            lengths = [r["num_tokens"] for r in recs]
            # Every sample whole, in order, padding as the final segment.
            assert cu[: len(keys) + 1] == [sum(lengths[:i]) for i in range(len(keys) + 1)]
            assert cu[-1] == SEQ and int(b["num_tokens"][0]) == sum(lengths) <= SEQ
            assert b["max_seqlen"] == max(x - y for x, y in zip(cu[1:], cu[:-1]))
            # Media budgets.
            grids = torch.cat([b["image_grid_thw"], b["video_grid_thw"]])
            assert grids.shape[0] == sum(r["num_images"] for r in recs) <= MAX_IMAGES
            patches = int(grids.prod(dim=1).sum()) if grids.numel() else 0
            assert patches == sum(r["num_patches"] for r in recs) <= MAX_PATCHES
            assert b["image_pixel_values"].shape == (int(b["image_grid_thw"].prod(1).sum()), 1176)
            assert b["video_pixel_values"].shape[0] == int(b["video_grid_thw"].prod(1).sum())
            assert [w.numel() for w in b["audio_waveforms"]] == \
                [n for r in recs for n in r["audio_num_samples"]]
            assert [len(g) for g in b["image_grids_per_sample"][0]] == \
                [len(r["image_tokens"]) for r in recs]
            # Image patch tokens: exactly the decoded features.
            n_img_tok = int((tokens == tok.special.image_patch).sum())
            assert n_img_tok == int(b["image_grid_thw"].prod(1).sum()) // 4
            assert int((tokens == tok.special.audio_patch).sum()) == 256 * len(b["audio_waveforms"])
            # Labels: next token inside each sample; the last token of a sample has none.
            lab, tk, mk = labels[0], tokens[0], mask[0]
            for a, e in zip(cu[:-1], cu[1:]):
                assert torch.equal(lab[a:e - 1], tk[a + 1:e])
                assert mk[e - 1] == 0 and lab[e - 1] == tok.pad_id
                assert b["position_ids"][:, 0, a].tolist() == [0, 0, 0]
            real = cu[len(keys)]
            assert mk[real:].sum() == 0 and bool((tk[real:] == tok.pad_id).all())
            # Loss only where the template puts it: never on prompts or media blocks.
            for special in (tok.special.image_patch, tok.special.video_patch,
                            tok.special.audio_patch, tok.start_header_id):
                assert mk[lab == special].sum() == 0
            assert mk.sum() > 0 and set(mk.unique().tolist()) <= {0.0, 1.0}
            assert bool((b["gen_audio_mask"] & (mask == 0)).any()) is False
            # One vision stream in token order: block k of patch tokens <-> grid k.
            vis = (tk == tok.special.image_patch) | (tk == tok.special.video_patch)
            idx = torch.nonzero(vis).flatten().tolist()
            blocks, run = [], 0
            for j, i in enumerate(idx):
                run += 1
                if j + 1 == len(idx) or idx[j + 1] != i + 1:
                    blocks.append(run)
                    run = 0
            vg = b["vision_grid_thw"]
            assert blocks == (vg.prod(1) // 4).tolist()
            assert b["vision_patches"].shape == (int(vg.prod(1).sum()), 1176)
            assert b["sample_names"] == keys


def test_micro_batch_of_two_rows(data):
    L = _loaders(data, _cfg(data, modalities=["interleaved"], micro_batch_size=2))
    b = L.next("interleaved")
    assert b["tokens"].shape == b["labels"].shape == (2, SEQ)
    assert b["position_ids"].shape == (3, 2, SEQ)
    cu = b["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 2 * SEQ and SEQ in cu  # flattened THD, row 1 offset by T
    assert len(b["sample_keys"]) == 2 and b["num_tokens"].shape == (2,)
    n_grids = sum(len(g) for row in b["image_grids_per_sample"] for g in row)
    assert b["image_grid_thw"].shape == (n_grids, 3)


def test_gen_audio_mask_marks_speech_targets(data):
    L = _loaders(data, _cfg(data, modalities=["audio"]))
    tok = data["tok"]
    speech_lo = tok.special.speech_offset
    found = 0
    for _ in range(4):
        b = L.next("audio")
        lab, g = b["labels"][0], b["gen_audio_mask"][0]
        # Targets inside the <gen_audio> ... </gen_audio> span, markers included.
        is_speech_target = ((lab >= speech_lo) | (lab == tok.special.gen_audio_start)
                            | (lab == tok.special.gen_audio_end)) & (b["loss_mask"][0] > 0)
        assert torch.equal(g, is_speech_target)
        found += int(g.sum())
    assert found > 0


def test_decode_failures_are_skipped_and_counted(data):
    L = _loaders(data, _cfg(data, modalities=["image"], packing_buffer_size=12))
    seen = set()
    for _ in range(8):  # > 2 epochs of 9 image samples at ~4 per row
        seen.update(_keys(L.next("image")))
    assert data["truncated_key"] not in seen
    assert L.skipped()["image"]["corrupt_image"] >= 1
    assert len(seen) == 8  # every good training image was served


def test_deterministic_for_a_seed(data):
    def run(seed):
        L = _loaders(data, _cfg(data, modalities=["text", "audio"], seed=seed))
        return [_keys(L.next(m)) for _ in range(3) for m in ("text", "audio")]

    a = run(11)
    assert a == run(11)
    assert a != run(12)


def test_save_restore_two_dp_ranks_resumes_at_the_next_sample(data):
    cfg = _cfg(data, modalities=["image", "audio"], pure_text_ratio=0.5)
    order = ["image", "audio"] * 3

    def draw(L):
        out = []
        for m in order:
            b = L.next(m)
            out.append((m, b["modality"], _keys(b)))
        return out

    seen_by_rank, states = [], []
    for rank in range(2):
        ref = _loaders(data, cfg, dp_rank=rank, dp_size=2)
        before = draw(ref)
        state = pickle.loads(pickle.dumps(ref.save_state()))  # as if written to a checkpoint
        states.append(state)
        after_ref = draw(ref)

        resumed = _loaders(data, cfg, dp_rank=rank, dp_size=2)
        resumed.restore_state(state)
        after = draw(resumed)
        assert after == after_ref
        # ... which is not what a fresh start gives (the comparison can fail).
        assert draw(_loaders(data, cfg, dp_rank=rank, dp_size=2)) != after_ref
        # The text mixer: every second batch of a group is a pure-text row.
        assert [mod for _, mod, _ in before + after].count("text") == len(order)
        assert resumed.skipped() == ref.skipped()
        seen_by_rank.append({k for _, _, ks in before + after for k in ks})
    # The two ranks read disjoint slices of every dataset.
    assert seen_by_rank[0] and seen_by_rank[1]
    assert not seen_by_rank[0] & seen_by_rank[1]
    with pytest.raises(ValueError, match="DP rank"):
        _loaders(data, cfg, dp_rank=1, dp_size=2).restore_state(states[0])


def test_validation_split_is_excluded_from_training(data):
    records = data["records"]
    val_keys = {k for k, r in records.items() if r["split"] == "val"}
    assert val_keys
    L = _loaders(data, _cfg(data, pure_text_ratio=0.25))
    trained = set()
    for _ in range(6):
        for m in L.modalities:
            trained.update(_keys(L.next(m)))
    assert trained and not trained & val_keys
    assert all(records[k]["split"] == "train" for k in trained)
    for m in ("image", "audio"):
        got = [k for b in L.val_loader(m) for k in _keys(b)]
        want = {k for k in val_keys if records[k]["modality"] == m}
        assert sorted(got) == sorted(want)


def test_clear_errors(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess_data"):
        _loaders(data, _cfg(data, path=str(tmp_path), modalities=["image"]))
    other = train_tiny_tokenizer(["completely different text corpus"] * 20, 300,
                                 tmp_path / "other.json")
    with pytest.raises(ValueError, match="another tokenizer"):
        OmniLoaders(_cfg(data, modalities=["text"]), load_tokenizer(other))
