"""Projectors from the encoders into the LLM's embedding space.

``Linear(in -> hidden)`` and, per extra depth, ``GELU, Linear(hidden -> hidden)`` (the release's
``mlp_depths``; module indices 0, 2, 4, ... as in its ``linear_proj.N`` keys). The omni model
L2-normalises the outputs before splicing (docs/recipe.md section 1). Plain torch modules: they are
small and their inputs/outputs are identical on every tensor-parallel rank, so replicated weights
receive identical gradients there.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def build_projector(in_features: int, out_features: int, depth: int = 1,
                    dtype: Optional[torch.dtype] = None) -> nn.Sequential:
    """``dtype``: the model's params dtype (bf16 under ``training.bf16``, like the megatron-core
    modules around it); callers cast the encoder features to it."""
    if depth < 1:
        raise ValueError(f"projector depth must be >= 1, got {depth}")
    layers: list[nn.Module] = [nn.Linear(in_features, out_features, dtype=dtype)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features, dtype=dtype)]
    return nn.Sequential(*layers)
