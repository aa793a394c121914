"""Model FLOPs of one training step: the LLM, the ViT and SAN-M, for MFU logging and the planner.

Conventions (the usual ones, written out so a reader can check every number):

* **Matmul FLOPs only.** A ``[m, k] x [k, n]`` product costs ``2*m*n*k``. Norms, activations,
  softmax, rotary, residual adds and the loss are not counted (a few % of the matmul FLOPs and
  not what the tensor cores do). Two exceptions that are not matmuls but do real multiply-adds on
  every frame are counted the same way: SAN-M's FSMN depthwise convolution (``2*K`` per channel
  and frame) and the ViT's Conv3d patch embedding (a matmul in disguise).
* **Backward = 2 x forward.** Each matmul has an input-gradient (dgrad) and a weight-gradient
  (wgrad) product of the same size, so a trained module costs 3 forwards. A frozen module whose
  input needs no gradient runs forward only (1x); a frozen module sitting after a trained one
  (e.g. a frozen LLM behind trained projectors) costs forward + dgrad (2x). See
  :func:`training_passes`. Matmuls on the raw input (the ViT's patch embedding, SAN-M's first
  qkv on fbank features) never need a dgrad: forward + wgrad (2x) when trained.
* **Recomputation** is *hardware* work, not model work: MFU uses ``recompute=None``; the planner's
  step time uses the real setting. ``"full"`` recomputes every transformer layer's forward once
  more (not the LM head or merger); ``"selective"`` recomputes only the core attention (the
  score and value products).
* **Attention per packed segment.** A packed row holds several samples (``cu_seqlens``); a token
  only attends inside its own sample, so the score (``Q K^T``) and value (``P V``) products cost
  ``2 * 2 * heads * head_dim * sum_i s_i^2``, not ``(sum_i s_i)^2``. For the causal LLM the
  default (``causal=True``) halves that: a causal flash-attention kernel skips the masked upper
  triangle, and Megatron-LM's ``num_floating_point_operations`` counts it the same way
  (``seq_length / 2``), so our MFU is comparable with published Megatron figures. Pass
  ``causal=False`` for the full square (what an unfused kernel, or ``torch.utils.flop_counter``
  on the math SDPA path, performs). The ViT and SAN-M attend bidirectionally: full square, per
  temporal slice of each image/video (ViT) and per clip (SAN-M).
* **Grouped-query attention**: the K and V projections are ``num_query_groups * head_dim`` wide;
  the score/value products run over all query heads.

Every function takes our config dataclasses (:mod:`megatron_omni.config.schema`) and plain
integers; nothing here imports torch, so the planner CLI starts instantly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from ..config.schema import (
    AudioConfig,
    LLMConfig,
    ModelConfig,
    OmniConfig,
    StageConfig,
    VisionConfig,
)
from ..config.validate import padded_vocab_size

__all__ = [
    "PEAK_FLOPS", "ForwardFlops", "RowFlops", "audio_encoder_frames", "audio_llm_tokens",
    "lengths_from_cu_seqlens", "llm_flops", "llm_forward_flops", "mfu", "omni_row_flops",
    "peak_flops", "projector_forward_flops", "sanm_flops", "sanm_forward_flops",
    "training_passes", "vision_llm_tokens", "vit_flops", "vit_forward_flops",
]

# ------------------------------------------------------------------------------------------------
# Peak throughput
# ------------------------------------------------------------------------------------------------

PEAK_FLOPS: dict[str, dict[str, float]] = {
    # NVIDIA H100 SXM5 datasheet, dense (no 2:4 sparsity) tensor-core throughput.
    "h100": {"bf16": 989e12, "fp8": 1979e12},
    # H200 = H100 compute with more and faster HBM (141 GB HBM3e).
    "h200": {"bf16": 989e12, "fp8": 1979e12},
    # A100 SXM4, dense bf16; no FP8 tensor cores.
    "a100": {"bf16": 312e12},
}
"""Dense peak FLOP/s per device and precision (sparsity figures are 2x these and never reached
by training). ``fp32`` training on these GPUs would run at TF32 rates; it is not listed because
nobody trains these models in fp32."""


def peak_flops(gpu: str, precision: str) -> float:
    """Dense peak FLOP/s of ``gpu`` ('h100', 'h200', 'a100') in ``precision`` ('bf16', 'fp8')."""
    table = PEAK_FLOPS.get(gpu.lower())
    if table is None:
        raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(PEAK_FLOPS)}")
    if precision not in table:
        raise ValueError(f"{gpu} has no {precision} peak in PEAK_FLOPS (has {sorted(table)})")
    return table[precision]


def mfu(flops_per_step: float, step_time: float, num_devices: int,
        peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' combined dense peak.

    ``flops_per_step`` are the *model* FLOPs of one optimizer step summed over all devices (all
    micro-batches of all data-parallel ranks, recomputation not counted).
    """
    if step_time <= 0 or num_devices <= 0 or peak_flops_per_device <= 0:
        raise ValueError("mfu needs step_time > 0, num_devices > 0 and a positive peak")
    return flops_per_step / (step_time * num_devices * peak_flops_per_device)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def training_passes(trainable: bool = True, needs_input_grad: bool = True) -> int:
    """Matmul passes of a module per training step: forward, + dgrad when something before it
    needs gradients (or its own earlier layers do, i.e. it trains), + wgrad when it trains."""
    if trainable:
        return 3
    return 2 if needs_input_grad else 1


def lengths_from_cu_seqlens(cu_seqlens: Iterable[int]) -> list[int]:
    """``[0, 9, 23, 32]`` -> ``[9, 14, 9]`` (accepts a list or a 1-D tensor)."""
    cu = [int(x) for x in (cu_seqlens.tolist() if hasattr(cu_seqlens, "tolist") else cu_seqlens)]
    if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {cu}")
    return [b - a for a, b in zip(cu, cu[1:])]


def audio_encoder_frames(seconds: float, sample_rate: int = 16000, frame_length_ms: float = 25.0,
                         frame_shift_ms: float = 10.0, lfr_n: int = 6) -> int:
    """SAN-M input frames of a clip: Kaldi fbank frames (snip_edges) -> LFR ``ceil(T / n)``.

    The same rule as ``models.audio_features.num_fbank_frames`` / ``num_lfr_frames``, restated
    here without torch: 30 s -> 2998 fbank frames -> 500 encoder frames (one per 60 ms).
    """
    samples = int(round(seconds * sample_rate))
    length = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    fbank = 0 if samples < length else 1 + (samples - length) // shift
    return -(-fbank // lfr_n)


@dataclass(frozen=True)
class ForwardFlops:
    """Forward matmul FLOPs of one module, split by what recomputation repeats."""

    layers_linear: float = 0.0
    """Weight matmuls inside the transformer layers (qkv, proj, MLP; SAN-M: + FSMN)."""
    layers_attention: float = 0.0
    """Score and value products (what selective recomputation repeats)."""
    other: float = 0.0
    """Outside the layer stack: LM head, ViT merger (never recomputed)."""
    input_layer: float = 0.0
    """Matmuls on the raw input (ViT patch embedding, SAN-M's first qkv from fbank features):
    their input never needs a gradient, so backward is the wgrad only."""

    @property
    def layers(self) -> float:
        return self.layers_linear + self.layers_attention

    @property
    def total(self) -> float:
        return self.layers + self.other + self.input_layer

    def training(self, passes: int = 3, recompute: Optional[str] = None) -> float:
        """Training FLOPs: ``passes`` x forward (+ the recomputed forward part when backward runs).

        ``passes`` is :func:`training_passes`: 3 (trains), 2 (frozen, input gradient needed) or
        1 (forward only). The input layer gets a wgrad only when the module trains.
        """
        if recompute not in (None, "none", "selective", "full"):
            raise ValueError(f"recompute must be None|'selective'|'full', got {recompute!r}")
        extra = 0.0
        if passes > 1 and recompute == "full":
            extra = self.layers
        elif passes > 1 and recompute == "selective":
            extra = self.layers_attention
        first = self.input_layer * (2 if passes == 3 else 1)
        return passes * (self.layers + self.other) + extra + first


def _attention_sq(seqlens: Sequence[int], causal: bool) -> float:
    sq = float(sum(int(s) * int(s) for s in seqlens))
    return sq / 2 if causal else sq


# ------------------------------------------------------------------------------------------------
# LLM
# ------------------------------------------------------------------------------------------------

def llm_forward_flops(llm: LLMConfig, seqlens: Sequence[int], vocab_size: Optional[int] = None,
                      causal: bool = True, num_layers: Optional[int] = None,
                      lm_head: bool = True) -> ForwardFlops:
    """Forward FLOPs of the Llama-3 LLM on one packed row with segment lengths ``seqlens``.

    Per layer and token: ``2h(a+2g)d`` (fused qkv) + ``2adh`` (proj) + ``2h*2F`` (gate+up)
    + ``2Fh`` (down); per layer and segment ``2*2*a*d*s_i^2`` (scores + values, halved when
    causal); the LM head ``2hV`` per token. ``vocab_size`` is the (padded) output width; default
    the vocabulary padded for TP=1. ``num_layers``/``lm_head`` select a pipeline stage's share.
    """
    h, f, d = llm.hidden_size, llm.ffn_hidden_size, llm.head_dim
    q_w, kv_w = llm.num_attention_heads * d, llm.num_query_groups * d
    layers = llm.num_layers if num_layers is None else num_layers
    tokens = sum(int(s) for s in seqlens)
    if vocab_size is None:
        vocab_size = padded_vocab_size(llm.vocab_size, llm.make_vocab_size_divisible_by, 1)
    per_token = 2 * h * (q_w + 2 * kv_w) + 2 * q_w * h + 2 * h * 2 * f + 2 * f * h
    linear = float(layers) * tokens * per_token
    attention = float(layers) * 2 * 2 * q_w * _attention_sq(seqlens, causal)
    head = 2.0 * tokens * h * vocab_size if lm_head else 0.0
    return ForwardFlops(linear, attention, head)


def llm_flops(llm: LLMConfig, seqlens: Sequence[int], vocab_size: Optional[int] = None,
              causal: bool = True, recompute: Optional[str] = None, trainable: bool = True,
              needs_input_grad: bool = True) -> float:
    """Training FLOPs of the LLM on one packed row (see :func:`llm_forward_flops`)."""
    fwd = llm_forward_flops(llm, seqlens, vocab_size, causal)
    return fwd.training(training_passes(trainable, needs_input_grad), recompute)


# ------------------------------------------------------------------------------------------------
# Vision (Qwen2-VL ViT + PatchMerger)
# ------------------------------------------------------------------------------------------------

def _grids(grid_thw) -> list[tuple[int, int, int]]:
    rows = grid_thw.tolist() if hasattr(grid_thw, "tolist") else grid_thw
    out = []
    for g in rows:
        t, hh, ww = (int(x) for x in g)
        if min(t, hh, ww) < 1:
            raise ValueError(f"grid_thw entries must be positive, got {g}")
        out.append((t, hh, ww))
    return out


def vit_forward_flops(vision: VisionConfig, grid_thw, out_hidden: int) -> ForwardFlops:
    """Forward FLOPs of the ViT on items with patch grids ``grid_thw`` (one ``(t, h, w)`` each).

    Patch embedding ``2 * (C*T_p*p*p) * W`` per patch (a Conv3d whose kernel is its stride);
    per block and patch ``2W*3W + 2W*W + 2*2*W*F`` (qkv, proj, fc1, fc2; F = mlp_ratio*W); per
    block and temporal slice of ``n = h*w`` patches ``2*2*W*n^2`` (bidirectional, full square);
    merger per merged token ``2*(4W)*(4W) + 2*(4W)*out_hidden`` (spatial_merge_size 2).
    """
    w = vision.hidden_size
    f = int(vision.hidden_size * vision.mlp_ratio)
    grids = _grids(grid_thw)
    patches = sum(t * hh * ww for t, hh, ww in grids)
    slices_sq = float(sum(t * (hh * ww) ** 2 for t, hh, ww in grids))
    patch_in = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    linear = float(vision.depth) * patches * (2 * w * 3 * w + 2 * w * w + 2 * 2 * w * f)
    attention = float(vision.depth) * 2 * 2 * w * slices_sq
    g = vision.spatial_merge_size ** 2
    merged = patches // g
    merger = 2.0 * merged * (g * w) * (g * w) + 2.0 * merged * (g * w) * out_hidden
    return ForwardFlops(linear, attention, merger, 2.0 * patches * patch_in * w)


def vit_flops(vision: VisionConfig, grid_thw, out_hidden: int, recompute: Optional[str] = None,
              trainable: bool = True) -> float:
    """Training FLOPs of the ViT (its input, pixels, never needs a gradient)."""
    fwd = vit_forward_flops(vision, grid_thw, out_hidden)
    return fwd.training(training_passes(trainable, needs_input_grad=False), recompute)


def vision_llm_tokens(vision: VisionConfig, grid_thw) -> int:
    """LLM positions the items take: ``t*h*w / merge^2`` each."""
    g = vision.spatial_merge_size ** 2
    return sum(t * hh * ww // g for t, hh, ww in _grids(grid_thw))


# ------------------------------------------------------------------------------------------------
# Audio (SAN-M encoder)
# ------------------------------------------------------------------------------------------------

def sanm_forward_flops(audio: AudioConfig, num_frames: Sequence[int] | int) -> ForwardFlops:
    """Forward FLOPs of SAN-M on clips of ``num_frames`` encoder (LFR) frames each.

    Per frame: the first block ``2*in*3d`` (fused qkv from the 560-dim input), the others
    ``2*d*3d``; every block ``2*K*d`` (FSMN depthwise conv over the values), ``2*d*d`` (output
    projection), ``2*2*d*F`` (feed-forward). Per block and clip ``2*2*d*T^2`` (bidirectional
    attention over the clip's T frames).
    """
    frames = [int(num_frames)] if isinstance(num_frames, int) else [int(t) for t in num_frames]
    d, f, k, n_in = audio.hidden_size, audio.ffn_hidden_size, audio.kernel_size, audio.input_size
    total = sum(frames)
    per_frame_rest = 2 * k * d + 2 * d * d + 2 * 2 * d * f
    linear = float(total) * ((audio.num_blocks - 1) * 2 * d * 3 * d
                             + audio.num_blocks * per_frame_rest)
    attention = float(audio.num_blocks) * 2 * 2 * d * sum(t * t for t in frames)
    return ForwardFlops(linear, attention, 0.0, float(total) * 2 * n_in * 3 * d)


def sanm_flops(audio: AudioConfig, num_frames: Sequence[int] | int,
               trainable: bool = True) -> float:
    """Training FLOPs of SAN-M (fbank input, no input gradient; never recomputed)."""
    return sanm_forward_flops(audio, num_frames).training(training_passes(trainable, False))


def audio_llm_tokens(audio: AudioConfig, num_frames: int) -> int:
    """Real (projected) audio tokens of a clip: ``T // frames_per_token``, capped per clip."""
    return min(int(num_frames) // audio.frames_per_token, audio.tokens_per_clip)


# ------------------------------------------------------------------------------------------------
# Projectors and the whole row
# ------------------------------------------------------------------------------------------------

def projector_forward_flops(in_features: int, hidden: int, depth: int, num_tokens: int) -> float:
    """``Linear(in -> hidden)`` + ``(depth-1)`` x ``Linear(hidden -> hidden)`` on ``num_tokens``."""
    return 2.0 * num_tokens * (in_features * hidden + (depth - 1) * hidden * hidden)


@dataclass(frozen=True)
class RowFlops:
    """Training FLOPs of one packed row, per part of the model."""

    llm: float
    vision: float
    audio: float
    projectors: float

    @property
    def total(self) -> float:
        return self.llm + self.vision + self.audio + self.projectors

    def as_dict(self) -> dict:
        return {"llm": self.llm, "vision": self.vision, "audio": self.audio,
                "projectors": self.projectors, "total": self.total}


def omni_row_flops(cfg: OmniConfig | ModelConfig, seqlens: Sequence[int], vision_grids=(),
                   audio_frames: Sequence[int] = (), stage: Optional[StageConfig] = None,
                   recompute: Optional[str] = None, causal: bool = True,
                   vocab_size: Optional[int] = None) -> RowFlops:
    """Training FLOPs of one packed row of the omni model: LLM on ``seqlens`` + ViT on
    ``vision_grids`` + SAN-M on ``audio_frames`` + both projectors.

    What trains comes from ``stage`` (``OmniConfig.stage`` by default; all parts when absent).
    ``recompute`` applies to the LLM and the ViT (both follow ``training.recompute_granularity``);
    leave it None for MFU.
    """
    if isinstance(cfg, OmniConfig):
        stage = stage if stage is not None else cfg.stage
        model = cfg.model
    else:
        model = cfg
    stage = stage or StageConfig()
    llm = model.llm
    grids = _grids(vision_grids) if vision_grids else []
    frames = [int(t) for t in audio_frames]
    if grids and not model.vision.enabled:
        raise ValueError("vision_grids given but model.vision.enabled is false")
    if frames and not model.audio.enabled:
        raise ValueError("audio_frames given but model.audio.enabled is false")

    vis = aud = proj = 0.0
    upstream_trains = False
    if grids:
        out_hidden = model.vision.merger_hidden_size or llm.hidden_size
        vis = vit_flops(model.vision, grids, out_hidden, recompute, stage.train_vision)
        n_tok = vision_llm_tokens(model.vision, grids)
        fwd = projector_forward_flops(out_hidden, llm.hidden_size, model.projector.vision_depth,
                                      n_tok)
        proj += fwd * training_passes(stage.train_projectors, stage.train_vision)
        upstream_trains |= stage.train_vision or stage.train_projectors
    if frames:
        aud = sanm_flops(model.audio, frames, stage.train_audio)
        n_tok = sum(audio_llm_tokens(model.audio, t) for t in frames)
        fwd = projector_forward_flops(model.audio.frames_per_token * model.audio.hidden_size,
                                      llm.hidden_size, model.projector.audio_depth, n_tok)
        proj += fwd * training_passes(stage.train_projectors, stage.train_audio)
        upstream_trains |= stage.train_audio or stage.train_projectors
    lm = llm_flops(llm, seqlens, vocab_size, causal, recompute, stage.train_llm,
                   needs_input_grad=upstream_trains)
    return RowFlops(llm=lm, vision=vis, audio=aud, projectors=proj)
