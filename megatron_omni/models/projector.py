"""Projectors from the encoders into the LLM's embedding space.

``Linear(in -> hidden)`` and, per extra depth, ``GELU, Linear(hidden -> hidden)`` (the release's
``mlp_depths``; module indices 0, 2, 4, ... as in its ``linear_proj.N`` keys). The omni model
L2-normalises the outputs before splicing (M2OMNI.md section 1). Plain torch modules: they are
small and their inputs/outputs are identical on every tensor-parallel rank, so replicated weights
receive identical gradients there.
"""

from __future__ import annotations

from torch import nn


def build_projector(in_features: int, out_features: int, depth: int = 1) -> nn.Sequential:
    if depth < 1:
        raise ValueError(f"projector depth must be >= 1, got {depth}")
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)
