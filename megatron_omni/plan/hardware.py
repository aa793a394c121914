"""Hardware and the documented constants of the planner: GPUs, interconnects, efficiencies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..training.flops import PEAK_FLOPS

GiB = 1024 ** 3
MiB = 1024 ** 2


FIXED_OVERHEAD_GIB = 2.5
"""Per-GPU memory outside PyTorch tensors: CUDA context (~0.5 GiB with lazy module loading),
cuBLAS and Transformer Engine workspaces, NCCL communicator buffers for the TP/PP/DP/CP groups."""

FRAGMENTATION = 0.03
"""Caching-allocator overhead on the dynamic part (activations and transients), with
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` as Megatron-Core's performance recipes use."""

FP8_WEIGHT_CACHE_BYTES = 2
"""Bytes per LLM-layer matmul parameter for TE's cached FP8 weight + its FP8 transpose."""

COMPUTE_EFFICIENCY = {"bf16": 0.438, "fp8": 0.45}
"""Fraction of the dense peak of the run's precision that the layers' arithmetic itself runs at
on H100-class GPUs (GEMMs, flash attention, the memory-bound norms/rotary/SwiGLU in between),
*excluding* what the step model charges separately: exposed TP/CP/DP communication, pipeline
transfers and bubble, the LM head's cross entropy and the optimizer step. In an FP8 run only the
linear layers run in FP8 (Transformer Engine's FP8 recipe; dot-product attention stays bf16, the
encoders have no FP8): the LLM's attention products and the encoders run at the bf16 peak x the
bf16 value (:attr:`StagePlan.sixteen_bit_flops`). The fp8 value is fitted on the published
Megatron-Core / Megatron-Bridge H100 rows (:data:`CALIBRATION`, BENCHMARKS.md "Planner
calibration"); the bf16 value (433 TFLOP/s on an H100, also the attention rate of FP8 runs) keeps
the fp8 / bf16 ratio of the former assumed MFU (0.37 / 0.40) and is not calibrated: no bf16
Llama-3 H100 row was found."""

TP_EXPOSED_FRACTION = 0.1
"""Share of the tensor-parallel collectives (sequence parallel: all-gather / reduce-scatter
around every column / row-parallel GEMM) left on the critical path with Transformer Engine's
userbuffer overlap (``tp_comm_overlap``). No published figure for this fraction was found in the
sources available; 0.1 is a fitted value: with it the TP4 rows of :data:`CALIBRATION` (70B) agree
with the TP1 rows (8B) at one compute efficiency (all within 3%). Override with
``plan(..., tp_exposed=...)`` / ``tools/plan.py --tp-exposed``."""


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
    micro-batch, even when the bytes are overlapped by the interleaved schedule) and per extra
    ring-attention step of context parallelism. Fitted, not measured: first fitted on the 70B
    CP2 / PP8 ranking, which the CP model now gets from its kernel term
    (:data:`schedule.CP_ATTENTION_EFFICIENCY`); kept as the cost that makes one layer per
    virtual stage (VPP 40 for 80 layers on PP2) lose to fewer, larger chunks."""
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
