"""Layer specs: Transformer Engine (GPU, FP8-capable, THD attention) or local (megatron-core
modules + our varlen SDPA attention; runs anywhere).

The choice is made once at start-up by :func:`resolve_transformer_impl` and logged; asking for
Transformer Engine where it cannot be imported is an error, never a silent fallback.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config.schema import ConfigError
from .attention import VarlenSDPAttention

log = logging.getLogger(__name__)
_TE_STATUS: Optional[tuple[bool, str]] = None


def transformer_engine_status() -> tuple[bool, str]:
    """(importable, reason). TE raises ImportError, OSError or RuntimeError without a GPU."""
    global _TE_STATUS
    if _TE_STATUS is None:
        try:
            import transformer_engine.pytorch  # noqa: F401

            _TE_STATUS = (True, "ok")
        except (ImportError, OSError, RuntimeError) as e:
            _TE_STATUS = (False, f"{type(e).__name__}: {e}")
    return _TE_STATUS


def resolve_transformer_impl(requested: str) -> str:
    """'auto' -> TE on a GPU with Transformer Engine, else 'local'. Explicit TE must be present."""
    if requested == "local":
        return "local"
    ok, why = transformer_engine_status()
    if requested == "transformer_engine":
        if not torch.cuda.is_available():
            raise ConfigError("model.transformer_impl=transformer_engine needs a CUDA GPU; use "
                              "local or auto on CPU")
        if not ok:
            raise ConfigError(f"model.transformer_impl=transformer_engine but Transformer Engine "
                              f"does not import ({why}); install requirements-gpu.txt or use local")
        return "transformer_engine"
    return "transformer_engine" if (ok and torch.cuda.is_available()) else "local"


class SPTorchNorm:
    """``torch.nn.RMSNorm``/``LayerNorm`` usable under sequence parallelism.

    megatron-core's ``WrappedTorchNorm`` asserts ``not config.sequence_parallel``, although a norm
    over the hidden dimension is exactly the same on a sequence shard. What sequence parallelism
    needs from a norm is that its (replicated) parameters have their gradients all-reduced over the
    TP group, which megatron-core's ``finalize_model_grads`` does for params tagged
    ``sequence_parallel=True``; TE and apex norms amount to the same. So: build the torch norm and
    tag its parameters.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"unsupported normalization {config.normalization}")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def local_layer_spec() -> ModuleSpec:
    """Llama layer from megatron-core local modules, with our norm and varlen attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.input_layernorm = SPTorchNorm
    spec.submodules.pre_mlp_layernorm = SPTorchNorm
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params or {}, attn_mask_type=AttnMaskType.causal)
    attn.submodules.core_attention = VarlenSDPAttention
    return spec


def llm_block_spec(config: TransformerConfig, impl: str, vp_stage: Optional[int] = None):
    """Decoder block spec for this pipeline stage (and virtual stage)."""
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(config, use_transformer_engine=True,
                                          normalization="RMSNorm", vp_stage=vp_stage)
    layer = local_layer_spec()
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=SPTorchNorm)
