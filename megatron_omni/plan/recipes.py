"""A stage recipe's own layout, and the check that it is close to the best one."""

from __future__ import annotations

from pathlib import Path

from ..config.schema import ConfigError, OmniConfig
from .core import Plan
from .hardware import GPUS, GiB
from .inputs import Layout
from .mix import plan_mix, recipe_workloads, stress_workloads
from .search import suggest


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
