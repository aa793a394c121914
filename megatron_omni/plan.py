"""Memory and throughput planner: will a layout fit, and how fast will it run?

Given a model config and a parallel layout, :func:`plan` estimates per-GPU memory for every
pipeline stage and a step time; :func:`suggest` searches layouts. ``tools/plan.py`` is the CLI.

Memory per GPU (bytes; t = TP, p = PP, v = VPP, d = DP, c = CP)
-------------------------------------------------------------

* **Weights**: the stage's parameters / t for tensor-parallel matmuls (LLM layers, embedding,
  LM head, the ViT and its merger), whole for replicated ones (norms, projectors, SAN-M),
  at 2 bytes (bf16/fp8 runs) or 4 (fp32; SAN-M is always fp32).
* **Gradients**: megatron-core DDP keeps a persistent main-grad buffer: 4 bytes per trained
  parameter with ``training.grad_reduce_in_fp32`` (the default), else 2. CPU/fp32: 4 (``.grad``,
  kept allocated between steps like the DDP buffer).
* **Optimizer states**: fp32 master copy (4 bytes, only when the weights are 16-bit) + Adam
  moments (8 bytes) per trained parameter, divided by ``d*c`` with the distributed optimizer.
* **FP8 weight cache**: with FP8 GEMMs Transformer Engine caches, for the whole step, the FP8
  copy of every LLM-layer weight and its transpose (Hopper GEMMs need both layouts):
  :data:`FP8_WEIGHT_CACHE_BYTES` per LLM-layer matmul parameter.
* **Activations**: what autograd keeps per micro-batch (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", adapted term by term to our layers, see
  :func:`llm_layer_activation_bytes`), times the micro-batches the pipeline schedule holds at its
  peak (simulated, :func:`inflight_counts`: ``min(m, p - rank)`` for 1F1B, i.e. p on the first
  stage; interleaved: ``(v-1)*p + 2*(p-1-rank) + 1`` model chunks, Korthikanti's
  ``L * (1 + (p-1)/(p*v))`` layers on the first stage). The first stage (first model chunk)
  also holds the ViT, merger, SAN-M and projector activations of each in-flight micro-batch;
  the last holds the final norm and the logits (fp32 softmax kept by the vocab-parallel cross
  entropy, + the 16-bit logits while it runs).
* **Transients**: a full-recompute layer rebuilt during backward (one layer, one micro-batch),
  and a weight gradient that autograd materialises before adding it to the buffer (the largest
  one: local layers always; with Transformer Engine only the embedding, TE and megatron fuse
  the wgrad accumulation elsewhere).
* **Overhead** (GPUs only): :data:`FIXED_OVERHEAD_GIB` for the CUDA context, cuBLAS/TE workspaces
  and NCCL buffers, + :data:`FRAGMENTATION` x (activations + transients) for the caching
  allocator (with ``expandable_segments``; parameters, grads and optimizer states live in
  contiguous DDP/optimizer buffers and do not fragment).

Two activation profiles: ``te`` (GPU, Transformer Engine layers: fused norm+linear, flash
attention, fused SwiGLU; FP8 saves linear inputs in 1 byte) and ``local`` (megatron-core local
layers + our varlen SDPA, what the CPU runs; derived by enumerating the tensors autograd saves,
and checked against a real CPU training step in ``tests/tools/test_plan.py``).

Step time
---------
Per micro-batch and pipeline stage (one GPU):

* compute: the stage's hardware FLOPs (recomputation included, :mod:`training.flops`; LLM /
  (t*c), ViT / t, SAN-M and projectors replicated, the encoders on the first stage, the LM head
  on the last) at ``peak * COMPUTE_EFFICIENCY``;
* exposed TP: :func:`tp_comm_seconds` (sequence-parallel all-gathers / reduce-scatters, and the
  ViT's all-reduces) x :data:`TP_EXPOSED_FRACTION`;
* CP: :func:`cp_comm_seconds` (ring-attention K/V exchange + a fixed cost per ring step);
* pipeline p2p: :func:`p2p_seconds` (2 transfers per model chunk; bytes exposed only without
  interleaving, a fixed overhead per transfer always);
* the LM head's cross entropy: :func:`cross_entropy_seconds` (memory bound, last stage).

The slowest stage sets the pace and the pipeline adds the bubble; then the DP collectives that
the overlap leaves exposed (:func:`dp_exposed_seconds`) and the optimizer step
(:func:`optimizer_seconds`): ``step = (m + (p-1)/v) * t_slowest + dp_exposed + t_optimizer``.
Bandwidths are in :data:`INTERCONNECTS`. Tokens/s, model TFLOP/s and MFU use the *model* FLOPs
(no recomputation). The constants are calibrated on the published Megatron-Core H100 rows in
:data:`CALIBRATION` (``tools/plan.py --calibration``; BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import functools
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .config.loader import load_config
from .config.schema import ConfigError, OmniConfig
from .config.validate import llm_layers_per_stage, padded_vocab_size, validate
from .training.flops import (
    PEAK_FLOPS,
    ForwardFlops,
    audio_llm_tokens,
    llm_forward_flops,
    omni_row_flops,
    projector_forward_flops,
    sanm_forward_flops,
    training_passes,
    vision_llm_tokens,
    vit_forward_flops,
)

GiB = 1024 ** 3
MiB = 1024 ** 2

# ------------------------------------------------------------------------------------------------
# Documented constants
# ------------------------------------------------------------------------------------------------

FIXED_OVERHEAD_GIB = 2.5
"""Per-GPU memory outside PyTorch tensors: CUDA context (~0.5 GiB with lazy module loading),
cuBLAS and Transformer Engine workspaces, NCCL communicator buffers for the TP/PP/DP/CP groups."""

FRAGMENTATION = 0.03
"""Caching-allocator overhead on the dynamic part (activations and transients), with
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` as Megatron-Core's performance recipes use."""

FP8_WEIGHT_CACHE_BYTES = 2
"""Bytes per LLM-layer matmul parameter for TE's cached FP8 weight + its FP8 transpose."""

COMPUTE_EFFICIENCY = {"bf16": 0.438, "fp8": 0.405}
"""Fraction of the dense peak that the layers' arithmetic itself runs at on H100-class GPUs
(GEMMs, flash attention, the memory-bound norms/rotary/SwiGLU in between), *excluding* what
the step model charges separately: exposed TP/CP/DP communication, pipeline transfers and bubble,
the LM head's cross entropy and the optimizer step. Calibrated on the published Megatron-Core /
Megatron-Bridge H100 rows (:data:`CALIBRATION`, BENCHMARKS.md "Planner calibration"); the bf16
value keeps the fp8 / bf16 ratio of the former assumed MFU (0.37 / 0.40), as no bf16 Llama-3 H100
row was found to calibrate it on."""

TP_EXPOSED_FRACTION = 0.1
"""Share of the tensor-parallel collectives (sequence parallel: all-gather / reduce-scatter
around every column / row-parallel GEMM) left on the critical path with Transformer Engine's
userbuffer overlap (``tp_comm_overlap``). No published figure for this fraction was found in the
sources available; 0.3 is the value that makes the TP4 rows of :data:`CALIBRATION` agree with the
TP1 rows at one compute efficiency. Override with ``plan(..., tp_exposed=...)`` /
``tools/plan.py --tp-exposed``."""


@dataclass(frozen=True)
class Interconnect:
    """Bandwidths the communication terms use (bytes/s, achieved NCCL bus bandwidth)."""

    intra_node: float
    """NVLink/NVSwitch inside a node."""
    inter_node: float
    """Per GPU across nodes (one NIC per GPU)."""
    gpus_per_node: int = 8
    p2p_overhead_s: float = 100e-6
    """Fixed cost of one point-to-point step on the critical path (kernel launch, stream sync,
    schedule bookkeeping): charged per pipeline send/recv (per virtual stage boundary and
    micro-batch, even when the bytes are overlapped by the interleaved schedule) and per
    ring-attention step of context parallelism. Fitted: the value at which the published CP2
    row of Llama-3-70B ranks below the PP8 one, as published (BENCHMARKS.md)."""
    hbm: float = 2.6e12
    """Achieved HBM bandwidth for the memory-bound steps (cross entropy, optimizer)."""


INTERCONNECTS: dict[str, Interconnect] = {
    # DGX H100: NVLink 4 (450 GB/s per direction, ~360 GB/s NCCL bus bandwidth), 8 x 400 Gb/s
    # ConnectX-7 (50 GB/s line rate per GPU, ~45 GB/s achieved). HBM3 3.35 TB/s peak.
    "h100": Interconnect(360e9, 45e9, hbm=2.6e12),
    "h200": Interconnect(360e9, 45e9, hbm=3.8e12),
    # DGX A100: NVLink 3 (300 GB/s per direction), 8 x 200 Gb/s HDR.
    "a100": Interconnect(230e9, 22e9, hbm=1.6e12),
}

DEFAULT_GLOBAL_BATCH = 128
"""Packed rows per optimizer step when none is given (Megatron-Core's Llama-3-70B recipe)."""

ADAM_STATE_BYTES = 8
"""Adam first and second moments, fp32."""


@dataclass(frozen=True)
class GPUSpec:
    """A device the planner knows: memory and dense peak FLOP/s per precision."""

    key: str
    name: str
    memory_bytes: Optional[int]
    peak: dict = field(default_factory=dict)


GPUS: dict[str, GPUSpec] = {
    # Memory as the driver reports it (nvidia-smi "MiB" total).
    "h100": GPUSpec("h100", "H100 SXM 80GB", 81559 * MiB, PEAK_FLOPS["h100"]),
    "h200": GPUSpec("h200", "H200 SXM 141GB", 143771 * MiB, PEAK_FLOPS["h200"]),
    "a100": GPUSpec("a100", "A100 SXM 80GB", 81920 * MiB, PEAK_FLOPS["a100"]),
    # fp32 training on the host: memory only (no fit check, no step time).
    "cpu": GPUSpec("cpu", "CPU (host memory)", None, {}),
}

# ------------------------------------------------------------------------------------------------
# Model presets
# ------------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
_VIT = ["model.vision.enabled=true", "model.vision.depth=32", "model.vision.hidden_size=1280",
        "model.vision.num_heads=16", "model.vision.mlp_ratio=4.0"]
_SANM = ["model.audio.enabled=true", "model.audio.input_size=560", "model.audio.hidden_size=512",
         "model.audio.num_heads=4", "model.audio.ffn_hidden_size=2048",
         "model.audio.num_blocks=50"]
_NO_ENCODERS = ["model.vision.enabled=false", "model.audio.enabled=false"]
_LONG = ["data.seq_length=8192"]

PRESETS: dict[str, tuple[str, list[str], str]] = {
    "tiny": ("examples/tiny_llm.yaml", [], "tiny CPU demo LLM"),
    "9b": ("examples/model/llama3_8b.yaml",
           _VIT + ["model.vision.merger_hidden_size=3584"] + _SANM + _LONG,
           "M2-omni 9B: Llama-3.1-8B + Qwen2-VL ViT + SAN-M"),
    "72b": ("examples/model/llama3_70b.yaml",
            _VIT + ["model.vision.merger_hidden_size=8192"] + _SANM + _LONG,
            "M2-omni 72B: Llama-3.3-70B + Qwen2-VL ViT + SAN-M"),
    "llama3-8b": ("examples/model/llama3_8b.yaml",
                  _NO_ENCODERS + ["model.llm.vocab_size=128256"] + _LONG, "Llama-3 8B LLM only"),
    "llama3-70b": ("examples/model/llama3_70b.yaml",
                   _NO_ENCODERS + ["model.llm.vocab_size=128256"] + _LONG,
                   "Llama-3 70B LLM only (the published Megatron-Core anchor)"),
}
"""``--model`` names: (YAML under the repo, overrides, description). The 9b/72b presets add the
full Qwen2-VL ViT (32 x 1280) and SAN-M (50 x 512) to the LLM YAMLs, which only set the LLM."""


def load_model_config(model: Optional[str] = None, config: Optional[str] = None,
                      overrides: Sequence[str] = ()) -> OmniConfig:
    """A preset (``model``) or a YAML file (``config``), then ``key=value`` overrides."""
    if (model is None) == (config is None):
        raise ConfigError("give exactly one of a model preset or a config file")
    if model is not None:
        if model not in PRESETS:
            raise ConfigError(f"unknown model preset {model!r}; known: {sorted(PRESETS)}")
        path, preset_overrides, _ = PRESETS[model]
        return load_config(REPO_ROOT / path, [*preset_overrides, *overrides])
    return load_config(config, list(overrides))


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """A parallel layout and batch shape."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    global_batch: Optional[int] = None
    """Packed rows per optimizer step (all DP ranks); None = about DEFAULT_GLOBAL_BATCH."""
    sequence_parallel: Optional[bool] = None
    """None = on whenever TP > 1."""
    first_stage_num_layers: Optional[int] = None
    recompute: Optional[str] = None
    distributed_optimizer: bool = True
    recompute_num_layers: Optional[int] = None
    """With ``recompute='full'``: only this many layers per model chunk are recomputed
    (megatron-core's ``recompute_method='block'``); None = all of them."""

    def __post_init__(self):
        if self.recompute == "none":
            self.recompute = None
        if self.recompute not in (None, "selective", "full"):
            raise ConfigError(f"recompute must be none|selective|full, got {self.recompute!r}")
        for name in ("tp", "pp", "cp", "dp", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.vpp == 1:
            self.vpp = None
        if self.vpp is not None and self.vpp < 2:
            raise ConfigError("vpp must be >= 2 (or unset)")
        if self.sequence_parallel is None:
            self.sequence_parallel = self.tp > 1
        if self.recompute_num_layers is not None:
            if self.recompute != "full" or self.recompute_num_layers < 0:
                raise ConfigError("recompute_num_layers needs recompute='full' and a count >= 0")
        rows = self.micro_batch_size * self.dp
        if self.global_batch is None:
            self.global_batch = max(1, round(DEFAULT_GLOBAL_BATCH / rows)) * rows
        if self.global_batch % rows:
            raise ConfigError(f"global batch {self.global_batch} is not a multiple of micro batch "
                              f"size x DP = {self.micro_batch_size} x {self.dp}")

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch // (self.micro_batch_size * self.dp)

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp:
            parts.append(f"VPP{self.vpp}")
        parts += [f"CP{self.cp}", f"DP{self.dp}"]
        n = self.num_gpus
        return " ".join(parts) + f" = {n} device{'s' if n != 1 else ''}"


@dataclass
class Workload:
    """What one packed row holds."""

    seq_length: int
    samples_per_row: int = 1
    """Packed samples per row (attention is per sample: sum of s_i^2)."""
    vision_grids: tuple = ()
    """(t, h, w) patch grid of every image/video in a row."""
    audio_frames: tuple = ()
    """Encoder (LFR) frames of every audio clip in a row."""

    def __post_init__(self):
        self.vision_grids = tuple(tuple(int(x) for x in g) for g in self.vision_grids)
        self.audio_frames = tuple(int(t) for t in self.audio_frames)
        if self.seq_length < 1 or not 1 <= self.samples_per_row <= self.seq_length:
            raise ConfigError("need seq_length >= 1 and 1 <= samples_per_row <= seq_length")

    def seqlens(self) -> list[int]:
        n, s = self.samples_per_row, self.seq_length
        return [s // n + (1 if i < s % n else 0) for i in range(n)]

    def describe(self) -> str:
        out = f"{self.samples_per_row} sample(s) in {self.seq_length} tokens"
        if self.vision_grids:
            out += f", {len(self.vision_grids)} image/video item(s) " \
                   f"({sum(t * h * w for t, h, w in self.vision_grids)} patches)"
        if self.audio_frames:
            out += f", {len(self.audio_frames)} audio clip(s) ({sum(self.audio_frames)} frames)"
        return out


def image_grid(height: int, width: int, frames: int = 1, patch_size: int = 14,
               merge: int = 2, temporal_patch_size: int = 2) -> tuple[int, int, int]:
    """(t, h, w) patch grid of an image (frames=1) or a video after rounding each side to the
    nearest multiple of ``patch_size * merge`` (smart_resize without its pixel budget clamps)."""
    factor = patch_size * merge
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    t = max(1, -(-frames // temporal_patch_size))
    return (t, h // patch_size, w // patch_size)


# ------------------------------------------------------------------------------------------------
# Parameter counts
# ------------------------------------------------------------------------------------------------

def llm_layer_params(cfg: OmniConfig) -> tuple[int, int]:
    """(matmul params, norm params) of one LLM layer."""
    llm = cfg.model.llm
    h, f, d = llm.hidden_size, llm.ffn_hidden_size, llm.head_dim
    q_w, kv_w = llm.num_attention_heads * d, llm.num_query_groups * d
    return h * (q_w + 2 * kv_w) + q_w * h + 3 * h * f, 2 * h


def llm_num_params(cfg: OmniConfig, tp: int = 1) -> int:
    """All LLM parameters (embedding padded for ``tp``; output layer unless tied)."""
    llm = cfg.model.llm
    vp = padded_vocab_size(llm.vocab_size, llm.make_vocab_size_divisible_by, tp)
    lin, norms = llm_layer_params(cfg)
    head = vp * llm.hidden_size if llm.untie_embeddings_and_output_weights else 0
    return llm.num_layers * (lin + norms) + vp * llm.hidden_size + head + llm.hidden_size


def vit_params(cfg: OmniConfig) -> tuple[int, int]:
    """(tensor-parallel params, replicated params) of the ViT + merger."""
    v = cfg.model.vision
    if not v.enabled:
        return 0, 0
    w, f = v.hidden_size, int(v.hidden_size * v.mlp_ratio)
    out = v.merger_hidden_size or cfg.model.llm.hidden_size
    g = v.spatial_merge_size ** 2
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * w
    block_tp = 3 * w * w + 3 * w + w * w + w * f + f + f * w  # column biases shard with weights
    block_rep = 4 * w + w + w  # two LayerNorms, row-parallel biases (proj, fc2)
    merger_tp = (g * w) * (g * w) + g * w + (g * w) * out
    merger_rep = 2 * w + out
    return v.depth * block_tp + merger_tp, patch + v.depth * block_rep + merger_rep


def sanm_params(cfg: OmniConfig) -> int:
    """SAN-M encoder parameters (FunASR layout; ``encoders0`` takes the 560-dim input)."""
    a = cfg.model.audio
    if not a.enabled:
        return 0
    d, f, k = a.hidden_size, a.ffn_hidden_size, a.kernel_size

    def block(n_in: int) -> int:
        return (2 * n_in + n_in * 3 * d + 3 * d + d * k + d * d + d + 2 * d
                + d * f + f + f * d + d)

    return block(a.input_size) + (a.num_blocks - 1) * block(d) + 2 * d


def projector_params(in_features: int, hidden: int, depth: int) -> int:
    return in_features * hidden + hidden + (depth - 1) * (hidden * hidden + hidden)


def model_params(cfg: OmniConfig) -> dict[str, int]:
    """Parameters per part (TP=1)."""
    m = cfg.model
    h = m.llm.hidden_size
    vit_tp, vit_rep = vit_params(cfg)
    proj = 0
    if m.vision.enabled:
        proj += projector_params(m.vision.merger_hidden_size or h, h, m.projector.vision_depth)
    if m.audio.enabled:
        proj += projector_params(m.audio.frames_per_token * m.audio.hidden_size, h,
                                 m.projector.audio_depth)
    out = {"llm": llm_num_params(cfg), "vision": vit_tp + vit_rep, "audio": sanm_params(cfg),
           "projectors": proj}
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------------
# Activations per token (bytes)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Numerics:
    """Bytes per element of each kind of state, from the precision."""

    precision: str
    param: int
    act: int
    grad: int
    master: int

    @classmethod
    def of(cls, precision: str, grad_fp32: bool = True) -> "Numerics":
        if precision == "fp32":
            return cls("fp32", 4, 4, 4, 0)
        if precision in ("bf16", "fp8"):
            return cls(precision, 2, 2, 4 if grad_fp32 else 2, 4)
        raise ConfigError(f"precision must be bf16|fp8|fp32, got {precision!r}")


def llm_layer_activation_bytes(cfg: OmniConfig, num: Numerics, impl: str, tp: int, sp: bool,
                               recompute: Optional[str], seqlens: Sequence[int],
                               flash_attention: bool = True) -> tuple[float, float]:
    """(kept bytes per token, bytes per token of one whole layer) for one LLM layer on one GPU.

    Korthikanti et al.'s per-layer count (``34 s b h`` bytes for GPT-3: 11 attention + 19 MLP +
    4 norms, ``+5 a s^2 b`` for unfused attention), redone for a Llama layer with flash attention,
    no dropout, GQA (``q_w = a*d``, ``kv_w = g*d``) and SwiGLU (F):

    * ``te`` bf16: norm inputs and outputs ``4h`` (replicated across TP unless sequence
      parallel) + q, k, v and the attention output ``2 q_w + 2 kv_w`` + SwiGLU input ``2F`` + down
      projection input ``F`` (all / t), times 2 bytes;
    * ``te`` fp8: the same, but the inputs saved by TE's FP8 linears (the two norm outputs, the
      attention output for the out-projection, the down-projection input) take 1 byte:
      ``6h`` replicated + ``5 q_w + 4 kv_w + 5F`` bytes;
    * ``local``: enumerated from autograd's saved tensors: each RMSNorm keeps input, inverse RMS
      and normalised input, each linear its input (``6h + 2``); RoPE ``4d`` (cos/sin of q and k);
      SDPA keeps q and GQA-expanded k, v (``3 q_w``), its output and the reshaped copy
      (``2 q_w``) and the log-sum-exp (a); unfused SwiGLU keeps ``5F``.
    * Unfused attention (``flash_attention=False``) adds the scores and softmax output,
      ``2 a sum(s_i^2) / s`` per token; selective recomputation drops them (with flash attention
      it has nothing to drop: memory unchanged, extra FLOPs).
    * Full recomputation keeps only the layer input (``h``, / t with SP); the whole layer is
      rebuilt, one at a time, during backward (reported as a transient).
    """
    llm = cfg.model.llm
    h, f, d, a = llm.hidden_size, llm.ffn_hidden_size, llm.head_dim, llm.num_attention_heads
    q_w, kv_w = a * d, llm.num_query_groups * d
    ab = num.act
    if impl == "te" and num.precision == "fp8":
        rep, tpart = 6.0 * h, 5.0 * q_w + 4.0 * kv_w + 5.0 * f
    elif impl == "te":
        rep, tpart = 4.0 * h * ab, (2.0 * q_w + 2.0 * kv_w + 3.0 * f) * ab
    elif impl == "local":
        rep, tpart = (6.0 * h + 2 + 4 * d) * ab, (5.0 * q_w + a + 5.0 * f) * ab
    else:
        raise ConfigError(f"impl must be te|local, got {impl!r}")
    scores = 0.0
    if not flash_attention:
        tokens = sum(seqlens)
        scores = 2.0 * a * sum(s * s for s in seqlens) / tokens * ab / tp
    whole = rep / (tp if sp else 1) + tpart / tp + scores
    if recompute == "full":
        return h * ab / (tp if sp else 1), whole
    if recompute == "selective":
        return whole - scores, whole - scores
    return whole, whole


def _vit_patch_bytes(cfg: OmniConfig, num: Numerics, impl: str, tp: int,
                     recompute: Optional[str], flash_attention: bool, grids) -> tuple[float, float]:
    """(kept bytes per patch, one block's bytes per patch) for the whole ViT + merger.

    Per block and patch (enumerated on ``models/vision.py``'s local layers): norm inputs/outputs
    and the residual ``5W`` + rotary ``4d`` + 4 stats replicated; q, k, the fused qkv output and
    the attention output ``6W``, quick_gelu's input, sigmoid and product ``3F``, the lse (heads)
    sharded by TP. TE saves one W less (no reshaped attention-output copy). The merger keeps
    ``2W`` replicated + ``2W`` sharded per patch, the patch embedding its pixel input. The ViT is
    never sequence-parallel and has no FP8.
    """
    v = cfg.model.vision
    w, f, heads = v.hidden_size, int(v.hidden_size * v.mlp_ratio), v.num_heads
    d = w // heads
    ab = num.act
    rep = (5.0 * w + 4 * d + 4) if impl == "local" else (4.0 * w + 4 * d)
    tpart = 6.0 * w + 3.0 * f + heads
    patches = sum(t * hh * ww for t, hh, ww in grids)
    scores = 0.0
    if not flash_attention and recompute not in ("selective", "full"):
        scores = 2.0 * heads * sum(t * (hh * ww) ** 2 for t, hh, ww in grids) / patches / tp
    block = (rep + tpart / tp) * ab + scores * ab
    kept_block = w * ab if recompute == "full" else block
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    merger = (2.0 * w + 2 + 2.0 * w / tp) * ab
    return v.depth * kept_block + merger + patch_in * ab, block


def _sanm_frame_bytes(cfg: OmniConfig) -> float:
    """SAN-M keeps, per frame (fp32, enumerated on ``models/audio.py``): first block
    ``2*560 + 7d + F + 8``, every other block ``9d + F + 8``, the final norm ``d + 3``."""
    a = cfg.model.audio
    d, f = a.hidden_size, a.ffn_hidden_size
    elems = (2 * a.input_size + 7 * d + f + 8) + (a.num_blocks - 1) * (9 * d + f + 8) + d + 3
    return 4.0 * elems


# ------------------------------------------------------------------------------------------------
# Pipeline schedule
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def inflight_counts(pp: int, vpp: Optional[int], m: int, rank: int) -> tuple[tuple[int, ...], ...]:
    """Per model chunk, how many micro-batches' activations pipeline ``rank`` holds right after
    each forward of Megatron-Core's schedule (the candidates for the memory peak; dominated
    candidates dropped).

    1F1B: ``min(m, p - rank - 1)`` warm-up forwards, then one forward + one backward each.
    Interleaved (v chunks): ``(p - rank - 1) * 2 + (v - 1) * p`` warm-up forwards; virtual
    micro-batch k runs chunk ``(k // p) % v`` forward and ``v - 1 - (k // p) % v`` backward
    (megatron.core.pipeline_parallel.schedules, micro-batch groups of size p).
    """
    v = vpp or 1
    total = m * v
    if v == 1:
        warmup = min(m, pp - rank - 1)
    else:
        warmup = min(total, (pp - rank - 1) * 2 + (v - 1) * pp)
    held = [0] * v
    cands: list[tuple[int, ...]] = []
    f = b = 0
    while f < total:
        held[(f // pp) % v] += 1
        f += 1
        cands.append(tuple(held))
        if f > warmup:
            held[v - 1 - (b // pp) % v] -= 1
            b += 1
    keep = []
    for c in sorted(set(cands), key=sum, reverse=True):
        if not any(all(x <= y for x, y in zip(c, k)) for k in keep):
            keep.append(c)
    return tuple(keep)


# ------------------------------------------------------------------------------------------------
# Step-time terms (seconds; each checked against a hand computation in tests/tools/test_plan.py)
# ------------------------------------------------------------------------------------------------

def tp_comm_seconds(tokens: float, hidden: int, tp: int, sp: bool, layers: int,
                    recomputed_layers: int, bandwidth: float, act_bytes: int = 2) -> float:
    """Tensor-parallel collectives of ``layers`` LLM layers for one micro-batch on one GPU.

    Sequence parallel: per layer, forward all-gathers the input of the QKV and FC1 GEMMs and
    reduce-scatters the outputs of the out-projection and FC2 (4 collectives); backward
    all-gathers the two row-parallel output gradients, reduce-scatters the two column-parallel
    input gradients and all-gathers the two column-parallel inputs again for the weight gradients
    (6). Each moves ``(t-1)/t`` of the ``tokens x hidden`` activation per GPU. A fully
    recomputed layer repeats its 4 forward ones. Without SP: 2 forward + 2 backward all-reduces
    of twice that volume (the same 8 units) + 2 per recomputed layer.
    """
    if tp <= 1 or layers <= 0:
        return 0.0
    unit = (tp - 1) / tp * tokens * hidden * act_bytes
    if sp:
        count = 10 * layers + 4 * recomputed_layers
    else:
        count = 8 * layers + 4 * recomputed_layers
    return count * unit / bandwidth


def cp_comm_seconds(tokens: float, kv_width: int, cp: int, layers: int, bandwidth: float,
                    act_bytes: int = 2, overhead_s: float = 0.0, exposed: float = 1.0) -> float:
    """Ring attention's K/V exchange for one micro-batch on one GPU: per layer ``cp-1`` steps
    each passing the local K and V (``2 * kv_width`` per token of the local ``tokens``) forward,
    and K, V plus their gradients backward (twice that). ``exposed`` of the bytes' time is
    charged, plus ``overhead_s`` per step (a P2P exchange and a separate attention kernel)."""
    if cp <= 1 or layers <= 0:
        return 0.0
    per_step = 2 * kv_width * tokens * act_bytes
    steps = layers * 3 * (cp - 1)
    return steps * (exposed * per_step / bandwidth + overhead_s)


def p2p_seconds(tokens: float, hidden: int, tp: int, sp: bool, vpp: Optional[int],
                bandwidth: float, overhead_s: float) -> float:
    """Pipeline transfers on the critical path of one stage for one micro-batch.

    Each model chunk receives its input activation (``tokens x hidden`` bf16, / t with SP)
    forward and its gradient backward: ``2v`` transfers. 1F1B without interleaving sends and
    receives blocking (``batch_p2p_comm``): bytes / bandwidth + the fixed overhead each. The
    interleaved schedule overlaps the bytes with compute (``overlap_p2p_comm``); the fixed
    overhead per transfer stays, which is what makes very deep interleaving (one layer per
    virtual stage) lose to fewer, larger chunks.
    """
    v = vpp or 1
    size = tokens * hidden * 2 / (tp if sp else 1)
    per = overhead_s + (0.0 if v > 1 else size / bandwidth)
    return 2 * v * per


def dp_comm_seconds(params: float, dp: int, grad_bytes: int, param_bytes: int,
                    distributed_optimizer: bool, bandwidth: float) -> tuple[float, float]:
    """(gradient reduction, parameter all-gather) seconds per step for ``params`` trained
    parameters on one GPU over a data-parallel group of ``dp`` (DP x CP) ranks (ring: each GPU
    moves ``(n-1)/n`` of the buffer per collective). Distributed optimizer: reduce-scatter of
    the gradients + all-gather of the updated 16-bit parameters; without it one all-reduce
    (twice the reduce-scatter volume) and no gather."""
    if dp <= 1 or params <= 0:
        return 0.0, 0.0
    frac = (dp - 1) / dp
    if distributed_optimizer:
        return params * grad_bytes * frac / bandwidth, params * param_bytes * frac / bandwidth
    return 2 * params * grad_bytes * frac / bandwidth, 0.0


def dp_exposed_seconds(reduce_s: float, gather_s: float, chunks: int, backward_window_s: float,
                       forward_window_s: float) -> float:
    """What the overlapped DP communication leaves exposed. Megatron-Core buckets it by layer
    (no PP) or by virtual pipeline stage (PP): the reduce-scatter of a bucket starts when its
    last backward ends, so the last bucket is always exposed, and the rest only hides if it fits
    in the remaining backward of the step's last micro-batch (the parameter all-gather likewise
    in the first forward). PP without interleaving has one bucket: all exposed."""
    chunks = max(1, chunks)
    rs = max(reduce_s / chunks, reduce_s - backward_window_s)
    ag = max(gather_s / chunks, gather_s - forward_window_s)
    return rs + ag


CROSS_ENTROPY_PASSES = 3
"""Memory passes over the fp32 logits in the vocab-parallel cross entropy (max/sum-exp
reductions and softmax forward, the gradient write backward)."""

OPTIMIZER_BYTES_PER_PARAM = 30
"""Adam step per (sharded) parameter: read fp32 grad, master, m, v (16 B), write master, m, v
(12 B), write the bf16 parameter (2 B)."""


def cross_entropy_seconds(tokens: float, vocab_per_gpu: int, hbm: float) -> float:
    return tokens * vocab_per_gpu * 4.0 * CROSS_ENTROPY_PASSES / hbm


def optimizer_seconds(params_per_gpu: float, hbm: float) -> float:
    return params_per_gpu * OPTIMIZER_BYTES_PER_PARAM / hbm


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    """One pipeline rank's per-GPU memory (bytes) and work per micro-batch."""

    rank: int
    llm_layers: int
    has_encoders: bool
    has_embedding: bool
    has_lm_head: bool
    params: int
    weights: float
    gradients: float
    optimizer: float
    fp8_weight_cache: float
    activations: float
    inflight: list
    transient: float
    overhead: float
    flops_per_micro_batch: float
    """Hardware FLOPs one GPU of this stage runs per micro-batch (recomputation included)."""
    trained_params: float = 0.0
    """Parameters on one GPU of this stage that train (what the DP collectives move)."""
    times: dict = field(default_factory=dict)
    """Seconds per micro-batch (compute, tp, cp, p2p, cross_entropy) and per step (dp,
    optimizer) of this stage; empty where no step time is estimated."""

    @property
    def micro_batch_time(self) -> float:
        t = self.times
        return sum(t.get(k, 0.0) for k in ("compute", "tp", "cp", "p2p", "cross_entropy"))

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.fp8_weight_cache
                + self.activations + self.transient + self.overhead)

    def as_dict(self) -> dict:
        g = lambda x: round(x / GiB, 3)  # noqa: E731
        return {"rank": self.rank, "llm_layers": self.llm_layers,
                "encoders": self.has_encoders, "embedding": self.has_embedding,
                "lm_head": self.has_lm_head, "params_per_gpu": self.params,
                "weights_gib": g(self.weights), "gradients_gib": g(self.gradients),
                "optimizer_gib": g(self.optimizer),
                "fp8_weight_cache_gib": g(self.fp8_weight_cache),
                "activations_gib": g(self.activations), "inflight_per_chunk": list(self.inflight),
                "transient_gib": g(self.transient), "overhead_gib": g(self.overhead),
                "total_gib": g(self.total),
                "tflops_per_micro_batch": round(self.flops_per_micro_batch / 1e12, 4),
                "seconds": {k: round(v, 6) for k, v in self.times.items()}}


@dataclass
class Plan:
    """Result of :func:`plan`."""

    model: str
    gpu: GPUSpec
    precision: str
    impl: str
    layout: Layout
    workload: Workload
    params: dict
    stages: list
    row_flops: dict
    model_flops_per_step: float
    assumed_mfu: Optional[float]
    step_time: Optional[float]
    bubble_fraction: float
    warnings: list
    mix: list = field(default_factory=list)
    """With :func:`plan_mix`: (weight, label) of every row type averaged into the step time."""

    @property
    def peak_stage(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def peak_bytes(self) -> float:
        return self.peak_stage.total

    @property
    def fits(self) -> Optional[bool]:
        if self.gpu.memory_bytes is None:
            return None
        return self.peak_bytes <= self.gpu.memory_bytes

    @property
    def stage_imbalance(self) -> float:
        """Slowest stage's work over the mean stage's (1.0 = balanced pipeline)."""
        work = [s.flops_per_micro_batch for s in self.stages]
        mean = sum(work) / len(work)
        return max(work) / mean if mean else 1.0

    @property
    def tokens_per_step(self) -> int:
        return self.layout.global_batch * self.workload.seq_length

    @property
    def tokens_per_s_per_gpu(self) -> Optional[float]:
        if not self.step_time:
            return None
        return self.tokens_per_step / self.step_time / self.layout.num_gpus

    @property
    def tflops_per_gpu(self) -> Optional[float]:
        if not self.step_time:
            return None
        return self.model_flops_per_step / self.step_time / self.layout.num_gpus / 1e12

    @property
    def mfu(self) -> Optional[float]:
        if not self.step_time or self.precision not in self.gpu.peak:
            return None
        return self.tflops_per_gpu * 1e12 / self.gpu.peak[self.precision]

    def as_dict(self) -> dict:
        lay = asdict(self.layout)
        lay.update(num_gpus=self.layout.num_gpus, num_micro_batches=self.layout.num_micro_batches)
        peak = self.peak_stage
        opt = lambda x, n=3: None if x is None else round(x, n)  # noqa: E731
        return {
            "model": self.model,
            "params": self.params,
            "gpu": {"key": self.gpu.key, "name": self.gpu.name,
                    "memory_gib": opt(self.gpu.memory_bytes and self.gpu.memory_bytes / GiB),
                    "peak_tflops": opt(self.gpu.peak.get(self.precision, 0) / 1e12 or None)},
            "precision": self.precision,
            "impl": self.impl,
            "layout": lay,
            "workload": {**asdict(self.workload), "seqlens": self.workload.seqlens()},
            "memory": {"stages": [s.as_dict() for s in self.stages],
                       "peak_stage": peak.rank, "peak_gib": round(peak.total / GiB, 3),
                       "fits": self.fits},
            "throughput": {
                "row_flops": self.row_flops,
                "model_flops_per_step": self.model_flops_per_step,
                "assumed_mfu": self.assumed_mfu,
                "bubble_fraction": round(self.bubble_fraction, 5),
                "stage_imbalance": round(self.stage_imbalance, 4),
                "step_time_s": opt(self.step_time, 4),
                "tokens_per_s_per_gpu": opt(self.tokens_per_s_per_gpu, 1),
                "model_tflops_per_gpu": opt(self.tflops_per_gpu, 1),
                "mfu": opt(self.mfu, 4)},
            "assumptions": {"fixed_overhead_gib": FIXED_OVERHEAD_GIB,
                            "fragmentation": FRAGMENTATION,
                            "fp8_weight_cache_bytes": FP8_WEIGHT_CACHE_BYTES,
                            "compute_efficiency": COMPUTE_EFFICIENCY,
                            "tp_exposed_fraction": TP_EXPOSED_FRACTION},
            "warnings": list(self.warnings),
        }


def _resolved_cfg(cfg: OmniConfig, layout: Layout, workload: Workload, precision: str,
                  impl: str) -> OmniConfig:
    """A copy of ``cfg`` that says what the layout says, for :func:`validate`."""
    c = copy.deepcopy(cfg)
    p, t, d = c.parallel, c.training, c.data
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = layout.tp, layout.pp
    p.virtual_pipeline_model_parallel_size, p.context_parallel_size = layout.vpp, layout.cp
    p.sequence_parallel = bool(layout.sequence_parallel)
    p.first_stage_num_layers = layout.first_stage_num_layers
    t.fp8 = "hybrid" if precision == "fp8" else None
    t.bf16 = precision != "fp32"
    t.use_distributed_optimizer = layout.distributed_optimizer
    t.recompute_granularity = layout.recompute
    t.num_micro_batches = layout.num_micro_batches
    d.modalities = ["text"]
    d.seq_length, d.micro_batch_size = workload.seq_length, layout.micro_batch_size
    c.model.transformer_impl = "transformer_engine" if impl == "te" else "local"
    return c


def _stage_layers(cfg: OmniConfig, layout: Layout) -> list[list[int]]:
    """LLM layers per (rank, chunk)."""
    per_rank = llm_layers_per_stage(cfg.model.llm.num_layers, layout.pp,
                                    layout.first_stage_num_layers, layout.vpp)
    v = layout.vpp or 1
    return [[n // v] * v for n in per_rank]


def plan(cfg: OmniConfig, layout: Layout, workload: Optional[Workload] = None, gpu: str = "h100",
         precision: str = "bf16", impl: Optional[str] = None, assumed_mfu: Optional[float] = None,
         flash_attention: bool = True, model_name: str = "custom", check: bool = True,
         memory_gib: Optional[float] = None, tp_exposed: Optional[float] = None,
         trainable: bool = True) -> Plan:
    """Per-GPU memory of every pipeline stage and the estimated step time of ``layout``.

    ``gpu='cpu'`` with ``precision='fp32'`` is the CPU mode: fp32 weights/activations, plain
    ``torch.optim.Adam`` (no master copy, not distributed), the local layer profile and no CUDA
    overhead; it exists so the estimate can be checked against a real CPU step.
    ``trainable=False`` plans a layout megatron-core runs but this project cannot train yet
    (context parallelism; used for the published calibration rows).
    """
    if gpu not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)}")
    spec = GPUS[gpu]
    if memory_gib is not None:
        spec = GPUSpec(spec.key, f"{spec.name} ({memory_gib:g} GiB)", int(memory_gib * GiB),
                       spec.peak)
    on_cpu = gpu == "cpu"
    impl = impl or ("local" if on_cpu else "te")
    if precision == "fp8" and impl != "te":
        raise ConfigError("fp8 needs the Transformer Engine profile (impl te)")
    if precision == "fp8" and "fp8" not in spec.peak and not on_cpu:
        raise ConfigError(f"{spec.name} has no FP8 tensor cores; use bf16")
    workload = workload or Workload(cfg.data.seq_length)
    if check:
        validate(_resolved_cfg(cfg, layout, workload, precision, impl), world_size=layout.num_gpus,
                 training=trainable)
    if workload.seq_length % layout.cp:
        raise ConfigError(f"seq length {workload.seq_length} is not divisible by CP={layout.cp}")

    m_cfg, llm, stage_cfg = cfg.model, cfg.model.llm, cfg.stage
    grad_fp32 = bool(getattr(cfg.training, "grad_reduce_in_fp32", True))
    num = Numerics.of(precision, grad_fp32)
    tp, pp, cp, v = layout.tp, layout.pp, layout.cp, layout.vpp or 1
    sp = bool(layout.sequence_parallel)
    shard = layout.dp * cp if layout.distributed_optimizer else 1
    mb, m = layout.micro_batch_size, layout.num_micro_batches
    seqlens = workload.seqlens()
    tokens = workload.seq_length / cp * mb
    grids, frames = list(workload.vision_grids), list(workload.audio_frames)
    warnings: list[str] = []

    # Media sanity: the row must hold the media's LLM tokens.
    media_tokens = 0
    if grids:
        if not m_cfg.vision.enabled:
            raise ConfigError("the workload has images/videos but model.vision.enabled is false")
        media_tokens += vision_llm_tokens(m_cfg.vision, grids) + 2 * len(grids)
    if frames:
        if not m_cfg.audio.enabled:
            raise ConfigError("the workload has audio but model.audio.enabled is false")
        media_tokens += (m_cfg.audio.tokens_per_clip + 2) * len(frames)
    if media_tokens > workload.seq_length:
        raise ConfigError(f"the row's media take {media_tokens} LLM tokens, more than the "
                          f"sequence length {workload.seq_length}")

    # What trains (a frozen part has weights only).
    train_llm, train_vit = stage_cfg.train_llm, stage_cfg.train_vision
    train_aud, train_proj = stage_cfg.train_audio, stage_cfg.train_projectors

    def state_bytes(n: float, trains: bool, fp32_param: bool = False) -> tuple[float, float, float]:
        pb = 4 if fp32_param else num.param
        if not trains:
            return n * pb, 0.0, 0.0
        gb = 4 if fp32_param else num.grad
        master = 0 if pb == 4 else num.master
        return n * pb, n * gb, n * (master + ADAM_STATE_BYTES) / shard

    # Parameters.
    vp = padded_vocab_size(llm.vocab_size, llm.make_vocab_size_divisible_by, tp)
    h = llm.hidden_size
    lin, norms = llm_layer_params(cfg)
    biggest_layer_weight = h * max(2 * llm.ffn_hidden_size,
                                   (llm.num_attention_heads + 2 * llm.num_query_groups)
                                   * llm.head_dim)
    vit_tp, vit_rep = vit_params(cfg)
    out_hidden = m_cfg.vision.merger_hidden_size or h
    vproj = projector_params(out_hidden, h, m_cfg.projector.vision_depth) \
        if m_cfg.vision.enabled else 0
    aproj = projector_params(m_cfg.audio.frames_per_token * m_cfg.audio.hidden_size, h,
                             m_cfg.projector.audio_depth) if m_cfg.audio.enabled else 0
    n_sanm = sanm_params(cfg)

    # Activation bytes per token / item.
    kept_layer, whole_layer = llm_layer_activation_bytes(
        cfg, num, impl, tp, sp, layout.recompute, seqlens, flash_attention)
    block = layout.recompute_num_layers  # None: every layer as `layout.recompute` says
    kept_plain = llm_layer_activation_bytes(cfg, num, impl, tp, sp, None, seqlens,
                                            flash_attention)[0]
    if impl == "te":
        head_act = 2.0 * h * num.act / (tp if sp else 1)
    else:
        head_act = (3.0 * h + 1) * num.act / (tp if sp else 1)
    logits_act = vp / tp * (4.0 + (num.act if num.act < 4 else 0))
    enc_act = 0.0  # per micro-batch, first chunk of rank 0
    vit_block_transient = 0.0
    if grids and train_vit:
        kept, block = _vit_patch_bytes(cfg, num, impl, tp, layout.recompute, flash_attention,
                                       grids)
        patches = sum(t * hh * ww for t, hh, ww in grids)
        enc_act += kept * patches * mb
        if layout.recompute == "full":
            vit_block_transient = block * patches * mb
    if grids and (train_vit or train_proj):
        vis_tokens = vision_llm_tokens(m_cfg.vision, grids)
        enc_act += (out_hidden + 2 * (m_cfg.projector.vision_depth - 1) * h + h) \
            * num.act * vis_tokens * mb
    if frames and train_aud:
        enc_act += _sanm_frame_bytes(cfg) * sum(frames) * mb
    if frames and (train_aud or train_proj):
        aud_tokens = sum(audio_llm_tokens(m_cfg.audio, t) for t in frames)
        enc_act += (m_cfg.audio.frames_per_token * m_cfg.audio.hidden_size + 2 * h) \
            * num.act * aud_tokens * mb
    needs_llm_acts = train_llm or ((grids or frames) and (train_proj or train_vit or train_aud))

    # FLOPs (hardware, per row) of one LLM layer, the LM head and the encoders.
    upstream = bool((grids and (train_vit or train_proj)) or (frames and (train_aud or train_proj)))
    llm_passes = training_passes(train_llm, upstream)
    one_layer = llm_forward_flops(llm, seqlens, vp, num_layers=1, lm_head=False)
    layer_flops = one_layer.training(llm_passes, layout.recompute)
    layer_flops_plain = one_layer.training(llm_passes, None)

    def chunk_layer_cost(n: int, full_cost: float, plain_cost: float) -> float:
        """n layers of one model chunk, the first ``recompute_num_layers`` fully recomputed."""
        if block is None:
            return n * full_cost
        k = min(block, n)
        return k * full_cost + (n - k) * plain_cost
    head_flops = ForwardFlops(other=2.0 * workload.seq_length * h * vp).training(llm_passes)
    enc_flops = 0.0
    if grids:
        enc_flops += vit_forward_flops(m_cfg.vision, grids, out_hidden).training(
            training_passes(train_vit, False), layout.recompute) / tp
        enc_flops += projector_forward_flops(out_hidden, h, m_cfg.projector.vision_depth,
                                             vision_llm_tokens(m_cfg.vision, grids)) \
            * training_passes(train_proj, train_vit)
    if frames:
        enc_flops += sanm_forward_flops(m_cfg.audio, frames).training(
            training_passes(train_aud, False))
        enc_flops += projector_forward_flops(
            m_cfg.audio.frames_per_token * m_cfg.audio.hidden_size, h, m_cfg.projector.audio_depth,
            sum(audio_llm_tokens(m_cfg.audio, t) for t in frames)) \
            * training_passes(train_proj, train_aud)

    layers = _stage_layers(cfg, layout)
    stages: list[StagePlan] = []
    for r in range(pp):
        first, last = r == 0, r == pp - 1
        n_layers = sum(layers[r])
        has_enc = first and (m_cfg.vision.enabled or m_cfg.audio.enabled)
        # Memory of the states.
        groups = [(n_layers * lin / tp, train_llm, False), (n_layers * norms, train_llm, False)]
        if first:
            groups.append((vp * h / tp, train_llm, False))
        if last and (llm.untie_embeddings_and_output_weights or pp > 1):
            groups.append((vp * h / tp, train_llm, False))
        if last:
            groups.append((h, train_llm, False))
        if first and m_cfg.vision.enabled:
            groups += [(vit_tp / tp + vit_rep, train_vit, False), (vproj, train_proj, False)]
        if first and m_cfg.audio.enabled:
            groups += [(n_sanm, train_aud, True), (aproj, train_proj, False)]
        weights = grads = optim = 0.0
        params = trained = 0.0
        for n, trains, fp32_param in groups:
            wb, gb, ob = state_bytes(n, trains, fp32_param)
            weights, grads, optim, params = weights + wb, grads + gb, optim + ob, params + n
            trained += n if trains else 0.0
        fp8_cache = n_layers * lin / tp * FP8_WEIGHT_CACHE_BYTES if precision == "fp8" else 0.0

        # Activations: per chunk bytes x the schedule's in-flight counts.
        chunk_bytes = []
        for c, n in enumerate(layers[r]):
            b = chunk_layer_cost(n, kept_layer, kept_plain) * tokens if needs_llm_acts else 0.0
            if first and c == 0:
                b += enc_act
            if last and c == v - 1:
                b += (head_act + logits_act) * tokens
            chunk_bytes.append(b)
        best, best_counts = 0.0, ()
        for counts in inflight_counts(pp, layout.vpp, m, r):
            val = sum(k * b for k, b in zip(counts, chunk_bytes))
            if val >= best:
                best, best_counts = val, counts
        # Transients.
        transient = 0.0
        if layout.recompute == "full" and needs_llm_acts and n_layers:
            transient += whole_layer * tokens
        if first:
            transient += vit_block_transient
        if impl == "te":
            if first and train_llm:
                transient += vp * h / tp * num.param
        else:
            biggest = max([vp * h / tp if (first or last) else 0.0,
                           biggest_layer_weight / tp if n_layers else 0.0])
            if train_llm:
                transient += biggest * num.grad
        overhead = 0.0 if on_cpu else FIXED_OVERHEAD_GIB * GiB + FRAGMENTATION * (best + transient)

        flops = sum(chunk_layer_cost(n, layer_flops, layer_flops_plain)
                    for n in layers[r]) / (tp * cp) * mb
        if last:
            flops += head_flops / (tp * cp) * mb
        if has_enc:
            flops += enc_flops * mb
        stages.append(StagePlan(r, n_layers, has_enc, first, last, int(params), weights, grads,
                                optim, fp8_cache, best, list(best_counts), transient, overhead,
                                flops, trained))

    # Throughput.
    row = omni_row_flops(cfg, seqlens, grids, frames, vocab_size=vp)
    model_flops = row.total * layout.global_batch
    bubble = (pp - 1) / (v * m)
    step_time = None
    mfu_used = None
    if precision in spec.peak:
        mfu_used = assumed_mfu if assumed_mfu is not None \
            else COMPUTE_EFFICIENCY.get(precision, 0.35)
        rate = spec.peak[precision] * mfu_used
        net = INTERCONNECTS.get(gpu, INTERCONNECTS["h100"])
        f_tp = TP_EXPOSED_FRACTION if tp_exposed is None else tp_exposed
        node = net.gpus_per_node
        tp_bw = net.intra_node if tp <= node else net.inter_node
        cp_bw = net.intra_node if tp * cp <= node else net.inter_node
        dp_n = layout.dp * cp
        dp_bw = net.intra_node if tp * dp_n <= node else net.inter_node
        pp_bw = net.intra_node if tp * dp_n * pp <= node else net.inter_node
        kv_w = llm.num_query_groups * llm.head_dim
        for s_ in stages:
            chunk_layers = layers[s_.rank]
            recomputed = 0
            if layout.recompute == "full":
                recomputed = sum(n if block is None else min(block, n) for n in chunk_layers)
            t_c = s_.flops_per_micro_batch / rate
            times = {"compute": t_c,
                     "tp": f_tp * tp_comm_seconds(tokens, h, tp, sp, s_.llm_layers, recomputed,
                                                  tp_bw, 2),
                     "cp": cp_comm_seconds(tokens, kv_w, cp, s_.llm_layers, cp_bw, 2,
                                           net.p2p_overhead_s, f_tp),
                     "p2p": p2p_seconds(tokens, h, tp, sp, layout.vpp, pp_bw,
                                        net.p2p_overhead_s) if pp > 1 else 0.0,
                     "cross_entropy": cross_entropy_seconds(tokens, vp // tp, net.hbm)
                     if s_.has_lm_head else 0.0}
            if s_.has_encoders and grids and tp > 1:
                # the ViT is tensor parallel without SP: 2 + 2 all-reduces per block
                patches = sum(t * hh * ww for t, hh, ww in grids) * mb
                times["tp"] += f_tp * tp_comm_seconds(patches, m_cfg.vision.hidden_size, tp,
                                                      False, m_cfg.vision.depth, 0, tp_bw, 2)
            rs, ag = dp_comm_seconds(s_.trained_params, dp_n, num.grad, num.param,
                                     layout.distributed_optimizer, dp_bw)
            chunks = s_.llm_layers if pp == 1 else v
            # Window: the backward (forward) work left after the first bucket is final: the
            # last micro-batch's backward without PP; the interleaved cool-down (as many chunk
            # backwards as the warm-up had forwards) with VPP; nothing for plain 1F1B.
            if pp == 1:
                bwd_win, fwd_win = t_c * 2 / 3, t_c / 3
            elif v > 1:
                steps = min(m * v, (pp - 1 - s_.rank) * 2 + (v - 1) * pp)
                bwd_win, fwd_win = steps * t_c * 2 / 3 / v, steps * t_c / 3 / v
            else:
                bwd_win = fwd_win = 0.0
            times["dp"] = dp_exposed_seconds(rs, ag, chunks, bwd_win, fwd_win)
            times["optimizer"] = optimizer_seconds(s_.trained_params / shard, net.hbm)
            s_.times = times
        slowest = max(s_.micro_batch_time for s_ in stages)
        step_time = (m + (pp - 1) / v) * slowest + max(s_.times["dp"] + s_.times["optimizer"]
                                                       for s_ in stages)

    result = Plan(model_name, spec, precision, impl, layout, workload, model_params(cfg), stages,
                  row.as_dict(), model_flops, mfu_used, step_time, bubble, warnings)
    if spec.memory_bytes is not None:
        peak = result.peak_stage
        cap = spec.memory_bytes
        if peak.total > cap:
            warnings.append(
                f"DOES NOT FIT: pipeline stage {peak.rank} needs {peak.total / GiB:.1f} GiB per "
                f"GPU, more than the {cap / GiB:.1f} GiB of an {spec.name} (over by "
                f"{(peak.total - cap) / GiB:.1f} GiB). Try more TP/PP, recompute=full, the "
                f"distributed optimizer with more DP, or --suggest.")
        elif peak.total > 0.92 * cap:
            warnings.append(f"tight: stage {peak.rank} uses {peak.total / cap:.0%} of GPU memory; "
                            f"the estimate is not exact, leave some headroom")
    if pp > 1 and m < pp:
        warnings.append(f"only {m} micro-batches for {pp} pipeline stages: most of the pipeline "
                        f"idles; raise the global batch")
    return result


# ------------------------------------------------------------------------------------------------
# A recipe's data mix: rows per modality group, encoder work on the first stage
# ------------------------------------------------------------------------------------------------

DEFAULT_MIX_SAMPLES = """Stated per-sample defaults without a prepared dataset (uniform draws):
text 200-8000 tokens; image: one image of 100-2560 LLM tokens + 34-94 text/template tokens;
video: 16 frames (8 temporal patches) of 1024-6144 LLM tokens in all + 24-74 tokens; audio: one
clip of 5-15 s (256 LLM tokens) + 24-74 tokens; interleaved: 3 images of 256-1024 tokens each +
200-1000 text tokens."""


def _grid_for_tokens(tokens: int, frames: int = 1) -> tuple[int, int, int]:
    """A near-square (t, h, w) pre-merge patch grid holding about ``tokens`` LLM tokens."""
    t = max(1, frames // 2)
    per = max(1, round(tokens / t))
    a = max(1, round(per ** 0.5))
    b = max(1, round(per / a))
    return (t, 2 * a, 2 * b)


def default_samples(modality: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` sample descriptors of ``modality`` drawn from :data:`DEFAULT_MIX_SAMPLES`.
    Each: ``num_tokens``, ``grids`` (pre-merge (t, h, w)), ``audio_frames`` (SAN-M frames)."""
    from .training.flops import audio_encoder_frames
    rng = random.Random(f"{seed}-{modality}")
    out = []
    for _ in range(n):
        grids: list = []
        frames: list = []
        if modality == "text":
            tokens = rng.randint(200, 8000)
        elif modality == "image":
            grids = [_grid_for_tokens(rng.randint(100, 2560))]
            tokens = rng.randint(34, 94)
        elif modality == "video":
            grids = [_grid_for_tokens(rng.randint(1024, 6144), frames=16)]
            tokens = rng.randint(24, 74)
        elif modality == "audio":
            frames = [audio_encoder_frames(rng.uniform(5.0, 15.0))]
            tokens = 258 + rng.randint(24, 74)
        elif modality == "interleaved":
            grids = [_grid_for_tokens(rng.randint(256, 1024)) for _ in range(3)]
            tokens = rng.randint(200, 1000)
        else:
            raise ConfigError(f"unknown modality {modality!r}")
        tokens += sum(t * h * w // 4 + 2 for t, h, w in grids)
        out.append({"num_tokens": tokens, "grids": grids, "audio_frames": frames})
    return out


def dataset_samples(path: str | Path, modality: str, limit: int = 2000) -> list[dict]:
    """Descriptors of up to ``limit`` training samples of one modality, read from the per-sample
    JSON that ``tools/preprocess_data.py`` stored in the shards (``<path>/<modality>/train-*.tar``;
    no media is decoded): ``num_tokens``, ``image_grid_thw`` + ``video_grid_thw``, and
    ``audio_num_samples`` (16 kHz) turned into SAN-M frames."""
    import json
    import tarfile

    from .training.flops import audio_encoder_frames
    shards = sorted((Path(path) / modality).glob("train-*.tar"))
    if not shards:
        raise ConfigError(f"no training shards under {Path(path) / modality}; give the "
                          f"tools/preprocess_data.py output directory (data.path)")
    out: list[dict] = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.name.endswith(".json") or "." in member.name[:-5].rsplit("/", 1)[-1]:
                    continue
                d = json.load(tar.extractfile(member))
                grids = [tuple(g) for g in (d.get("image_grid_thw") or [])]
                grids += [tuple(g) for g in (d.get("video_grid_thw") or [])]
                frames = [audio_encoder_frames(n / 16000.0)
                          for n in (d.get("audio_num_samples") or [])]
                out.append({"num_tokens": int(d["num_tokens"]), "grids": grids,
                            "audio_frames": frames})
                if len(out) >= limit:
                    return out
    return out


def recipe_workloads(cfg: OmniConfig, data_path: str | Path | None = None,
                     rows_per_modality: int = 2, samples: int = 512,
                     seed: int = 0) -> list[tuple[float, Workload, str]]:
    """(weight, row, label) for the rows a recipe's step is made of.

    Every modality group of ``data.modalities`` gets the same micro-batches per step; in a
    non-text group ``data.pure_text_ratio`` of them are pure text. Each group's samples (from the
    dataset when ``data_path`` is given, else :data:`DEFAULT_MIX_SAMPLES`) are packed with the
    project's packer under the recipe's budgets; the rows, sorted by vision patches + audio
    frames, are represented by ``rows_per_modality`` quantile rows of equal weight.
    """
    from .data.packing import PackingConfig, SampleInfo, pack_samples
    d = cfg.data
    mods = list(d.modalities)
    pcfg = PackingConfig(d.seq_length, d.max_images_per_row, d.max_vision_patches_per_row,
                         truncate_text=True)
    text_share = d.pure_text_ratio if len(mods) > 1 else 0.0
    groups: list[tuple[float, str]] = []
    for m in mods:
        if m == "text":
            groups.append((1.0 / len(mods), "text"))
        else:
            groups.append(((1.0 - text_share) / len(mods), m))
            if text_share:
                groups.append((text_share / len(mods), "text"))
    rows_of: dict[str, list[Workload]] = {}
    out: list[tuple[float, Workload, str]] = []
    for weight, m in groups:
        if m not in rows_of:
            descs = dataset_samples(data_path, m, samples) if data_path is not None \
                else default_samples(m, samples, seed)
            infos = [SampleInfo(i, x["num_tokens"], len(x["grids"]),
                                sum(t * h * w for t, h, w in x["grids"]),
                                "text" if m == "text" else m) for i, x in enumerate(descs)]
            packed = pack_samples(infos, pcfg)
            rows = []
            for row in packed.rows:
                ids = [int(i) for i in row.sample_ids]
                grids = [g for i in ids for g in descs[i]["grids"]]
                frames = [f for i in ids for f in descs[i]["audio_frames"]]
                rows.append(Workload(d.seq_length, max(1, len(ids)), tuple(grids),
                                     tuple(frames)))
            if not rows:
                raise ConfigError(f"no {m} sample fits a row of {d.seq_length} tokens")
            rows.sort(key=lambda w: (sum(t * h * ww for t, h, ww in w.vision_grids)
                                     + sum(w.audio_frames), w.samples_per_row))
            k = min(rows_per_modality, len(rows))
            rows_of[m] = [rows[min(len(rows) - 1, int((j + 0.5) * len(rows) / k))]
                          for j in range(k)]
        reps = rows_of[m]
        out += [(weight / len(reps), w, m) for w in reps]
    return out


def stress_workloads(cfg: OmniConfig) -> list[Workload]:
    """The heaviest rows a recipe must survive (memory only): text; a row of 896x896 images (4 in
    8K-token rows = 16K patches, 3 in shorter rows); the largest video (32 frames of 532x532,
    ~5.8K tokens; 8K rows only); a row full of 15-s audio clips (28 in 8K rows, 14 in 4K)."""
    from .training.flops import audio_encoder_frames
    d, v = cfg.data, cfg.model.vision
    long = d.seq_length >= 8192
    grid = functools.partial(image_grid, patch_size=v.patch_size, merge=v.spatial_merge_size,
                             temporal_patch_size=v.temporal_patch_size)
    out = [Workload(d.seq_length)]
    if v.enabled:
        n = 4 if long else 3
        out.append(Workload(d.seq_length, n, (grid(896, 896, 1),) * n))
        if long:
            out.append(Workload(d.seq_length, 1, (grid(532, 532, 32),)))
    if cfg.model.audio.enabled:
        n = 28 if long else 14
        out.append(Workload(d.seq_length, n, (), (audio_encoder_frames(15.0),) * n))
    return out


def plan_mix(cfg: OmniConfig, layout: Layout, workloads: Sequence[tuple[float, Workload, str]],
             gpu: str = "h100", precision: str = "bf16",
             memory_workloads: Sequence[Workload] = (), **kwargs) -> Plan:
    """:func:`plan` over the row types of a step (:func:`recipe_workloads`).

    Memory is the worst row type's (every row must fit), ``memory_workloads`` (e.g.
    :func:`stress_workloads`) included. Per stage, the time per micro-batch is
    the weighted mean over row types (the encoder work on the first stage follows the mix); the
    step is then composed as in :func:`plan`. Row-to-row variance within a step is not modelled.
    """
    if not workloads:
        raise ConfigError("plan_mix needs at least one row type")
    plans = [plan(cfg, layout, w, gpu, precision, check=(i == 0), **kwargs)
             for i, (_, w, _) in enumerate(workloads)]
    total = sum(wt for wt, _, _ in workloads)
    extra = [plan(cfg, layout, w, gpu, precision, check=False, **kwargs)
             for w in memory_workloads]
    base = max(plans + extra, key=lambda p: p.peak_bytes)
    mix = [(round(wt / total, 4), label) for wt, _, label in workloads]
    if base.step_time is None:
        return replace(base, mix=mix)
    stages = []
    for r, st in enumerate(base.stages):
        times = {k: sum(wt * p.stages[r].times[k] for (wt, _, _), p in zip(workloads, plans))
                 / total for k in st.times}
        flops = sum(wt * p.stages[r].flops_per_micro_batch
                    for (wt, _, _), p in zip(workloads, plans)) / total
        stages.append(replace(st, times=times, flops_per_micro_batch=flops))
    pp, v = layout.pp, layout.vpp or 1
    step = (layout.num_micro_batches + (pp - 1) / v) * max(s.micro_batch_time for s in stages) \
        + max(s.times["dp"] + s.times["optimizer"] for s in stages)
    model_flops = sum(wt * p.model_flops_per_step
                      for (wt, _, _), p in zip(workloads, plans)) / total
    return replace(base, stages=stages, step_time=step, model_flops_per_step=model_flops, mix=mix)


def balanced_first_stage_layers(cfg: OmniConfig, layout: Layout,
                                workloads: Sequence[tuple[float, Workload, str]],
                                gpu: str = "h100", precision: str = "bf16") -> Optional[int]:
    """LLM layers for the first pipeline stage so that its time per micro-batch (its layers +
    the encoders at the mix) matches the other stages' (``(L - f) / (p - 1)`` layers each):
    ``f = (L - (p-1) * t_enc / t_layer) / p``, rounded to a value that leaves the rest evenly
    divisible (and at least one layer). None without PP, VPP or encoders."""
    llm = cfg.model.llm
    pp = layout.pp
    if pp == 1 or layout.vpp or not (cfg.model.vision.enabled or cfg.model.audio.enabled):
        return None
    even = replace(layout, first_stage_num_layers=None)
    p = plan_mix(cfg, even, workloads, gpu, precision)
    s0, s1 = p.stages[0], p.stages[1]
    per_layer = s1.micro_batch_time / max(1, s1.llm_layers)
    enc = s0.micro_batch_time - s0.llm_layers * per_layer
    ideal = (llm.num_layers - (pp - 1) * max(0.0, enc) / per_layer) / pp
    ok = [f for f in range(1, llm.num_layers) if (llm.num_layers - f) % (pp - 1) == 0]
    return min(ok, key=lambda f: (abs(f - ideal), f))


def recipe_layout(cfg: OmniConfig, num_gpus: int) -> Layout:
    """The layout a stage recipe runs at on ``num_gpus`` GPUs: its parallel / training / data
    settings; global batch = modality groups x ``training.num_micro_batches`` x micro batch x DP
    (every group gets that many micro-batches per DP rank and step)."""
    par, tr, d = cfg.parallel, cfg.training, cfg.data
    tp, pp, cp = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                  par.context_parallel_size)
    if num_gpus % (tp * pp * cp):
        raise ConfigError(f"{num_gpus} GPUs is not a multiple of TP*PP*CP = {tp * pp * cp}")
    dp = num_gpus // (tp * pp * cp)
    gb = len(d.modalities) * tr.num_micro_batches * d.micro_batch_size * dp
    return Layout(tp, pp, par.virtual_pipeline_model_parallel_size, cp, dp, d.micro_batch_size,
                  gb, par.sequence_parallel, par.first_stage_num_layers,
                  tr.recompute_granularity, tr.use_distributed_optimizer or True)


RECIPE_HEADROOM = 0.9
"""A recipe's heaviest rows (:func:`stress_workloads`) must stay under this share of GPU memory
(the planner's estimate is not exact)."""


def check_recipe(cfg: OmniConfig, num_gpus: int, data_path: str | Path | None = None,
                 top: int = 5, gpu: str = "h100",
                 headroom: float = RECIPE_HEADROOM) -> tuple[Plan, list[Plan]]:
    """(the recipe's own plan, the best layouts) on ``num_gpus`` GPUs: throughput over the
    recipe's row mix (:func:`recipe_workloads`), memory over the mix and the heaviest rows
    (:func:`stress_workloads`) within ``headroom`` of the GPU, at the recipe's global batch and
    precision. The recipe's own plan is judged on the same memory limit."""
    precision = "fp8" if cfg.training.fp8 else "bf16"
    work = recipe_workloads(cfg, data_path)
    stress = stress_workloads(cfg)
    lay = recipe_layout(cfg, num_gpus)
    cap = headroom * GPUS[gpu].memory_bytes / GiB
    own = plan_mix(cfg, lay, work, gpu, precision, stress, model_name=cfg.stage.name,
                   memory_gib=cap)
    best = suggest(cfg, None, gpu, precision, lay.micro_batch_size, lay.global_batch, lay.cp,
                   num_gpus, top, workloads=work, memory_workloads=stress,
                   model_name=cfg.stage.name, memory_gib=cap)
    return own, best


# ------------------------------------------------------------------------------------------------
# Calibration against published Megatron-Core throughput
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PublishedRow:
    """One published pre-training throughput row (H100 SXM, seq 8192, micro batch 1)."""

    model: str
    source: str
    precision: str
    num_gpus: int
    global_batch: int
    tp: int
    pp: int
    cp: int
    vpp: Optional[int]
    tokens_per_s_per_gpu: float
    recompute_num_layers: Optional[int] = None
    in_tolerance: bool = True
    """False for rows the planner is not held to (the reason is in ``note``)."""
    note: str = ""


_MB = "Megatron-Bridge docs/performance-summary{,-archive}.md"
CALIBRATION: tuple[PublishedRow, ...] = (
    PublishedRow("llama3-8b", f"{_MB}, 25.11 container", "fp8", 8, 128, 1, 1, 1, None, 14451,
                 recompute_num_layers=5,
                 note="FSDP; recipe recomputes 5 of 32 layers (full, block)"),
    PublishedRow("llama3-8b", f"{_MB}, 25.09 container", "fp8", 8, 128, 1, 1, 1, None, 14079,
                 recompute_num_layers=5, note="FSDP; same recipe"),
    PublishedRow("llama3-70b", f"{_MB}, 25.09 container", "fp8", 64, 128, 4, 8, 1, 5, 1619),
    PublishedRow("llama3-70b", f"{_MB}, 25.11 container", "fp8", 64, 128, 4, 8, 1, 5, 1602),
    PublishedRow("llama3-70b", f"{_MB}, 26.02 container", "fp8", 64, 256, 4, 8, 1, 5, 1621),
    PublishedRow("llama3-70b", "NeMo docs/source/performance/performance_summary.md, 24.07",
                 "fp8", 64, 128, 4, 4, 2, 5, 1533),
    PublishedRow("llama3-8b", "NeMo docs/source/performance/performance_summary.md, 24.07",
                 "fp8", 8, 128, 1, 1, 2, None, 12036, in_tolerance=False,
                 note="older container (24.07); the planner has no term that makes CP2 cost "
                      "17% at 8K tokens for an 8B model"),
)
"""Every H100 Llama-3 8B / 70B pre-training row found in the published Megatron-Core /
Megatron-Bridge / NeMo performance summaries (all FP8; no BF16 Llama-3 H100 row was found)."""

CALIBRATION_TOLERANCE = 0.10


def calibration_table(tp_exposed: Optional[float] = None) -> list[dict]:
    """Planner vs every :data:`CALIBRATION` row: tokens/s/GPU and the relative error."""
    out = []
    for row in CALIBRATION:
        cfg = load_model_config(row.model)
        dp = row.num_gpus // (row.tp * row.pp * row.cp)
        lay = Layout(row.tp, row.pp, row.vpp, row.cp, dp, 1, row.global_batch,
                     recompute="full" if row.recompute_num_layers else None,
                     recompute_num_layers=row.recompute_num_layers)
        # Published rows of megatron-core's own trainer: CP rows are modelled although this
        # project refuses to train CP > 1 until its packed rows are sliced per CP rank.
        p = plan(cfg, lay, Workload(8192), "h100", row.precision, model_name=row.model,
                 tp_exposed=tp_exposed, trainable=False)
        est = p.tokens_per_s_per_gpu
        out.append({"row": row, "layout": lay.describe(), "planned": est,
                    "published": row.tokens_per_s_per_gpu,
                    "error": est / row.tokens_per_s_per_gpu - 1.0})
    return out


def format_calibration(rows: Sequence[dict]) -> str:
    lines = [f"{'model':<11} {'prec':<5} {'layout':<32} {'GBS':>4} {'published':>10} "
             f"{'planned':>9} {'error':>7}  source"]
    for r in rows:
        row = r["row"]
        flag = "" if row.in_tolerance else " (not held to tolerance)"
        lines.append(f"{row.model:<11} {row.precision:<5} {r['layout']:<32} "
                     f"{row.global_batch:>4} {r['published']:>10,.0f} {r['planned']:>9,.0f} "
                     f"{r['error']:>+7.1%}  {row.source}{flag}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Search
# ------------------------------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def suggest(cfg: OmniConfig, workload: Optional[Workload] = None, gpu: str = "h100",
            precision: str = "bf16", micro_batch_size: int = 1, global_batch: int = 128,
            cp: int = 1, num_gpus: Optional[int] = None, top: int = 5,
            tps: Iterable[int] = (1, 2, 4, 8), max_pp: int = 32,
            recomputes: Iterable[Optional[str]] = (None, "selective", "full"),
            assumed_mfu: Optional[float] = None, model_name: str = "custom",
            memory_gib: Optional[float] = None,
            workloads: Optional[Sequence[tuple[float, Workload, str]]] = None,
            memory_workloads: Sequence[Workload] = ()) -> list[Plan]:
    """Layouts that fit, best estimated throughput first.

    Searched: TP in ``tps``, PP dividing the layer count (<= ``max_pp``), no VPP or any VPP that
    divides the layers per stage, a smaller first stage when encoders are present (no VPP),
    ``recomputes``; distributed optimizer on, SP on with TP > 1, CP as given. Without
    ``num_gpus`` each layout gets the smallest DP that fits (DP must divide the global batch in
    micro-batches) and only layouts at the smallest fitting GPU count are returned; with
    ``num_gpus`` DP is what that count leaves. With ``workloads`` (:func:`recipe_workloads`)
    every layout is planned over the recipe's row mix (:func:`plan_mix`), and the first-stage
    sizes tried include the one that balances the encoders' cost at that mix
    (:func:`balanced_first_stage_layers`).
    """
    workload = workload or Workload(cfg.data.seq_length)
    llm = cfg.model.llm
    n_layers = llm.num_layers
    has_enc = cfg.model.vision.enabled or cfg.model.audio.enabled
    if global_batch % micro_batch_size:
        raise ConfigError("global batch must be a multiple of the micro batch size")
    rows = global_batch // micro_batch_size
    found: list[Plan] = []
    for tp in tps:
        for pp in [p for p in _divisors(n_layers) if p <= max_pp]:
            if num_gpus is not None:
                if num_gpus % (tp * pp * cp):
                    continue
                dps = [num_gpus // (tp * pp * cp)]
                if rows % dps[0]:
                    continue
            else:
                dps = _divisors(rows)
            options: list[tuple[Optional[int], Optional[int]]] = [(None, None)]
            if pp > 1:
                options += [(vv, None) for vv in _divisors(n_layers // pp) if vv >= 2]
                if has_enc:
                    # The first stage also runs the encoders (give it fewer layers) but the last
                    # runs the LM head (sometimes the heavier one): the nearest sizes each way.
                    even = n_layers // pp
                    ok = [f for f in range(1, n_layers) if (n_layers - f) % (pp - 1) == 0]
                    firsts = [f for f in ok if f < even][-2:] + [f for f in ok if f > even][:1]
                    if workloads:
                        # with a row mix (and its memory-heavy rows) a first stage much lighter
                        # than even may be what fits: try up to 8 lighter sizes as well
                        light = [f for f in ok if f < even]
                        step_ = max(1, len(light) // 8)
                        firsts += [f for f in light[::step_] if f not in firsts]
                        try:
                            bal = balanced_first_stage_layers(
                                cfg, Layout(tp, pp, None, cp, dps[0], micro_batch_size,
                                            global_batch), workloads, gpu, precision)
                        except ConfigError:
                            bal = None
                        if bal is not None and bal not in firsts:
                            firsts.append(bal)
                    options += [(None, f) for f in firsts]
            for vpp, first in options:
                for rec in recomputes:
                    def attempt(dp: int) -> Optional[Plan]:
                        try:
                            lay = Layout(tp, pp, vpp, cp, dp, micro_batch_size, global_batch,
                                         first_stage_num_layers=first, recompute=rec)
                            if workloads:
                                return plan_mix(cfg, lay, workloads, gpu, precision,
                                                memory_workloads, assumed_mfu=assumed_mfu,
                                                model_name=model_name, memory_gib=memory_gib)
                            return plan(cfg, lay, workload, gpu, precision,
                                        assumed_mfu=assumed_mfu, model_name=model_name,
                                        memory_gib=memory_gib)
                        except ConfigError:
                            return None

                    # Memory does not grow with DP: binary search the smallest DP that fits.
                    lo, hi, best = 0, len(dps) - 1, None
                    while lo <= hi:
                        mid = (lo + hi) // 2
                        p = attempt(dps[mid])
                        if p is not None and p.fits:
                            best, hi = p, mid - 1
                        else:
                            lo = mid + 1
                    if best is not None:
                        found.append(best)
    if not found:
        return []
    if num_gpus is None:
        smallest = min(p.layout.num_gpus for p in found)
        found = [p for p in found if p.layout.num_gpus == smallest]
    found.sort(key=lambda p: (-(p.tokens_per_s_per_gpu or 0.0), p.peak_bytes))
    return found[:top]


# ------------------------------------------------------------------------------------------------
# Text output
# ------------------------------------------------------------------------------------------------

def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def format_plan(p: Plan) -> str:
    """A readable report of one plan."""
    lay, w = p.layout, p.workload
    pr = p.params
    lines = [
        f"model      {p.model}: LLM {pr['llm'] / 1e9:.2f}B, ViT {pr['vision'] / 1e9:.3f}B, "
        f"SAN-M {pr['audio'] / 1e9:.3f}B, projectors {pr['projectors'] / 1e9:.3f}B "
        f"(total {pr['total'] / 1e9:.2f}B)",
        f"hardware   {p.gpu.name}, {p.precision}, {p.impl} layers",
        f"layout     {lay.describe()}; SP {'on' if lay.sequence_parallel else 'off'}, "
        f"distributed optimizer {'on' if lay.distributed_optimizer else 'off'}, "
        f"recompute {lay.recompute or 'none'}"
        + (f", first stage {lay.first_stage_num_layers} LLM layers"
           if lay.first_stage_num_layers is not None else ""),
        f"batch      micro batch {lay.micro_batch_size} x {lay.num_micro_batches} micro-batches x "
        f"DP {lay.dp} = global batch {lay.global_batch} rows of {w.seq_length} tokens",
        f"row        {w.describe()}",
        "",
    ]
    shown = {0, p.peak_stage.rank, len(p.stages) - 1}
    stages = [s for s in p.stages if s.rank in shown]
    # Column width from the widest cell, and always a space between columns (long in-flight
    # lists of two stages used to run together: "...0/02/2/...").
    width = max([9] + [len("/".join(str(c) for c in s.inflight)) for s in stages])
    lines.append(f"{'per-GPU memory (GiB)':<28}"
                 + "".join(f" {'stage ' + str(s.rank):>{width}}" for s in stages))

    def row(label, fn):
        lines.append(f"{label:<28}" + "".join(f" {fn(s):>{width}}" for s in stages))

    row("  LLM layers", lambda s: str(s.llm_layers) + ("+enc" if s.has_encoders else ""))
    row("  weights", lambda s: _gib(s.weights).strip())
    row("  gradients", lambda s: _gib(s.gradients).strip())
    row("  optimizer states", lambda s: _gib(s.optimizer).strip())
    if p.precision == "fp8":
        row("  fp8 weight cache", lambda s: _gib(s.fp8_weight_cache).strip())
    row("  activations", lambda s: _gib(s.activations).strip())
    row("    in flight (per chunk)", lambda s: "/".join(str(c) for c in s.inflight) or "0")
    row("  transients", lambda s: _gib(s.transient).strip())
    if p.gpu.memory_bytes is not None:
        row("  overhead", lambda s: _gib(s.overhead).strip())
    row("  total", lambda s: _gib(s.total).strip())
    lines.append("")
    peak = p.peak_stage
    if p.fits is None:
        lines.append(f"peak       {peak.total / GiB:.2f} GiB (stage {peak.rank}); no device limit")
    else:
        cap = p.gpu.memory_bytes
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(f"peak       {peak.total / GiB:.2f} GiB on stage {peak.rank} of "
                     f"{cap / GiB:.2f} GiB ({peak.total / cap:.0%}): {verdict}")
    if p.step_time:
        lines += [
            f"step       {p.step_time:.4g} s estimated (compute efficiency {p.assumed_mfu:.3f} of "
            f"{p.gpu.peak[p.precision] / 1e12:.0f} TFLOP/s {p.precision}, pipeline bubble "
            f"(PP-1)/(VPP*m) = {p.bubble_fraction:.1%}, slowest stage {p.stage_imbalance:.3f}x "
            f"the mean)",
            f"throughput {p.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
            f"{p.tflops_per_gpu:,.0f} model TFLOP/s/GPU, MFU {p.mfu:.1%} "
            f"({p.model_flops_per_step / lay.global_batch / w.seq_length / 1e9:.4g} GFLOP/token)",
        ]
        slow = max(p.stages, key=lambda s: s.micro_batch_time)
        t = slow.times
        ms = lambda k: f"{t.get(k, 0.0) * 1e3:.2f}"  # noqa: E731
        lines.append(
            f"stage {slow.rank} per micro-batch (ms): compute {ms('compute')}, exposed TP "
            f"{ms('tp')}, CP {ms('cp')}, pipeline p2p {ms('p2p')}, cross entropy "
            f"{ms('cross_entropy')}; per step: exposed DP {ms('dp')}, optimizer "
            f"{ms('optimizer')}")
    for msg in p.warnings:
        lines.append(f"WARNING: {msg}")
    return "\n".join(lines)


def format_suggestions(plans: Sequence[Plan]) -> str:
    """A table of :func:`suggest` results."""
    if not plans:
        return "no layout fits; try another GPU, a shorter sequence or a smaller micro batch"
    head = (f"{'GPUs':>5} {'TP':>3} {'PP':>3} {'VPP':>4} {'CP':>3} {'DP':>4} {'1st':>4} "
            f"{'recompute':>10} {'peak GiB':>9} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6}")
    lines = [head]
    for p in plans:
        lay = p.layout
        first = "-" if lay.first_stage_num_layers is None else lay.first_stage_num_layers
        lines.append(
            f"{lay.num_gpus:>5} {lay.tp:>3} {lay.pp:>3} {lay.vpp or '-':>4} {lay.cp:>3} "
            f"{lay.dp:>4} {first:>4} "
            f"{lay.recompute or 'none':>10} {p.peak_bytes / GiB:>9.2f} "
            f"{(p.tokens_per_s_per_gpu or 0):>10,.0f} {(p.tflops_per_gpu or 0):>8,.0f} "
            f"{(p.mfu or 0):>6.1%}")
    return "\n".join(lines)
