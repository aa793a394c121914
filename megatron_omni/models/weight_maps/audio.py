"""Weight map of the SAN-M audio encoder (:mod:`megatron_omni.models.audio`): FunASR / M2-omni
release <-> ``SANMEncoder``.

Our module keeps FunASR's parameter names, so every link is a ``copy`` (a prefix change) and the
map's work is strict checking. SAN-M is a plain torch module: nothing of it is split over TP
(:func:`gated` is never true and none of its names is a megatron-core parallel linear).

Prefixes:

- FunASR Paraformer checkpoints hold the encoder under ``encoder.`` (next to ``decoder.``,
  ``predictor.``, ``ctc.`` ... which are not ours and are ignored);
- the M2-omni release (``Bailing2NativeForConditionalGeneration``) holds it under
  ``audio_model.encoder.`` (next to ``vision_model.``, ``language_model.`` ...).

Strict means: every parameter the module expects must be present with the expected shape, and
every key under the prefix must be one the module knows. Anything else is an error that lists the
offending keys, because a silently skipped FSMN kernel or LayerNorm gives an encoder that runs
and produces garbage.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..audio import SANMConfig, SANMEncoder
from .core import DictSource, Link, export_state, full_from_plans, key_problems

__all__ = [
    "links",
    "gated",
    "FUNASR_PREFIX",
    "RELEASE_PREFIX",
    "expected_sanm_shapes",
    "infer_sanm_config",
    "sanm_from_funasr",
    "sanm_from_release",
    "sanm_to_funasr",
    "sanm_to_release",
]

FUNASR_PREFIX = "encoder."
RELEASE_PREFIX = "audio_model.encoder."


def expected_sanm_shapes(config: SANMConfig) -> dict[str, torch.Size]:
    """Parameter name -> shape of ``SANMEncoder(config)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = SANMEncoder(config)
    return {name: tensor.shape for name, tensor in module.state_dict().items()}


def links(config: SANMConfig, ours: str = "", hf: str = FUNASR_PREFIX) -> list[Link]:
    """Our SAN-M encoder (``ours`` prefix: ``"audio_model."`` inside the omni model) <-> FunASR
    (``hf``: ``encoder.``) / the release (``audio_model.encoder.``): same parameter names,
    prefix change only."""
    return [Link(ours + n, (hf + n,)) for n in expected_sanm_shapes(config)]


def gated(name: str) -> bool:
    """The TP split rule: SAN-M is replicated on every TP rank (no gated MLP, no split)."""
    return False


def _check(state: Mapping[str, torch.Tensor], config: SANMConfig, where: str) -> None:
    problems = key_problems(state, expected_sanm_shapes(config))
    if problems:
        raise ValueError(
            f"SAN-M state dict ({where}) does not match SANMConfig(input_size={config.input_size}, "
            f"output_size={config.output_size}, linear_units={config.linear_units}, "
            f"num_blocks={config.num_blocks}, kernel_size={config.kernel_size}): "
            + "; ".join(problems)
        )


def infer_sanm_config(
    state: Mapping[str, torch.Tensor], prefix: str = "", attention_heads: int = 4
) -> SANMConfig:
    """Read the encoder's shape off a checkpoint (keys under ``prefix``).

    Widths, FFN size, kernel and block count are in the tensor shapes; the head count is not (the
    fused q/k/v projection looks the same for any split), so it is an argument (4 for Paraformer).
    """
    first = f"{prefix}encoders0.0."
    needed = [
        f"{first}self_attn.linear_q_k_v.weight",
        f"{first}self_attn.fsmn_block.weight",
        f"{first}feed_forward.w_1.weight",
    ]
    absent = [k for k in needed if k not in state]
    if absent:
        raise ValueError(f"cannot infer the SAN-M shape: no {', '.join(absent)} in the checkpoint")
    qkv = state[needed[0]]
    fsmn = state[needed[1]]
    w1 = state[needed[2]]
    pattern = re.compile(re.escape(prefix) + r"encoders\.(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return SANMConfig(
        input_size=qkv.shape[1],
        output_size=qkv.shape[0] // 3,
        attention_heads=attention_heads,
        linear_units=w1.shape[0],
        num_blocks=1 + (max(indices) + 1 if indices else 0),
        kernel_size=fsmn.shape[-1],
    )


StateDict = dict[str, torch.Tensor]


def _strip(state: Mapping[str, torch.Tensor], prefix: str, config: SANMConfig | None) -> StateDict:
    ours = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not ours:
        raise ValueError(
            f"no keys start with {prefix!r}; is this a SAN-M checkpoint? (first keys: "
            f"{', '.join(list(state)[:5])})"
        )
    if config is None:
        config = infer_sanm_config(ours)
    _check(ours, config, f"keys under {prefix!r}")
    return full_from_plans(links(config, hf=""), DictSource(ours, "SAN-M state dict"))


def _add(state: Mapping[str, torch.Tensor], prefix: str, config: SANMConfig | None) -> StateDict:
    if config is None:
        config = infer_sanm_config(state)
    _check(state, config, "SANMEncoder state dict")
    return export_state(links(config, hf=prefix), state)


def sanm_from_funasr(
    state: Mapping[str, torch.Tensor], config: SANMConfig | None = None, prefix: str = FUNASR_PREFIX
) -> dict[str, torch.Tensor]:
    """FunASR Paraformer checkpoint -> ``SANMEncoder.load_state_dict`` input.

    Keys outside ``prefix`` (decoder, predictor, ...) are ignored; keys under it must match the
    encoder exactly (``config`` defaults to the shape read off the checkpoint).
    """
    return _strip(state, prefix, config)


def sanm_to_funasr(
    state: Mapping[str, torch.Tensor], config: SANMConfig | None = None, prefix: str = FUNASR_PREFIX
) -> dict[str, torch.Tensor]:
    """``SANMEncoder.state_dict()`` -> FunASR keys (``encoder.encoders0.0...``)."""
    return _add(state, prefix, config)


def sanm_from_release(
    state: Mapping[str, torch.Tensor], config: SANMConfig | None = None
) -> StateDict:
    """M2-omni release checkpoint (``audio_model.encoder.*``) -> ``SANMEncoder`` state dict."""
    return _strip(state, RELEASE_PREFIX, config)


def sanm_to_release(
    state: Mapping[str, torch.Tensor], config: SANMConfig | None = None
) -> StateDict:
    """``SANMEncoder`` state dict -> M2-omni release keys (``audio_model.encoder.*``)."""
    return _add(state, RELEASE_PREFIX, config)
