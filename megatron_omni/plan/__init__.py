"""Memory and throughput planner: will a layout fit, and how fast will it run?

Given a model config and a parallel layout, :func:`plan` estimates per-GPU memory for every
pipeline stage and a step time; :func:`suggest` searches layouts. ``tools/plan.py`` is the CLI.

The package (every public name is re-exported here: ``from megatron_omni.plan import plan``):

* ``hardware``: GPUs, interconnect bandwidths and the documented constants;
* ``inputs``: model presets, :class:`Layout`, :class:`Workload` (what a packed row holds);
* ``counts``: parameter counts; ``memory``: activation bytes and the in-flight micro-batches;
* ``schedule``: the step-time terms (TP, CP, pipeline p2p, DP, cross entropy, optimizer) and
  how a stage's time and the step are composed;
* ``core``: :func:`plan`, in named steps, and its result (:class:`Plan`, :class:`StagePlan`);
* ``mix``: a recipe's row mix (:func:`recipe_workloads`, :func:`plan_mix`, the first stage's
  balanced size); ``search``: :func:`suggest`; ``recipes``: :func:`check_recipe`;
* ``calibration``: the published rows; ``report``: the text output.

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
  on the last) at ``peak * COMPUTE_EFFICIENCY`` of the run's precision; in FP8 runs the LLM's
  attention products and the encoders (no FP8 there) at the bf16 rate;
* exposed TP: :func:`tp_comm_seconds` (sequence-parallel all-gathers / reduce-scatters, and the
  ViT's all-reduces) x :data:`TP_EXPOSED_FRACTION`;
* CP: :func:`cp_seconds` (megatron-core's ring attention over the load-balanced ``2c`` chunks:
  the K/V and dK/dV exchange where the ring step's attention does not hide it, the per-step
  attention kernels at :data:`CP_ATTENTION_EFFICIENCY`, the partial-result merges, a fixed cost
  per extra ring step);
* pipeline p2p: :func:`p2p_seconds` (2 transfers per model chunk; bytes exposed only without
  interleaving, a fixed overhead per transfer always);
* the LM head's cross entropy: :func:`cross_entropy_seconds` (memory bound, last stage).

The slowest stage sets the pace and the pipeline adds the bubble; then the DP collectives that
the overlap leaves exposed (:func:`dp_exposed_seconds`) and the optimizer step
(:func:`optimizer_seconds`): ``step = (m + (p-1)/v) * t_slowest + dp_exposed + t_optimizer``.
Bandwidths are in :data:`INTERCONNECTS`. Tokens/s, model TFLOP/s and MFU use the *model* FLOPs
(no recomputation). Fitted constants (stated as such where they are defined): the fp8 compute
efficiency, :data:`TP_EXPOSED_FRACTION`, :data:`CP_ATTENTION_EFFICIENCY` and the fixed cost per
point-to-point step; they are calibrated on the published Megatron-Core H100 rows in
:data:`CALIBRATION` (``tools/plan.py --calibration``; BENCHMARKS.md).
"""

from __future__ import annotations

from .calibration import (
    CALIBRATION,
    CALIBRATION_TOLERANCE,
    PublishedRow,
    calibration_table,
)
from .core import (
    Plan,
    StagePlan,
    plan,
)
from .counts import (
    llm_layer_params,
    llm_num_params,
    model_params,
    projector_params,
    sanm_params,
    vit_params,
)
from .hardware import (
    ADAM_STATE_BYTES,
    COMPUTE_EFFICIENCY,
    DEFAULT_GLOBAL_BATCH,
    FIXED_OVERHEAD_GIB,
    FP8_WEIGHT_CACHE_BYTES,
    FRAGMENTATION,
    GPUS,
    INTERCONNECTS,
    TP_EXPOSED_FRACTION,
    GiB,
    GPUSpec,
    Interconnect,
    MiB,
)
from .inputs import (
    PRESETS,
    REPO_ROOT,
    Layout,
    Workload,
    image_grid,
    load_model_config,
)
from .memory import (
    Numerics,
    inflight_counts,
    llm_layer_activation_bytes,
)
from .mix import (
    DEFAULT_MIX_SAMPLES,
    balanced_first_stage_layers,
    dataset_samples,
    default_samples,
    plan_mix,
    recipe_workloads,
    stress_workloads,
)
from .recipes import (
    RECIPE_HEADROOM,
    check_recipe,
    recipe_layout,
)
from .report import (
    format_calibration,
    format_plan,
    format_suggestions,
)
from .schedule import (
    CP_ATTENTION_EFFICIENCY,
    CP_CORRECTION_BYTES,
    CROSS_ENTROPY_PASSES,
    OPTIMIZER_BYTES_PER_PARAM,
    CPTerms,
    Links,
    cp_seconds,
    cross_entropy_seconds,
    dp_comm_seconds,
    dp_exposed_seconds,
    optimizer_seconds,
    p2p_seconds,
    stage_times,
    step_seconds,
    tp_comm_seconds,
)
from .search import (
    suggest,
)

__all__ = [
    "ADAM_STATE_BYTES",
    "CALIBRATION",
    "CALIBRATION_TOLERANCE",
    "COMPUTE_EFFICIENCY",
    "CROSS_ENTROPY_PASSES",
    "DEFAULT_GLOBAL_BATCH",
    "DEFAULT_MIX_SAMPLES",
    "FIXED_OVERHEAD_GIB",
    "FP8_WEIGHT_CACHE_BYTES",
    "FRAGMENTATION",
    "GPUS",
    "GPUSpec",
    "GiB",
    "INTERCONNECTS",
    "Interconnect",
    "Layout",
    "Links",
    "MiB",
    "Numerics",
    "OPTIMIZER_BYTES_PER_PARAM",
    "PRESETS",
    "Plan",
    "PublishedRow",
    "RECIPE_HEADROOM",
    "REPO_ROOT",
    "StagePlan",
    "TP_EXPOSED_FRACTION",
    "Workload",
    "balanced_first_stage_layers",
    "calibration_table",
    "check_recipe",
    "CPTerms",
    "CP_ATTENTION_EFFICIENCY",
    "CP_CORRECTION_BYTES",
    "cp_seconds",
    "cross_entropy_seconds",
    "dataset_samples",
    "default_samples",
    "dp_comm_seconds",
    "dp_exposed_seconds",
    "format_calibration",
    "format_plan",
    "format_suggestions",
    "image_grid",
    "inflight_counts",
    "llm_layer_activation_bytes",
    "llm_layer_params",
    "llm_num_params",
    "load_model_config",
    "model_params",
    "optimizer_seconds",
    "p2p_seconds",
    "plan",
    "plan_mix",
    "projector_params",
    "recipe_layout",
    "recipe_workloads",
    "sanm_params",
    "stage_times",
    "step_seconds",
    "stress_workloads",
    "suggest",
    "tp_comm_seconds",
    "vit_params",
]
