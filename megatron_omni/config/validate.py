"""Cross-section validation, run before any process group starts.

Each check names the fields involved and what to change, so a bad 72B launch fails in a second on
the login node instead of after minutes of NCCL initialisation.
"""

from __future__ import annotations

from typing import Optional

from .schema import ConfigError, OmniConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocabulary padded to a multiple of ``divisible_by * tp`` (Megatron's rule)."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def llm_layers_per_stage(num_layers: int, pp: int, first_stage: Optional[int], vpp: Optional[int]
                         ) -> list[int]:
    """LLM layers on each pipeline stage (the first may carry fewer, it holds the encoders)."""
    if pp == 1:
        return [num_layers]
    if first_stage is None:
        return [num_layers // pp] * pp
    rest = num_layers - first_stage
    return [first_stage] + [rest // (pp - 1)] * (pp - 1)


def wandb_available() -> bool:
    """Whether ``import wandb`` would find the package (without importing it: it is slow)."""
    import importlib.util
    import sys

    if "wandb" in sys.modules:
        return sys.modules["wandb"] is not None
    return importlib.util.find_spec("wandb") is not None


def validate(cfg: OmniConfig, world_size: Optional[int] = None, training: bool = True) -> None:
    """Raise ConfigError with an actionable message for an inconsistent configuration.

    ``training=False`` checks a layout only as megatron-core could run it (the planner modelling
    published rows): what this project cannot train yet (context parallelism) is not refused."""
    errors: list[str] = []
    p, llm = cfg.parallel, cfg.model.llm
    tp, pp, vpp, cp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                       p.virtual_pipeline_model_parallel_size, p.context_parallel_size)

    if llm.num_attention_heads % tp:
        errors.append(
            f"model.llm.num_attention_heads ({llm.num_attention_heads}) is not divisible by "
            f"parallel.tensor_model_parallel_size ({tp}); pick a TP that divides it")
    if llm.num_query_groups % tp:
        errors.append(
            f"model.llm.num_query_groups ({llm.num_query_groups}) is not divisible by "
            f"parallel.tensor_model_parallel_size ({tp}); TP may not exceed the KV heads")
    if llm.ffn_hidden_size % tp:
        errors.append(f"model.llm.ffn_hidden_size ({llm.ffn_hidden_size}) is not divisible by TP "
                      f"({tp})")
    if cfg.model.vision.enabled and cfg.model.vision.num_heads % tp:
        errors.append(
            f"model.vision.num_heads ({cfg.model.vision.num_heads}) is not divisible by "
            f"parallel.tensor_model_parallel_size ({tp})")

    # Alignment stage (AT): the DPO reference is the network with its adapters switched off.
    al = cfg.alignment
    if cfg.stage.name == "at":
        if al.lora_rank < 1:
            errors.append("stage.name=at trains LoRA adapters and uses the network with them "
                          "switched off as the DPO reference: set alignment.lora_rank >= 1 "
                          "(recipes pick it so the adapters are about 5% of the LLM)")
        if al.preference_dataset in cfg.data.modalities:
            errors.append(f"alignment.preference_dataset ({al.preference_dataset}) is also in "
                          f"data.modalities; list only the instruction datasets there")

    # Pipeline split of the LLM layers.
    if pp > 1:
        first = p.first_stage_num_layers
        if first is None:
            if llm.num_layers % pp:
                errors.append(
                    f"model.llm.num_layers ({llm.num_layers}) is not divisible by "
                    f"parallel.pipeline_model_parallel_size ({pp}); change one, or set "
                    f"parallel.first_stage_num_layers to give the first stage fewer layers")
        else:
            if not 0 <= first < llm.num_layers:
                errors.append(f"parallel.first_stage_num_layers ({first}) must be in "
                              f"[0, {llm.num_layers})")
            elif (llm.num_layers - first) % (pp - 1):
                errors.append(
                    f"after parallel.first_stage_num_layers ({first}), the remaining "
                    f"{llm.num_layers - first} LLM layers do not divide over the other {pp - 1} "
                    f"pipeline stages")
        if vpp is not None:
            per_stage = llm_layers_per_stage(llm.num_layers, pp, first, vpp)
            if first is not None:
                errors.append("parallel.first_stage_num_layers cannot be combined with "
                              "virtual pipeline parallelism; unset one of them")
            elif any(n % vpp for n in per_stage):
                errors.append(
                    f"virtual pipeline: {llm.num_layers} layers over PP={pp} gives "
                    f"{per_stage[0]} per stage, not divisible by "
                    f"parallel.virtual_pipeline_model_parallel_size ({vpp})")
    elif p.first_stage_num_layers is not None and p.first_stage_num_layers != llm.num_layers:
        errors.append("parallel.first_stage_num_layers only applies with pipeline parallelism")

    if p.sequence_parallel and cfg.data.seq_length % tp:
        errors.append(
            f"data.seq_length ({cfg.data.seq_length}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp}) under sequence_parallel")
    if cp > 1 and training:
        # megatron-core's CP attention expects each rank to hold its 2*CP load-balanced slices of
        # every packed sequence (and cu_seqlens_padded to match); nothing in the data path or the
        # model slices batches that way yet, so CP > 1 would train on wrong attention.
        errors.append(f"parallel.context_parallel_size={cp} is not supported yet: the packed rows "
                      f"are not sliced per context-parallel rank; set "
                      f"parallel.context_parallel_size=1 (use tensor/sequence or pipeline "
                      f"parallelism for long rows)")
    if (cfg.training.bf16 and not cfg.training.use_distributed_optimizer
            and cfg.model.audio.enabled and cfg.stage.train_audio):
        # megatron-core 0.16.1's bf16 optimizer (Float16OptimizerWithFloat16Params) maps its
        # checkpoint state over bf16 parameters only; the fp32 SAN-M's state cannot be saved.
        errors.append("training.bf16 with a trainable SAN-M encoder (fp32 parameters) needs "
                      "training.use_distributed_optimizer=true: megatron-core's non-distributed "
                      "bf16 optimizer cannot checkpoint fp32 parameters; or set "
                      "stage.train_audio=false")
    if cfg.training.wandb_project and training and not wandb_available():
        errors.append(f"training.wandb_project={cfg.training.wandb_project!r} needs the wandb "
                      f"package, which is not installed: pip install wandb (or unset "
                      f"training.wandb_project)")
    if cfg.training.fp8 and cfg.model.transformer_impl == "local":
        errors.append("training.fp8 needs model.transformer_impl=transformer_engine (or auto on a "
                      "GPU with Transformer Engine)")

    mb = cfg.data.micro_batch_size
    if world_size is not None:
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            errors.append(
                f"world size {world_size} is not divisible by TP*PP*CP = {model_parallel}; launch "
                f"a multiple of {model_parallel} processes")
    if vpp is not None and cfg.training.num_micro_batches * len(cfg.data.modalities) % pp:
        errors.append(
            f"the interleaved schedule needs micro-batches per step "
            f"({cfg.training.num_micro_batches} x {len(cfg.data.modalities)} modalities) to be a "
            f"multiple of PP ({pp})")
    del mb

    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
