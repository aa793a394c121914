"""Deferred media decoding (``data.media_backend=deferred`` / ``dali_gpu``): loader workers pack
the encoded images/videos with their plan, the training process decodes them
(``megatron_omni.data.media.deferred``).

Checked here on CPU: the training-process decode gives the same batches as today's worker-side
decode (exact with the CPU backend on both sides; DALI CPU operators within the tolerances of
tests/data/test_media.py), for rows of every modality including pure text; a corrupt file is
masked and counted; prefetch keeps the order; the torch patchify equals the numpy one.

NOT run here: the DALI ``device='mixed'`` pipeline on a GPU (no GPU in CI). It is guarded
(``defers_decoding('dali_gpu')`` raises without CUDA + DALI) and exercised by the ``dali_decode``
stage of tools/gpu_check.py (deferred decode in the training process vs the CPU backend).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_loaders import _cfg, _loaders, data  # noqa: F401 - the shared prepared dataset

from megatron_omni.data.media.cpu_decode import CPUBackend
from megatron_omni.data.media.dali import dali_available
from megatron_omni.data.media.deferred import (
    TrainingDecoder,
    defers_decoding,
    make_training_decoder,
    patchify_on,
)
from megatron_omni.data.media.select import select_backend
from megatron_omni.data.media.vision import ImageSettings, pixels_to_patches

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not importable")
MODALITIES = ["text", "image", "video", "audio", "interleaved"]
TENSORS = ("tokens", "labels", "loss_mask", "gen_audio_mask", "position_ids", "cu_seqlens",
           "image_grid_thw", "video_grid_thw", "vision_grid_thw", "num_tokens")


@pytest.mark.parametrize("t", [1, 2, 3])
def test_patchify_on_device_equals_numpy(t):
    rng = np.random.default_rng(t)
    frames = rng.integers(0, 256, (t, 56, 84, 3), dtype=np.uint8)
    ref, grid = pixels_to_patches(frames, ImageSettings())
    got, g = patchify_on(torch.from_numpy(frames), ImageSettings())
    assert g == grid and got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(ref))


def test_selection():
    from megatron_omni.config.schema import ConfigError, DataConfig

    for ok in ("auto", "cpu", "dali", "dali_gpu", "deferred"):
        DataConfig(media_backend=ok)
    with pytest.raises(ConfigError, match="data.media_backend must be"):
        DataConfig(media_backend="gpu")
    assert defers_decoding("deferred") and not defers_decoding("cpu")
    assert not defers_decoding("dali")
    if not torch.cuda.is_available():
        assert not defers_decoding("auto")  # CPU runs decode in the workers
        with pytest.raises(RuntimeError, match="dali_gpu needs CUDA"):
            defers_decoding("dali_gpu")
        assert make_training_decoder("cpu") is None


def _pairs(data, modality, n):
    ref = _loaders(data, _cfg(data, modalities=[modality], media_backend="cpu"))
    dfr = _loaders(data, _cfg(data, modalities=[modality], media_backend="deferred"))
    assert dfr.defer_decoding and not ref.defer_decoding
    return [(ref.next(modality), dfr.next(modality)) for _ in range(n)], ref, dfr


def _assert_same(r, d, pix_exact=True):
    for k in TENSORS:
        assert torch.equal(r[k], d[k]), k
    assert r["sample_keys"] == d["sample_keys"]
    assert [w.tolist() for w in r["audio_waveforms"]] == [w.tolist() for w in d["audio_waveforms"]]
    for k in ("image_pixel_values", "video_pixel_values", "vision_patches"):
        assert r[k].shape == d[k].shape, k
        if pix_exact:
            assert torch.equal(r[k], d[k]), k
        elif r[k].numel() and k != "vision_patches":
            # test_media's DALI-vs-CPU pixel tolerances (resized JPEG: mean 0.5, and 4 as the 99th
            # percentile rather than the max: the synthetic images' hard edges differ by up to 16
            # after the resize; video: mean 2.5 and, resized here, 99th percentile 12 instead of 8;
            # the
            # gpu_check dali_decode stage allows a mean of 3.0 for both), in pixel units (normalised
            # diff * 255 * std, std <= 0.2758)
            diff = ((r[k] - d[k]).abs() * 255 * 0.2758).flatten()
            p99 = float(diff.sort().values[int(0.99 * (diff.numel() - 1))])
            if k == "image_pixel_values":
                assert p99 <= 4.01 and diff.mean() <= 0.5, (k, p99, diff.mean())
            else:
                assert diff.mean() <= 2.5 and p99 <= 12.0, (k, diff.mean(), p99)


@pytest.mark.parametrize("modality", MODALITIES)
def test_deferred_cpu_decode_equals_worker_decode(data, modality):
    pairs, ref, dfr = _pairs(data, modality, 3)
    dec = TrainingDecoder(CPUBackend(), "cpu")
    compared = 0
    for r, raw in pairs:
        assert ("deferred_media" in raw) == (modality not in ("text", "audio"))
        d = dec.decode(raw)
        assert "deferred_media" not in d
        if data["truncated_key"] in d["sample_names"]:
            continue  # the worker dropped that sample; checked in the next test
        _assert_same(r, d)
        compared += 1
    assert compared >= 2
    if modality != "image":
        assert dec.skipped == {}


@needs_dali
@pytest.mark.parametrize("modality", ["image", "video", "interleaved"])
def test_deferred_dali_cpu_operators_match_within_tolerance(data, modality):
    pairs, _, _ = _pairs(data, modality, 2)
    dec = TrainingDecoder(select_backend("dali", dali_device="cpu"), "cpu")
    for r, raw in pairs:
        d = dec.decode(raw)
        if data["truncated_key"] not in d["sample_names"]:
            _assert_same(r, d, pix_exact=False)


def test_corrupt_file_is_masked_and_counted(data):
    cfg = _cfg(data, modalities=["image"], media_backend="deferred", packing_buffer_size=12)
    L = _loaders(data, cfg)
    dec = TrainingDecoder(CPUBackend(), "cpu")
    hit = 0
    for _ in range(8):  # > 2 epochs of 9 image samples at ~4 per row
        b = dec.decode(L.next("image"))
        for row, keys in enumerate(b["sample_keys"]):
            if data["truncated_key"] in keys:
                hit += 1
                # the bad sample's tokens are not trained on, the others still are
                i = keys.index(data["truncated_key"])
                cu = b["cu_seqlens"].tolist()
                assert b["loss_mask"][row, cu[i] : cu[i + 1]].sum() == 0
                assert b["loss_mask"][row].sum() > 0
                assert b["skipped"].get("corrupt_image", 0) >= 1
    assert hit >= 1 and dec.skipped["corrupt_image"] == hit


def test_prefetch_returns_batches_in_order(data):
    L = _loaders(data, _cfg(data, modalities=["interleaved"], media_backend="deferred"))
    raws = [L.next("interleaved") for _ in range(4)]
    dec = TrainingDecoder(CPUBackend(), "cpu")
    want = [dec.decode(r) for r in raws]
    for r in raws:
        dec.submit(r)
    got = [dec.get() for _ in raws]
    dec.close()
    assert [g["sample_keys"] for g in got] == [w["sample_keys"] for w in want]
    for g, w in zip(got, want):
        assert torch.equal(g["vision_patches"], w["vision_patches"])
    with pytest.raises(RuntimeError):
        dec.get()


def test_trainer_adapter_adds_decode_skips_to_the_loader_counts(data):
    """EnergonData (the trainer's data source) decodes deferred batches and reports the
    training-process skips in the loader's per-reason counts and in skipped_total."""
    from megatron_omni.training.trainer import EnergonData

    src = object.__new__(EnergonData)  # its __init__ needs megatron's parallel state
    src.loaders = _loaders(
        data, _cfg(data, modalities=["image"], media_backend="deferred", packing_buffer_size=12)
    )
    src.decoder, src.skipped_total = TrainingDecoder(CPUBackend(), "cpu"), 0
    src.feed, src.reads = None, True  # one process: it reads, nothing to broadcast
    hits = 0
    for _ in range(8):
        b = src.next("image")
        assert "deferred_media" not in b and b["image_pixel_values"].shape[0] > 0
        hits += sum(data["truncated_key"] in keys for keys in b["sample_keys"])
    assert hits >= 1
    assert src.loaders.skipped()["image"]["corrupt_image"] == hits
    assert src.skipped_total == sum(src.loaders.skipped()["image"].values())
