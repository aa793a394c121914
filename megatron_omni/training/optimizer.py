"""Optimizer, learning-rate schedule and DDP wrapping, all megatron-core.

* :func:`wrap_ddp` wraps every model chunk in megatron-core ``DistributedDataParallel`` (one
  contiguous fp32 gradient buffer per chunk, reduced over data parallel at the end of the
  schedule) and installs the hooks the pipeline schedules call (``finalize_model_grads_func`` and,
  with overlapped reduction, ``no_sync_func``).
* :func:`build_optimizer` returns ``get_megatron_optimizer(OptimizerConfig(...))``: Adam or AdamW
  with weight decay skipped for biases and 1-D parameters (megatron-core's default param groups),
  gradient clipping, bf16 main-parameter handling (GPU and CPU), and the distributed optimizer
  (``DistributedOptimizer``, states sharded over data parallel) when
  ``training.use_distributed_optimizer`` is set. Only parameters with ``requires_grad`` are
  handed to the optimizer (megatron-core skips frozen ones when it builds the param groups, and
  DDP gives them no gradient buffer), so frozen encoders or a frozen LLM get no Adam state.
* :func:`build_scheduler` returns megatron-core's ``OptimizerParamScheduler``: linear warm-up from
  0 over ``training.lr_warmup_iters`` steps, then cosine decay to ``training.min_lr`` at
  ``training.train_iters``.

The DDP and optimizer configs are derived from the same fields so they cannot disagree
(``use_distributed_optimizer`` must be set on both; megatron-core asserts it deep inside).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config.schema import ConfigError, OmniConfig


def _bf16(cfg: OmniConfig) -> bool:
    """``training.bf16``: bf16 parameters with fp32 main parameters, on the GPU and the CPU."""
    return bool(cfg.training.bf16)


def ddp_config(cfg: OmniConfig):
    """megatron-core ``DistributedDataParallelConfig`` consistent with :func:`optimizer_config`."""
    from megatron.core.distributed import DistributedDataParallelConfig

    tr = cfg.training
    # Honoured on the CPU too (gloo's async all-reduce), so the overlap path is tested there.
    overlap = bool(tr.overlap_grad_reduce)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=tr.grad_reduce_in_fp32,
        overlap_grad_reduce=overlap,
        overlap_param_gather=False,
        use_distributed_optimizer=tr.use_distributed_optimizer,
        # Buckets only matter when the reduction overlaps the backward pass.
        bucket_size=None if not overlap else 40_000_000,
    )


def wrap_ddp(cfg: OmniConfig, chunks: Sequence[torch.nn.Module]) -> list:
    """Wrap each model chunk in megatron-core DDP and install the schedule hooks.

    Call after freezing (``requires_grad=False``) whatever must not train: DDP allocates gradient
    buffers only for trainable parameters. The chunks' ``TransformerConfig`` gets
    ``finalize_model_grads_func`` (data-parallel gradient reduction + pipeline-embedding sync at
    the end of every schedule call) and, when the reduction overlaps the backward pass,
    ``no_sync_func`` so only the last micro-batch triggers it.
    """
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    dcfg = ddp_config(cfg)
    model = [
        DistributedDataParallel(
            chunk.config, dcfg, chunk,
            # As megatron's trainer: with virtual pipelines only the first chunk buckets
            # (overlap) its reduction; the others reduce in one go.
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    for chunk in chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        if dcfg.overlap_grad_reduce:
            no_sync = [m.no_sync for m in model]
            chunk.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return model


def optimizer_config(cfg: OmniConfig):
    """megatron-core ``OptimizerConfig`` for ``cfg.training``."""
    from megatron.core.optimizer import OptimizerConfig

    tr = cfg.training
    bf16 = _bf16(cfg)
    return OptimizerConfig(
        optimizer="adam",
        # megatron-core's 'adam' is AdamW (decoupled decay) unless this is False (L2 in the grad).
        decoupled_weight_decay=tr.optimizer == "adamw",
        lr=tr.lr,
        min_lr=tr.min_lr,
        weight_decay=tr.weight_decay,
        adam_beta1=tr.adam_beta1,
        adam_beta2=tr.adam_beta2,
        adam_eps=tr.adam_eps,
        clip_grad=tr.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=tr.use_distributed_optimizer,
    )


def build_optimizer(cfg: OmniConfig, model_chunks: Sequence[torch.nn.Module]):
    """megatron-core optimizer over the DDP-wrapped ``model_chunks`` (see module docstring).

    Returns megatron-core's ``ChainedOptimizer`` (one sub-optimizer for dense parameters).
    """
    from megatron.core.optimizer import get_megatron_optimizer

    if not model_chunks or not all(hasattr(m, "ddp_config") for m in model_chunks):
        raise TypeError("build_optimizer needs the DDP-wrapped chunks (see wrap_ddp)")
    for m in model_chunks:
        if m.ddp_config.use_distributed_optimizer != cfg.training.use_distributed_optimizer:
            raise ConfigError(
                "the DDP wrappers were built with use_distributed_optimizer="
                f"{m.ddp_config.use_distributed_optimizer} but training.use_distributed_optimizer="
                f"{cfg.training.use_distributed_optimizer}; wrap with the same config")
    oc = optimizer_config(cfg)
    return get_megatron_optimizer(oc, list(model_chunks), config_overrides=_config_overrides(oc))


def _config_overrides(oc):
    """megatron-core's standard param groups (no weight decay on biases and 1-D params), plus,
    under bf16, the fp32 parameters (the SAN-M encoder) in groups of their own.

    megatron-core 0.16.1 assumes a param group holds one dtype when it checkpoints: the
    distributed optimizer indexes main params by their order in the gradient buffers while the
    group lists fp32 params first, and the bf16 optimizer numbers states over bf16 params only,
    so saving a group that mixes fp32 and bf16 parameters fails (shape mismatch). A key that
    only marks the dtype (no optimizer setting) splits the groups without changing the update.
    Its name sorts after every megatron-core override key, so the fp32 groups come last (the bf16
    optimizer's checkpoint also numbers the bf16 parameters as if they came first).
    """
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate

    overrides = dict(get_standard_config_overrides(config=oc))
    if oc.bf16:
        fp32 = ParamPredicate(name="omni_fp32_param", fn=lambda p: p.dtype == torch.float32)
        overrides[ParamKey(predicate=fp32)] = {"zz_omni_param_dtype": "float32"}
    return overrides


def build_scheduler(cfg: OmniConfig, optimizer):
    """megatron-core ``OptimizerParamScheduler``: linear warm-up, then cosine to ``min_lr``.

    Call ``scheduler.step(1)`` after every optimizer step. As in megatron-core, the lr used by
    step k (1-based) is the schedule at ``num_steps = k - 1``: 0 at the first step when there is
    a warm-up, ``lr`` at step ``lr_warmup_iters + 1``, ``min_lr`` at step ``train_iters + 1``.
    Weight decay is constant (biases and 1-D params have ``wd_mult = 0``).

    On resume, :func:`megatron_omni.training.checkpoint.load_checkpoint` restores the step count;
    the schedule's shape (lr, min_lr, warm-up, length) comes from the current config.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    tr = cfg.training
    decay = max(tr.train_iters, 1)
    if tr.lr_warmup_iters >= decay:
        raise ConfigError(
            f"training.lr_warmup_iters ({tr.lr_warmup_iters}) must be smaller than "
            f"training.train_iters ({tr.train_iters}); shorten the warm-up or train longer")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=tr.lr,
        min_lr=tr.min_lr,
        lr_warmup_steps=tr.lr_warmup_iters,
        lr_decay_steps=decay,
        lr_decay_style="cosine",
        start_wd=tr.weight_decay,
        end_wd=tr.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        # The current config defines the schedule; the checkpoint only supplies num_steps.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def inner_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron-core (chained) optimizer (empty ones skipped)."""
    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    out = []
    for sub in subs:
        inner = getattr(sub, "optimizer", None)
        if inner is not None:
            out.append(inner)
    return out
