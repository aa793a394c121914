"""Audio front end of the SAN-M encoder: Kaldi fbank -> LFR stacking -> CMVN, in plain torch.

Why our own fbank instead of ``torchaudio.compliance.kaldi.fbank`` (what the M2-omni release and
FunASR's ``WavFrontend`` call): torchaudio is not a dependency of this project, its Kaldi module is
deprecated, and it handles one waveform at a time. This version is a handful of tensor ops over
frames, so a whole batch of clips runs on whatever device holds it (the data loader's CPU worker
or the GPU next to DALI). Results match Kaldi / kaldi-native-fbank to float32 round-off (checked
by ``tests/models/test_audio_features.py``).

The recipe, fixed by the pretrained Paraformer/M2-omni audio encoder (changing any of it changes
what the encoder sees, so it is a config only for tests and experiments):

1. 16 kHz mono float waveform in [-1, 1], multiplied by 2**15 (Kaldi was built for int16 PCM
   scale; the log-mel values and the CMVN statistics assume that scale).
2. Kaldi fbank: 25 ms frames (400 samples) every 10 ms (160 samples), ``snip_edges=True`` (only
   frames that lie wholly inside the waveform: ``1 + (N - 400) // 160``), no dither; per frame:
   remove the DC offset, pre-emphasis 0.97, Hamming window, zero-pad to 512, power spectrum,
   80 triangular mel filters between 20 Hz and Nyquist on the Kaldi mel scale
   ``1127 ln(1 + f / 700)``, natural log with a floor of float32 epsilon. The energy floor only
   matters when ``use_energy`` is on, which it is not here.
3. Low frame rate (LFR) stacking, m=7, n=6: every 6th frame, the 7 frames around it are
   concatenated (7 * 80 = 560 values every 60 ms). The sequence is first left-padded with
   ``(m - 1) // 2`` copies of the first frame; there are ``ceil(T / n)`` outputs, and a window
   running off the end repeats the last frame.
4. Global CMVN: ``(x + neg_mean) * inv_stddev`` with 560-dim vectors (FunASR's ``am.mvn``:
   ``<AddShift>`` then ``<Rescale>``), or nothing when no statistics are given.

Resampling and channel mixing are the data pipeline's job: this module refuses anything that is
not a 1-D 16 kHz float waveform rather than guessing.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

__all__ = [
    "AudioFeatureConfig",
    "CMVN",
    "apply_cmvn",
    "apply_lfr",
    "batch_waveforms_to_features",
    "kaldi_fbank",
    "load_cmvn",
    "mel_filterbank",
    "num_fbank_frames",
    "num_lfr_frames",
    "waveform_to_features",
]

# float32 machine epsilon: Kaldi's log floor (std::numeric_limits<float>::epsilon()).
_LOG_FLOOR = float(torch.finfo(torch.float32).eps)
# A float waveform meant to lie in [-1, 1]. Resampling can overshoot full scale a little, so only
# a peak far beyond it is treated as a mistake (typically int16 PCM passed as float).
_MAX_ABS_AMPLITUDE = 2.0


@dataclass(frozen=True)
class AudioFeatureConfig:
    """Front-end settings. The defaults are the pretrained SAN-M encoder's and should stay so."""

    sample_rate: int = 16000
    """Sample rate the waveform must already have (Hz). Resample in the data pipeline."""
    waveform_scale: float = 32768.0
    """Multiplier applied to the [-1, 1] waveform: Kaldi and the CMVN stats assume int16 scale."""
    num_mel_bins: int = 80
    """Number of triangular mel filters (feature width before LFR)."""
    frame_length_ms: float = 25.0
    """Analysis window length in milliseconds (400 samples at 16 kHz)."""
    frame_shift_ms: float = 10.0
    """Hop between frames in milliseconds (160 samples at 16 kHz)."""
    preemphasis: float = 0.97
    """Kaldi pre-emphasis coefficient, applied per frame after DC removal."""
    low_freq: float = 20.0
    """Lowest mel filter edge in Hz."""
    high_freq: float = 0.0
    """Highest mel filter edge in Hz; <= 0 means Nyquist + high_freq (Kaldi's convention)."""
    lfr_m: int = 7
    """LFR: frames stacked into one output frame."""
    lfr_n: int = 6
    """LFR: hop, in input frames, between output frames."""

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        if self.num_mel_bins < 1:
            raise ValueError(f"num_mel_bins must be >= 1, got {self.num_mel_bins}")
        if self.frame_shift_ms <= 0 or self.frame_length_ms <= 0:
            raise ValueError("frame_length_ms and frame_shift_ms must be positive")
        if self.frame_length_samples < 2:
            raise ValueError(
                f"frame_length_ms={self.frame_length_ms} gives fewer than 2 samples per frame"
            )
        if self.lfr_m < 1 or self.lfr_n < 1:
            raise ValueError(f"lfr_m and lfr_n must be >= 1, got m={self.lfr_m} n={self.lfr_n}")
        nyquist = 0.5 * self.sample_rate
        high = self.high_freq if self.high_freq > 0 else nyquist + self.high_freq
        if not 0.0 <= self.low_freq < high <= nyquist:
            raise ValueError(
                f"need 0 <= low_freq < high_freq <= Nyquist ({nyquist} Hz); got low_freq="
                f"{self.low_freq}, high_freq={self.high_freq} (resolved to {high})"
            )

    @property
    def frame_length_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def frame_shift_samples(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def fft_size(self) -> int:
        """Frame length rounded up to a power of two (Kaldi's ``round_to_power_of_two``)."""
        return 1 << (self.frame_length_samples - 1).bit_length()

    @property
    def resolved_high_freq(self) -> float:
        nyquist = 0.5 * self.sample_rate
        return self.high_freq if self.high_freq > 0 else nyquist + self.high_freq

    @property
    def feature_dim(self) -> int:
        """Width of one LFR frame: what the encoder's ``input_size`` must be."""
        return self.lfr_m * self.num_mel_bins


DEFAULT_CONFIG = AudioFeatureConfig()


# ----------------------------------------------------------------------------------------------
# Frame counts (the data knows its cost before decoding)
# ----------------------------------------------------------------------------------------------


def num_fbank_frames(num_samples: int, config: AudioFeatureConfig = DEFAULT_CONFIG) -> int:
    """Fbank frames of a waveform of ``num_samples`` samples (``snip_edges=True``); 0 if too
    short."""
    length = config.frame_length_samples
    if num_samples < length:
        return 0
    return 1 + (num_samples - length) // config.frame_shift_samples


def num_lfr_frames(num_frames: int, config: AudioFeatureConfig = DEFAULT_CONFIG) -> int:
    """LFR frames made from ``num_frames`` fbank frames: ``ceil(T / n)``."""
    return -(-num_frames // config.lfr_n)


# ----------------------------------------------------------------------------------------------
# Kaldi fbank
# ----------------------------------------------------------------------------------------------


def _kaldi_mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


@lru_cache(maxsize=8)
def _mel_filterbank_cpu(config: AudioFeatureConfig) -> torch.Tensor:
    num_bins = config.num_mel_bins
    fft_size = config.fft_size
    # Kaldi places filters on the bins 0 .. fft_size/2 - 1; the Nyquist bin gets weight 0.
    freqs = torch.arange(fft_size // 2 + 1, dtype=torch.float64) * (config.sample_rate / fft_size)
    mel = _kaldi_mel(freqs)
    mel_low = _kaldi_mel(torch.tensor(config.low_freq, dtype=torch.float64))
    mel_high = _kaldi_mel(torch.tensor(config.resolved_high_freq, dtype=torch.float64))
    delta = (mel_high - mel_low) / (num_bins + 1)
    edges = mel_low + delta * torch.arange(num_bins + 2, dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (mel - left) / (center - left)
    falling = (right - mel) / (right - center)
    weights = torch.where(mel <= center, rising, falling)
    inside = (mel > left) & (mel < right)
    weights = torch.where(inside, weights, torch.zeros_like(weights))
    weights[:, fft_size // 2] = 0.0
    return weights.to(torch.float32)


def mel_filterbank(
    config: AudioFeatureConfig = DEFAULT_CONFIG, device: torch.device | str | None = None
) -> torch.Tensor:
    """Kaldi's triangular mel filters, ``[num_mel_bins, fft_size // 2 + 1]`` float32.

    Filter b rises linearly in mel from edge b to edge b+1 and falls to edge b+2, the edges being
    ``num_mel_bins + 2`` points evenly spaced in mel between ``low_freq`` and ``high_freq``
    (no area normalisation, unlike librosa's Slaney filters).
    """
    return _mel_filterbank_cpu(config).to(device)


@lru_cache(maxsize=8)
def _hamming_cpu(length: int) -> torch.Tensor:
    # Kaldi's Hamming: 0.54 - 0.46 cos(2 pi i / (N - 1)), symmetric.
    i = torch.arange(length, dtype=torch.float64)
    return (0.54 - 0.46 * torch.cos(2.0 * math.pi * i / (length - 1))).to(torch.float32)


def _check_waveform(
    waveform: torch.Tensor, sample_rate: int, config: AudioFeatureConfig
) -> torch.Tensor:
    if sample_rate != config.sample_rate:
        raise ValueError(
            f"audio must be sampled at {config.sample_rate} Hz, got {sample_rate} Hz; resample it "
            "in "
            "the data pipeline before computing features"
        )
    if not isinstance(waveform, torch.Tensor):
        waveform = torch.as_tensor(waveform)
    if waveform.dim() != 1:
        raise ValueError(
            f"expected a 1-D mono waveform, got shape {tuple(waveform.shape)}; mix or pick one "
            "channel first (e.g. waveform.mean(0) for [channels, samples])"
        )
    if not waveform.is_floating_point():
        raise ValueError(
            f"expected a float waveform in [-1, 1], got dtype {waveform.dtype}; for int16 PCM "
            "divide by 32768 first"
        )
    if waveform.numel() == 0:
        raise ValueError("empty waveform: an audio clip must have at least one frame of samples")
    need = config.frame_length_samples
    if waveform.numel() < need:
        raise ValueError(
            f"waveform too short: {waveform.numel()} samples, need at least {need} "
            f"({config.frame_length_ms} ms at {config.sample_rate} Hz) for one fbank frame"
        )
    peak = waveform.detach().abs().max()
    if not torch.isfinite(peak):
        raise ValueError("waveform contains NaN or infinite samples")
    if peak > _MAX_ABS_AMPLITUDE:
        raise ValueError(
            f"waveform peak {float(peak):.4g} is far outside [-1, 1]: features expect float audio "
            "normalised to [-1, 1] (int16 PCM must be divided by 32768)"
        )
    return waveform


def _fbank_frames(frames: torch.Tensor, config: AudioFeatureConfig) -> torch.Tensor:
    """Log-mel energies of raw (already int16-scaled) frames ``[..., frame_length]`` ->
    ``[..., bins]``."""
    frames = frames - frames.mean(dim=-1, keepdim=True)
    # Pre-emphasis, Kaldi style: y[0] = x[0] - k x[0], y[i] = x[i] - k x[i-1].
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames - config.preemphasis * previous
    frames = frames * _hamming_cpu(config.frame_length_samples).to(frames.device, frames.dtype)
    spectrum = torch.fft.rfft(frames, n=config.fft_size, dim=-1)
    power = spectrum.real.square() + spectrum.imag.square()
    banks = mel_filterbank(config, frames.device).to(power.dtype)
    energies = torch.matmul(power, banks.t())
    return torch.clamp(energies, min=_LOG_FLOOR).log()


def kaldi_fbank(
    waveform: torch.Tensor, sample_rate: int, config: AudioFeatureConfig = DEFAULT_CONFIG
) -> torch.Tensor:
    """Kaldi log-mel fbank of one 1-D float waveform in [-1, 1]: ``[num_frames, num_mel_bins]``
    fp32.

    The waveform is scaled by ``config.waveform_scale`` (2**15) first, as FunASR does, so the
    values and the pretrained CMVN statistics line up. Raises ``ValueError`` for a wrong sample
    rate, non-1-D, non-float, empty, too short (< 25 ms) or non-finite input.
    """
    waveform = _check_waveform(waveform, sample_rate, config)
    scaled = waveform.to(torch.float32) * config.waveform_scale
    frames = scaled.unfold(0, config.frame_length_samples, config.frame_shift_samples)
    return _fbank_frames(frames, config)


# ----------------------------------------------------------------------------------------------
# LFR and CMVN
# ----------------------------------------------------------------------------------------------


def _lfr_indices(lengths: torch.Tensor, max_out: int, config: AudioFeatureConfig) -> torch.Tensor:
    """Source frame index of every (clip, output frame, stacked slot): ``[B, max_out, m]``.

    Output frame i stacks frames ``i * n - (m - 1) // 2 + j`` (j = 0 .. m - 1) of the original
    sequence, clamped into ``[0, T_b - 1]``: the clamp at 0 is the left padding with copies of the
    first frame, the clamp at ``T_b - 1`` the right padding with copies of the last one.
    """
    m, n = config.lfr_m, config.lfr_n
    device = lengths.device
    i = torch.arange(max_out, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    raw = (i * n - (m - 1) // 2 + j)[None]  # [1, max_out, m]
    last = (lengths - 1).clamp(min=0)[:, None, None]
    return torch.minimum(raw.clamp(min=0), last)


def apply_lfr(
    features: torch.Tensor,
    lengths: torch.Tensor | None = None,
    config: AudioFeatureConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Low-frame-rate stacking (FunASR's LFR, m=7 n=6 by default).

    ``features``: ``[T, D]`` (one clip; returns ``[ceil(T/n), m*D]``) or ``[B, T, D]`` padded with
    ``lengths`` ``[B]`` (returns ``(stacked [B, max_out, m*D], out_lengths)`` with rows past each
    clip's ``ceil(T_b / n)`` set to zero). Each clip's windows only read its own frames, so
    padding never leaks into real output rows.
    """
    if features.dim() == 2:
        if lengths is not None:
            raise ValueError("lengths are only accepted with a padded [B, T, D] batch")
        if features.shape[0] == 0:
            raise ValueError("apply_lfr needs at least one frame")
        out, _ = apply_lfr(features[None], torch.tensor([features.shape[0]]), config)
        return out[0]
    if features.dim() != 3:
        raise ValueError(f"features must be [T, D] or [B, T, D], got shape {tuple(features.shape)}")
    bsz, max_t, dim = features.shape
    if lengths is None:
        lengths = torch.full((bsz,), max_t, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=features.device)
    if lengths.shape != (bsz,):
        raise ValueError(f"lengths must have shape [{bsz}], got {tuple(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > max_t).any()):
        raise ValueError(f"every length must be in [1, {max_t}], got {lengths.tolist()}")
    out_lengths = -(-lengths // config.lfr_n)
    max_out = int(out_lengths.max())
    index = _lfr_indices(lengths, max_out, config)  # [B, max_out, m]
    gathered = torch.gather(
        features, 1, index.reshape(bsz, -1, 1).expand(-1, -1, dim)
    )  # [B, max_out * m, D]
    stacked = gathered.reshape(bsz, max_out, config.lfr_m * dim)
    valid = torch.arange(max_out, device=features.device)[None, :] < out_lengths[:, None]
    return stacked * valid[..., None].to(stacked.dtype), out_lengths


@dataclass(frozen=True)
class CMVN:
    """Global mean/variance normalisation statistics, as FunASR stores them in ``am.mvn``."""

    neg_mean: torch.Tensor
    """Added first (Kaldi nnet ``<AddShift>``): minus the training-set mean."""
    inv_stddev: torch.Tensor
    """Multiplied second (``<Rescale>``): one over the training-set standard deviation."""

    def __post_init__(self) -> None:
        for name in ("neg_mean", "inv_stddev"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                object.__setattr__(self, name, torch.as_tensor(value, dtype=torch.float32))
        if self.neg_mean.dim() != 1 or self.neg_mean.shape != self.inv_stddev.shape:
            raise ValueError(
                "CMVN neg_mean and inv_stddev must be 1-D vectors of the same length, got "
                f"{tuple(self.neg_mean.shape)} and {tuple(self.inv_stddev.shape)}"
            )


def apply_cmvn(features: torch.Tensor, cmvn: CMVN | None) -> torch.Tensor:
    """``(x + neg_mean) * inv_stddev`` over the last dim; identity when ``cmvn`` is None."""
    if cmvn is None:
        return features
    dim = features.shape[-1]
    if cmvn.neg_mean.shape[0] != dim:
        raise ValueError(
            f"CMVN statistics have {cmvn.neg_mean.shape[0]} values but features have width {dim}; "
            "SAN-M statistics cover the 560-dim LFR frames"
        )
    neg_mean = cmvn.neg_mean.to(features.device, features.dtype)
    inv_stddev = cmvn.inv_stddev.to(features.device, features.dtype)
    return (features + neg_mean) * inv_stddev


def load_cmvn(path: str | os.PathLike) -> CMVN:
    """Read FunASR's ``am.mvn`` (Kaldi nnet1 text: ``<AddShift>`` then ``<Rescale>`` components).

    Each component carries its vector as ``<LearnRateCoef> 0 [ v1 v2 ... ]``; the first bracketed
    vector after ``<AddShift>`` is the negative mean, the one after ``<Rescale>`` the inverse
    standard deviation.
    """
    with open(path, encoding="utf-8") as handle:
        text = handle.read()

    def vector_after(tag: str) -> torch.Tensor:
        at = text.find(tag)
        if at < 0:
            raise ValueError(f"{path}: no {tag} component; not a FunASR am.mvn file")
        match = re.search(r"\[([^\]]*)\]", text[at:])
        if match is None:
            raise ValueError(f"{path}: {tag} has no [ ... ] vector")
        values = [float(v) for v in match.group(1).split()]
        if not values:
            raise ValueError(f"{path}: {tag} vector is empty")
        return torch.tensor(values, dtype=torch.float32)

    return CMVN(neg_mean=vector_after("<AddShift>"), inv_stddev=vector_after("<Rescale>"))


# ----------------------------------------------------------------------------------------------
# Waveform -> encoder input
# ----------------------------------------------------------------------------------------------


def waveform_to_features(
    waveform: torch.Tensor,
    sample_rate: int,
    cmvn: CMVN | None = None,
    config: AudioFeatureConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """One 1-D float waveform in [-1, 1] -> SAN-M input ``[num_lfr_frames, 560]`` float32."""
    fbank = kaldi_fbank(waveform, sample_rate, config)
    return apply_cmvn(apply_lfr(fbank, config=config), cmvn)


def batch_waveforms_to_features(
    waveforms: Sequence[torch.Tensor],
    sample_rate: int,
    cmvn: CMVN | None = None,
    config: AudioFeatureConfig = DEFAULT_CONFIG,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length waveforms -> ``(features [B, T_max, 560], lengths [B])``, padded with zeros.

    All clips are framed together from one zero-padded ``[B, N_max]`` tensor (one FFT call for the
    batch): with ``snip_edges`` the first ``num_fbank_frames(N_b)`` frames of clip b lie wholly
    inside its own samples, so they equal the single-clip frames, and only those are kept.
    ``device`` (default: the first waveform's) is where the work runs.
    """
    if isinstance(waveforms, torch.Tensor) or len(waveforms) == 0:
        raise ValueError("expected a non-empty list of 1-D waveforms")
    checked = [_check_waveform(w, sample_rate, config) for w in waveforms]
    device = torch.device(device) if device is not None else checked[0].device
    num_samples = [w.numel() for w in checked]
    padded = torch.zeros(len(checked), max(num_samples), dtype=torch.float32, device=device)
    for row, wave in enumerate(checked):
        padded[row, : wave.numel()] = wave.to(device=device, dtype=torch.float32)
    padded = padded * config.waveform_scale
    frames = padded.unfold(1, config.frame_length_samples, config.frame_shift_samples)
    fbank = _fbank_frames(frames, config)  # [B, F_max, bins]
    fbank_lengths = torch.tensor([num_fbank_frames(n, config) for n in num_samples], device=device)
    stacked, lengths = apply_lfr(fbank, fbank_lengths, config)
    normed = apply_cmvn(stacked, cmvn)
    valid = torch.arange(normed.shape[1], device=device)[None, :] < lengths[:, None]
    return normed * valid[..., None].to(normed.dtype), lengths
