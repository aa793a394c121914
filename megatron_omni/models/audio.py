"""SAN-M audio encoder (FunASR's Paraformer encoder) and M2-omni's audio-token output.

SAN-M ("self-attention with memory", Gao et al. 2020, arXiv 2006.01713) is a pre-norm transformer
encoder whose attention adds an FSMN memory: a depthwise 1-D convolution over the value
projection, which gives every frame a learned local context on top of global attention. M2-omni
uses the 50-block, 512-wide Paraformer encoder on 560-dim LFR fbank frames (one frame per 60 ms,
see ``audio_features.py``) and feeds every 3 output frames (180 ms) to the LLM as one token.

It is small (~0.16B) and its pretrained weights are fp32, so it is written in plain ``torch.nn``
rather than Megatron modules (no tensor parallelism is worth having here) and always runs in
fp32: ``SANMEncoder.forward`` casts its input to float32 and disables autocast, so bf16/FP8
training of the LLM does not change the audio features.

Parameter names reproduce FunASR's ``SANMEncoder`` (``encoders0.0.self_attn.linear_q_k_v``,
``encoders.N.self_attn.fsmn_block``, ``encoders.N.feed_forward.w_1``, ``norm1``, ``after_norm``,
...), so its weight map (``megatron_omni/models/weight_maps/audio.py``) only adds or strips a
prefix.

Equations of one block (x: [T, d_in], pre-norm, h = heads, d_k = d / h)::

    y          = LayerNorm1(x)                              eps 1e-12, as FunASR
    q, k, v    = split(y W_qkv + b_qkv)                      fused, each [T, d]
    v_m        = v * mask                                    zero the padded frames
    memory     = (depthwise_conv(pad(v_m)) + v_m) * mask     kernel K, left pad (K-1)//2 + shift
    attention  = softmax(q k^T / sqrt(d_k), keys masked) v   per head
    a          = attention W_out + b_out + memory
    x          = x + a        (only when d_in == d; the first block maps 560 -> 512 and has no
                               residual because the widths differ)
    x          = x + W_2 relu(W_1 LayerNorm2(x) + b_1) + b_2

The encoder input is first scaled by sqrt(d) and given FunASR's sinusoidal positions (see
``sinusoidal_position_encoding``); after the last block comes ``after_norm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Every audio clip occupies exactly this many LLM positions (the release's num_query_token_audio).
from megatron_omni.data.special_tokens import AUDIO_TOKENS_PER_CLIP

__all__ = [
    "AUDIO_FRAMES_PER_TOKEN",
    "AUDIO_TOKENS_PER_CLIP",
    "AudioTokenizerHead",
    "SANMConfig",
    "SANMEncoder",
    "lengths_to_mask",
    "num_audio_tokens",
    "pad_audio_tokens",
    "sinusoidal_position_encoding",
    "stack_audio_frames",
]

AUDIO_FRAMES_PER_TOKEN = 3
"""Encoder frames concatenated into one LLM audio token (M2-omni's ``audio_compress``)."""
# The value the M2-omni release writes into masked attention scores (see SANMConfig).
_RELEASE_MASK_FILL = 2.0**-126


@dataclass
class SANMConfig:
    """Shape of the SAN-M encoder. Defaults are the Paraformer-large encoder used by M2-omni."""

    input_size: int = 560
    """Width of one input frame (LFR m * mel bins = 7 * 80)."""
    output_size: int = 512
    """Model width d of every block after the first."""
    attention_heads: int = 4
    """Attention heads; output_size must be divisible by it."""
    linear_units: int = 2048
    """Hidden width of the ReLU feed-forward."""
    num_blocks: int = 50
    """Total blocks: 1 in ``encoders0`` (input_size -> output_size) + num_blocks - 1 in
    ``encoders``."""
    kernel_size: int = 11
    """FSMN depthwise convolution kernel (frames of context on the value path)."""
    sanm_shift: int = 0
    """Extra left padding of the FSMN kernel (0 = centred, i.e. symmetric past/future context)."""
    dropout: float = 0.0
    """Dropout on block outputs and on the FSMN memory (0 for fine-tuning a pretrained encoder)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon; FunASR's LayerNorm uses 1e-12 and the pretrained weights expect it."""
    release_mask_quirk: bool = False
    """Reproduce the M2-omni release's masking bug: it fills masked attention scores with 2**-126
    (about 0) instead of -inf before the softmax, so padded keys still take part in the softmax
    denominator and a clip's output depends on how much padding its batch has. Off (the FunASR
    behaviour: a padded batch equals each clip alone); turn on only to compare against the
    release on padded batches. With no padding both agree exactly."""

    def __post_init__(self) -> None:
        sizes = (
            "input_size",
            "output_size",
            "attention_heads",
            "linear_units",
            "num_blocks",
            "kernel_size",
        )
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"SANMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.output_size % self.attention_heads:
            raise ValueError(
                f"SANMConfig.output_size ({self.output_size}) must be divisible by attention_heads "
                f"({self.attention_heads})"
            )
        if self.input_size % 2 or self.input_size < 4:
            raise ValueError(
                "SANMConfig.input_size must be even and >= 4 for the sinusoidal position "
                "encoding, "
                f"got {self.input_size}"
            )
        left = (self.kernel_size - 1) // 2 + self.sanm_shift
        if self.sanm_shift < 0 or left > self.kernel_size - 1:
            most = self.kernel_size - 1 - (self.kernel_size - 1) // 2
            raise ValueError(
                f"SANMConfig.sanm_shift must be in [0, {most}] for kernel_size {self.kernel_size}, "
                f"got {self.sanm_shift}"
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"SANMConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def tiny(cls, **overrides) -> "SANMConfig":
        """A few-thousand-parameter encoder on the real 560-dim features, for CPU tests."""
        values = dict(output_size=64, attention_heads=2, linear_units=128, num_blocks=3)
        values.update(overrides)
        return cls(**values)

    @property
    def fsmn_padding(self) -> tuple[int, int]:
        """(left, right) zero padding of the FSMN convolution, so output length == input length."""
        left = (self.kernel_size - 1) // 2 + self.sanm_shift
        return left, self.kernel_size - 1 - left


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B]`` lengths -> ``[B, max_len]`` bool, True on real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def sinusoidal_position_encoding(
    num_positions: int,
    depth: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """FunASR's ``SinusoidalPositionEncoder`` table, ``[num_positions, depth]``.

    It differs from the "Attention is all you need" table in three ways, all of which the
    pretrained weights depend on: positions start at 1 (not 0); the frequencies are
    ``10000 ** (-i / (depth/2 - 1))`` for i = 0 .. depth/2 - 1 (so the last one is exactly
    1/10000); and the sines fill the first half of the vector and the cosines the second half
    (not interleaved). It is computed in ``dtype`` the same way FunASR does, for bit-level parity.
    """
    half = depth // 2
    log_increment = math.log(10000.0) / (half - 1)
    inv_timescales = torch.exp(torch.arange(half, device=device, dtype=dtype) * -log_increment)
    positions = torch.arange(1, num_positions + 1, device=device, dtype=dtype)
    scaled = positions[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1)


class SANMAttention(nn.Module):
    """Multi-head self-attention plus the FSMN memory block (FunASR's MultiHeadedAttentionSANM)."""

    def __init__(self, in_size: int, config: SANMConfig):
        super().__init__()
        d = config.output_size
        self.heads = config.attention_heads
        self.head_dim = d // self.heads
        self.linear_q_k_v = nn.Linear(in_size, 3 * d)
        self.fsmn_block = nn.Conv1d(d, d, config.kernel_size, groups=d, bias=False)
        self.linear_out = nn.Linear(d, d)
        self.fsmn_padding = config.fsmn_padding
        self.dropout = config.dropout
        self.attention_dropout = config.attention_dropout
        self.release_mask_quirk = config.release_mask_quirk

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T, in], ``mask`` [B, T] bool (True = real frame) -> [B, T, d]."""
        bsz, t, _ = x.shape
        q, k, v = self.linear_q_k_v(x).chunk(3, dim=-1)
        frame_mask = mask[:, :, None].to(v.dtype)

        # FSMN memory: depthwise conv over time on the (masked) values, plus the values themselves.
        v_masked = v * frame_mask
        padded = F.pad(v_masked.transpose(1, 2), self.fsmn_padding)
        memory = F.conv1d(padded, self.fsmn_block.weight, groups=v.shape[-1])
        memory = memory.transpose(1, 2) + v_masked
        memory = F.dropout(memory, self.dropout, self.training) * frame_mask

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(bsz, t, self.heads, self.head_dim).transpose(1, 2)

        qh, kh, vh = heads(q), heads(k), heads(v)
        key_mask = mask[:, None, None, :]  # [B, 1, 1, T]
        p_drop = self.attention_dropout if self.training else 0.0
        if self.release_mask_quirk:
            scores = torch.matmul(qh * self.head_dim**-0.5, kh.transpose(-2, -1))
            scores = scores.masked_fill(~key_mask, _RELEASE_MASK_FILL)
            probs = torch.softmax(scores, dim=-1).masked_fill(~key_mask, 0.0)
            context = torch.matmul(F.dropout(probs, p_drop, self.training), vh)
        else:
            # Same result as FunASR's "-inf on padded keys, softmax, zero them" (every clip has
            # >= 1 real frame, so no row is fully masked), through PyTorch's fused kernels.
            context = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=key_mask, dropout_p=p_drop
            )
        context = context.transpose(1, 2).reshape(bsz, t, -1)
        return self.linear_out(context) + memory


class SANMFeedForward(nn.Module):
    """Position-wise ReLU feed-forward (FunASR's PositionwiseFeedForward: ``w_1``, ``w_2``)."""

    def __init__(self, config: SANMConfig):
        super().__init__()
        self.w_1 = nn.Linear(config.output_size, config.linear_units)
        self.w_2 = nn.Linear(config.linear_units, config.output_size)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.dropout(torch.relu(self.w_1(x)), self.dropout, self.training))


class SANMEncoderLayer(nn.Module):
    """One pre-norm SAN-M block (FunASR's EncoderLayerSANM with normalize_before=True)."""

    def __init__(self, in_size: int, config: SANMConfig):
        super().__init__()
        self.self_attn = SANMAttention(in_size, config)
        self.feed_forward = SANMFeedForward(config)
        self.norm1 = nn.LayerNorm(in_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.output_size, eps=config.layer_norm_eps)
        # Residual around attention only when the width is unchanged (not in the 560 -> 512 block).
        self.attention_residual = in_size == config.output_size
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn = F.dropout(self.self_attn(self.norm1(x), mask), self.dropout, self.training)
        x = x + attn if self.attention_residual else attn
        return x + F.dropout(self.feed_forward(self.norm2(x)), self.dropout, self.training)


class SANMEncoder(nn.Module):
    """The SAN-M encoder: features ``[B, T, 560]`` + lengths -> ``[B, T, 512]`` fp32 + lengths."""

    def __init__(self, config: SANMConfig | None = None):
        super().__init__()
        self.config = config = config or SANMConfig()
        self.encoders0 = nn.ModuleList([SANMEncoderLayer(config.input_size, config)])
        self.encoders = nn.ModuleList(
            [SANMEncoderLayer(config.output_size, config) for _ in range(config.num_blocks - 1)]
        )
        self.after_norm = nn.LayerNorm(config.output_size, eps=config.layer_norm_eps)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a padded batch.

        ``features``: ``[B, T, input_size]`` (any float dtype; cast to fp32). ``lengths``: real
        frames per clip (default: all T). Returns ``(hidden [B, T, output_size] fp32, lengths)``;
        rows past a clip's length are zero, and real rows do not depend on the padding.
        """
        cfg = self.config
        if features.dim() != 3 or features.shape[-1] != cfg.input_size:
            raise ValueError(
                f"SANMEncoder expects features [B, T, {cfg.input_size}], got "
                f"{tuple(features.shape)}"
            )
        bsz, t, _ = features.shape
        if t == 0:
            raise ValueError("SANMEncoder got zero frames; every clip needs at least one LFR frame")
        if lengths is None:
            lengths = torch.full((bsz,), t, dtype=torch.long, device=features.device)
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=features.device)
        if lengths.shape != (bsz,):
            raise ValueError(f"lengths must have shape [{bsz}], got {tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > t).any()):
            raise ValueError(f"every length must be in [1, {t}], got {lengths.tolist()}")
        bad = sorted({str(p.dtype) for p in self.parameters() if p.dtype != torch.float32})
        if bad:
            raise TypeError(
                f"SANMEncoder parameters must stay float32 (found {', '.join(bad)}): it runs in "
                "fp32 "
                "even in bf16/fp16 training; call .float() on it after any model-wide dtype cast"
            )
        with torch.autocast(device_type=features.device.type, enabled=False):
            mask = lengths_to_mask(lengths, t)
            x = features.to(torch.float32) * cfg.output_size**0.5
            x = x + sinusoidal_position_encoding(t, cfg.input_size, x.device)[None]
            for layer in self.encoders0:
                x = layer(x, mask)
            for layer in self.encoders:
                x = layer(x, mask)
            x = self.after_norm(x) * mask[:, :, None].to(x.dtype)
        return x, lengths


# ----------------------------------------------------------------------------------------------
# Audio tokens for the LLM
# ----------------------------------------------------------------------------------------------


def num_audio_tokens(
    num_encoder_frames: int, frames_per_token: int = AUDIO_FRAMES_PER_TOKEN
) -> int:
    """Real (non-padding) audio tokens of a clip before the 256 cap: the tail frames are dropped."""
    return num_encoder_frames // frames_per_token


def stack_audio_frames(
    hidden: torch.Tensor, lengths: torch.Tensor, frames_per_token: int = AUDIO_FRAMES_PER_TOKEN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every ``frames_per_token`` encoder frames: ``[B, T, d]`` -> ``[B, T // 3, 3d]``.

    Token j of clip b is frames 3j, 3j+1, 3j+2 side by side. Each clip keeps
    ``lengths[b] // 3`` tokens and its last ``lengths[b] % 3`` frames are DROPPED, as the M2-omni
    release does (``valid_length = length // 3 * 3``). The release takes the length from the
    padded batch, so a padded clip would have tokens made of padding frames; here the cut is per
    clip, identical to the release for a clip encoded alone. Rows past a clip's token count are
    zero. Returns ``(tokens, token_lengths)``.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, d], got {tuple(hidden.shape)}")
    bsz, t, d = hidden.shape
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=hidden.device)
    if lengths.shape != (bsz,) or bool((lengths < 0).any()) or bool((lengths > t).any()):
        raise ValueError(f"lengths must be {bsz} values in [0, {t}], got {lengths.tolist()}")
    n_tok = t // frames_per_token
    tokens = hidden[:, : n_tok * frames_per_token].reshape(bsz, n_tok, frames_per_token * d)
    token_lengths = lengths // frames_per_token
    valid = torch.arange(n_tok, device=hidden.device)[None, :] < token_lengths[:, None]
    return tokens * valid[..., None].to(tokens.dtype), token_lengths


class AudioTokenizerHead(nn.Module):
    """Encoder output -> at most ``num_tokens`` tokens of width 3 * d per clip (no parameters).

    Truncating here, before the projector, is what the release does and saves projecting frames
    that would be thrown away; ``pad_audio_tokens`` then fills each clip up to exactly
    ``num_tokens`` after the projector, in LLM hidden size.
    """

    def __init__(
        self,
        frames_per_token: int = AUDIO_FRAMES_PER_TOKEN,
        num_tokens: int = AUDIO_TOKENS_PER_CLIP,
    ):
        super().__init__()
        if frames_per_token < 1 or num_tokens < 1:
            raise ValueError("frames_per_token and num_tokens must be >= 1")
        self.frames_per_token = frames_per_token
        self.num_tokens = num_tokens

    def forward(
        self, hidden: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, token_lengths = stack_audio_frames(hidden, lengths, self.frames_per_token)
        return tokens[:, : self.num_tokens], token_lengths.clamp(max=self.num_tokens)


def pad_audio_tokens(
    projected: torch.Tensor | Sequence[torch.Tensor],
    pad_embedding: torch.Tensor,
    num_tokens: int = AUDIO_TOKENS_PER_CLIP,
    lengths: torch.Tensor | Sequence[int] | None = None,
    l2_normalize: bool = False,
) -> torch.Tensor:
    """Give every clip exactly ``num_tokens`` rows: truncate long clips, pad short ones.

    ``projected``: a list of ``[T_i, H]`` tensors, or a padded ``[N, T, H]`` tensor with
    ``lengths`` (default: all T). ``pad_embedding`` ``[H]`` is the LLM input embedding of
    ``<end_of_audio>``, the same for every padded row. Returns ``[N, num_tokens, H]`` in the
    projected dtype.

    ``l2_normalize=True`` L2-normalises every row AFTER padding, pad rows included, which is what
    the M2-omni release does (``F.normalize`` after concatenating the pad embeddings); pass
    un-normalised projector outputs in that case. With False the rows are returned as given.
    """
    if isinstance(projected, torch.Tensor):
        if projected.dim() != 3:
            raise ValueError(
                f"projected must be [N, T, H] or a list of [T_i, H], got {tuple(projected.shape)}"
            )
        n, t, _ = projected.shape
        if lengths is None:
            lengths = [t] * n
        lengths = [int(v) for v in torch.as_tensor(lengths).reshape(-1).tolist()]
        if len(lengths) != n or any(not 0 <= v <= t for v in lengths):
            raise ValueError(f"lengths must be {n} values in [0, {t}], got {lengths}")
        clips = [projected[i, : lengths[i]] for i in range(n)]
    else:
        if lengths is not None:
            raise ValueError("lengths are only accepted with a padded [N, T, H] tensor")
        clips = list(projected)
        if not clips:
            raise ValueError("pad_audio_tokens got no clips")
        for i, clip in enumerate(clips):
            if clip.dim() != 2:
                raise ValueError(f"clip {i} must be [T_i, H], got {tuple(clip.shape)}")
    hidden = clips[0].shape[-1]
    if pad_embedding.shape != (hidden,):
        raise ValueError(
            f"pad_embedding must have shape [{hidden}], got {tuple(pad_embedding.shape)}"
        )
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    ref = clips[0]
    out = pad_embedding.to(ref.device, ref.dtype).expand(len(clips), num_tokens, hidden).clone()
    for i, clip in enumerate(clips):
        if clip.shape[-1] != hidden:
            raise ValueError(f"clip {i} has width {clip.shape[-1]}, expected {hidden}")
        keep = min(clip.shape[0], num_tokens)
        out[i, :keep] = clip[:keep]
    return F.normalize(out, dim=-1) if l2_normalize else out
