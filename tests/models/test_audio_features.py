"""Audio front end: fbank parity with kaldi-native-fbank, LFR and CMVN against re-statements here.

Tolerance on log-mel (natural log) versus kaldi-native-fbank, both in float32: 1e-3 on every bin
whose energy is within 60 dB of its frame's strongest bin, 1e-2 on all bins. Bins further down
(e.g. 70 dB below a pure tone) hold energies at float32 round-off level in both
implementations, so only the loose bound is meaningful there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_omni.models.audio_features import (
    CMVN,
    AudioFeatureConfig,
    apply_cmvn,
    apply_lfr,
    batch_waveforms_to_features,
    kaldi_fbank,
    load_cmvn,
    num_fbank_frames,
    num_lfr_frames,
    waveform_to_features,
)

knf = pytest.importorskip("kaldi_native_fbank")

SR = 16000
NEAR_PEAK_NEPERS = 6.0 * math.log(10.0)  # 60 dB in power, in natural-log units
TOL_NEAR_PEAK = 1e-3
TOL_ALL = 1e-2




def knf_fbank(wave: np.ndarray) -> np.ndarray:
    """Reference: kaldi-native-fbank with the FunASR WavFrontend options, int16-scaled input."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SR
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hamming"
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.frame_shift_ms = 10.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.round_to_power_of_two = True
    opts.mel_opts.num_bins = 80
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    opts.energy_floor = 0.0
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    extractor = knf.OnlineFbank(opts)
    extractor.accept_waveform(SR, (wave.astype(np.float32) * 32768.0).tolist())
    extractor.input_finished()
    return np.stack([extractor.get_frame(i) for i in range(extractor.num_frames_ready)])


def make_signal(kind: str, seconds: float, seed: int = 0) -> np.ndarray:
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    if kind == "sine_440":
        x = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    elif kind == "sine_3k":
        x = 0.3 * np.sin(2 * np.pi * 3000.0 * t + 0.3)
    elif kind == "sine_7k9":
        x = 0.8 * np.sin(2 * np.pi * 7900.0 * t)
    elif kind == "noise":
        x = 0.1 * np.random.default_rng(seed).standard_normal(n)
    elif kind == "chirp":  # 100 Hz -> 7.1 kHz linear sweep
        x = 0.5 * np.sin(2 * np.pi * (100.0 * t + 7000.0 / (2 * seconds) * t * t))
    elif kind == "quiet_tone":
        x = 1e-3 * np.sin(2 * np.pi * 1000.0 * t)
    else:
        raise AssertionError(kind)
    return x.astype(np.float32)


@pytest.mark.parametrize("seconds", [0.3, 1.0, 3.7])
@pytest.mark.parametrize(
    "kind", ["sine_440", "sine_3k", "sine_7k9", "noise", "chirp", "quiet_tone"]
)
def test_fbank_matches_kaldi_native_fbank(kind, seconds):
    wave = make_signal(kind, seconds)
    ref = knf_fbank(wave)
    ours = kaldi_fbank(torch.from_numpy(wave), SR).numpy()
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape == (num_fbank_frames(wave.size), 80)
    diff = np.abs(ours - ref)
    near_peak = (ref.max(axis=1, keepdims=True) - ref) < NEAR_PEAK_NEPERS
    assert near_peak.sum(axis=1).min() >= 3  # the tight bound applies to several bins per frame
    assert diff[near_peak].max() < TOL_NEAR_PEAK, diff[near_peak].max()
    assert diff.max() < TOL_ALL, diff.max()


def test_fbank_silence_hits_the_log_floor():
    ours = kaldi_fbank(torch.zeros(SR // 2), SR)
    ref = knf_fbank(np.zeros(SR // 2, dtype=np.float32))
    floor = math.log(np.finfo(np.float32).eps)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(ours.numpy(), floor, atol=1e-6)


def test_fbank_depends_on_the_int16_scale():
    """A 2x louder waveform adds exactly ln(4) to every (non-floored) log-mel bin."""
    wave = torch.from_numpy(make_signal("noise", 0.5, seed=3))
    quiet, loud = kaldi_fbank(wave, SR), kaldi_fbank(2 * wave, SR)
    torch.testing.assert_close(
        loud - quiet, torch.full_like(quiet, math.log(4.0)), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    "num_samples,frames", [(400, 1), (559, 1), (560, 2), (16000, 98), (59200, 368)]
)
def test_fbank_frame_count(num_samples, frames):
    assert num_fbank_frames(num_samples) == frames
    wave = torch.from_numpy(make_signal("noise", num_samples / SR))
    assert kaldi_fbank(wave, SR).shape == (frames, 80)


# ---------------------------------------------------------------------------- LFR


def lfr_reference(frames: np.ndarray, m: int = 7, n: int = 6) -> np.ndarray:
    """LFR as described in FunASR, re-stated with Python lists.

    Left-pad with (m-1)//2 copies of the first frame; windows of m rows start every n rows of the
    padded list, one per ceil(T/n); a window running past the end is filled with the last row.
    """
    rows = [frames[0]] * ((m - 1) // 2) + list(frames)
    out = []
    for i in range(math.ceil(len(frames) / n)):
        window = rows[i * n : i * n + m]
        window = window + [rows[-1]] * (m - len(window))
        out.append(np.concatenate(window))
    return np.stack(out)


@pytest.mark.parametrize("num_frames", [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 28, 98, 368])
def test_lfr_matches_reference(num_frames):
    x = np.random.default_rng(num_frames).standard_normal((num_frames, 80)).astype(np.float32)
    ours = apply_lfr(torch.from_numpy(x)).numpy()
    ref = lfr_reference(x)
    assert ours.shape == ref.shape == (num_lfr_frames(num_frames), 560)
    np.testing.assert_array_equal(ours, ref)


def test_lfr_first_and_last_frames_by_hand():
    """T = 8 rows whose values are their own index: the exact row indices of each window."""
    x = torch.arange(8, dtype=torch.float32)[:, None].expand(8, 2)
    out = apply_lfr(x).reshape(2, 7, 2)[..., 0]
    # window 0: rows [-3..3] -> first row repeated 3x; window 1: rows [3..9] -> clamped at 7.
    assert out.tolist() == [[0, 0, 0, 0, 1, 2, 3], [3, 4, 5, 6, 7, 7, 7]]


def test_lfr_batched_equals_per_clip():
    rng = np.random.default_rng(1)
    lengths = [13, 1, 30, 6]
    clips = [torch.from_numpy(rng.standard_normal((t, 80)).astype(np.float32)) for t in lengths]
    padded = torch.full((4, 30, 80), 123.0)  # padding content must not leak
    for i, clip in enumerate(clips):
        padded[i, : len(clip)] = clip
    out, out_lengths = apply_lfr(padded, torch.tensor(lengths))
    assert out_lengths.tolist() == [num_lfr_frames(t) for t in lengths]
    for i, clip in enumerate(clips):
        k = out_lengths[i]
        np.testing.assert_array_equal(out[i, :k].numpy(), lfr_reference(clip.numpy()))
        assert torch.all(out[i, k:] == 0)


# ---------------------------------------------------------------------------- CMVN


def test_cmvn_formula_and_identity():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 560)).astype(np.float32)
    neg_mean = rng.standard_normal(560).astype(np.float32)
    inv_std = rng.uniform(0.1, 2.0, 560).astype(np.float32)
    out = apply_cmvn(
        torch.from_numpy(x), CMVN(torch.from_numpy(neg_mean), torch.from_numpy(inv_std))
    )
    np.testing.assert_allclose(out.numpy(), (x + neg_mean) * inv_std, rtol=1e-6, atol=1e-6)
    assert torch.equal(apply_cmvn(torch.from_numpy(x), None), torch.from_numpy(x))


def test_cmvn_rejects_wrong_width():
    cmvn = CMVN(torch.zeros(80), torch.ones(80))
    with pytest.raises(ValueError, match="560"):
        apply_cmvn(torch.zeros(3, 560), cmvn)
    with pytest.raises(ValueError, match="same length"):
        CMVN(torch.zeros(560), torch.ones(80))


def test_load_cmvn_reads_am_mvn(tmp_path):
    rng = np.random.default_rng(4)
    neg_mean = rng.standard_normal(560).round(5)
    inv_std = rng.uniform(0.1, 0.2, 560).round(6)
    fmt = lambda v: " ".join(f"{x:.6f}" for x in v)  # noqa: E731
    path = tmp_path / "am.mvn"
    path.write_text(
        "<Nnet>\n<Splice> 560 560\n[ 0 ]\n"
        f"<AddShift> 560 560\n<LearnRateCoef> 0 [ {fmt(neg_mean)} ]\n"
        f"<Rescale> 560 560\n<LearnRateCoef> 0 [ {fmt(inv_std)} ]\n</Nnet>\n"
    )
    cmvn = load_cmvn(path)
    np.testing.assert_allclose(cmvn.neg_mean.numpy(), neg_mean, atol=1e-6)
    np.testing.assert_allclose(cmvn.inv_stddev.numpy(), inv_std, atol=1e-6)
    bad = tmp_path / "bad.mvn"
    bad.write_text("<Nnet>\n</Nnet>\n")
    with pytest.raises(ValueError, match="AddShift"):
        load_cmvn(bad)


# ---------------------------------------------------------------------------- end to end


def test_waveform_to_features_composes_the_steps():
    wave = make_signal("chirp", 1.3)
    rng = np.random.default_rng(5)
    cmvn = CMVN(
        torch.from_numpy(rng.standard_normal(560).astype(np.float32)),
        torch.from_numpy(rng.uniform(0.1, 0.3, 560).astype(np.float32)),
    )
    feats = waveform_to_features(torch.from_numpy(wave), SR, cmvn)
    assert torch.equal(waveform_to_features(wave, SR, cmvn), feats)  # numpy input works too
    ref = (lfr_reference(knf_fbank(wave)) + cmvn.neg_mean.numpy()) * cmvn.inv_stddev.numpy()
    assert feats.shape == ref.shape == (num_lfr_frames(num_fbank_frames(wave.size)), 560)
    # fbank error (<= 1e-2 in log-mel) scaled by inv_stddev (<= 0.3)
    assert np.abs(feats.numpy() - ref).max() < 3e-3


def test_batch_equals_single_clips():
    specs = [("noise", 1.0), ("sine_440", 0.3), ("chirp", 2.05), ("noise", 0.025)]
    waves = [torch.from_numpy(make_signal(k, s, seed=i)) for i, (k, s) in enumerate(specs)]
    cmvn = CMVN(torch.full((560,), -10.0), torch.full((560,), 0.15))
    feats, lengths = batch_waveforms_to_features(waves, SR, cmvn)
    assert lengths.tolist() == [num_lfr_frames(num_fbank_frames(w.numel())) for w in waves]
    assert feats.shape == (4, max(lengths.tolist()), 560)
    for i, wave in enumerate(waves):
        single = waveform_to_features(wave, SR, cmvn)
        torch.testing.assert_close(feats[i, : lengths[i]], single, atol=1e-4, rtol=1e-5)
        assert torch.all(feats[i, lengths[i] :] == 0)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "wave,sr,message",
    [
        (torch.zeros(16000), 8000, "16000 Hz"),
        (torch.zeros(16000), 44100, "resample"),
        (torch.zeros(0), SR, "empty"),
        (torch.zeros(399), SR, "too short"),
        (torch.zeros(2, 16000), SR, "1-D"),
        (torch.zeros(1, 16000), SR, "1-D"),
        (torch.zeros(16000, dtype=torch.int16), SR, "float"),
        (torch.full((16000,), float("nan")), SR, "NaN"),
        (torch.full((16000,), 1000.0), SR, "32768"),
    ],
)
def test_bad_input_raises(wave, sr, message):
    with pytest.raises(ValueError, match=message):
        waveform_to_features(wave, sr)


def test_batch_bad_input_raises():
    with pytest.raises(ValueError, match="non-empty list"):
        batch_waveforms_to_features([], SR)
    with pytest.raises(ValueError, match="too short"):
        batch_waveforms_to_features([torch.zeros(16000), torch.zeros(100)], SR)


def test_config_validation():
    with pytest.raises(ValueError, match="Nyquist"):
        AudioFeatureConfig(high_freq=9000.0)
    with pytest.raises(ValueError, match="lfr"):
        AudioFeatureConfig(lfr_n=0)
