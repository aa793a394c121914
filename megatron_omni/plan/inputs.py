"""What a plan is asked about: model presets, the parallel layout, what a packed row holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..config.loader import load_config
from ..config.schema import ConfigError, OmniConfig
from .hardware import DEFAULT_GLOBAL_BATCH

REPO_ROOT = Path(__file__).resolve().parents[2]
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
