"""A small packed omni batch (text, image, video, audio samples in one row) for model checks
(the tests, omni-gpu-check, the benchmarks)."""

from __future__ import annotations

import math

import torch

from megatron_omni.config import load_config
from megatron_omni.models.omni import special_token_ids
from megatron_omni.models.rope_index import get_packed_rope_index

TINY_OMNI = [
    "model.llm.num_layers=4", "model.llm.vocab_size=125", "model.speech_codebook_size=32",
    "model.llm.make_vocab_size_divisible_by=64",
    "model.vision.depth=2", "model.vision.hidden_size=32", "model.vision.num_heads=2",
    "model.audio.hidden_size=32", "model.audio.num_heads=2", "model.audio.ffn_hidden_size=64",
    "model.audio.num_blocks=2",
]


def tiny_omni_cfg(*extra, vision=True, audio=True):
    return load_config(None, TINY_OMNI + [f"model.vision.enabled={str(vision).lower()}",
                                          f"model.audio.enabled={str(audio).lower()}", *extra])


def omni_batch(cfg, seed: int = 0, vision: bool = True, audio: bool = True, pad_to: int = 8):
    """tokens/labels/loss_mask [1, T], position_ids [3, 1, T], cu_seqlens, media inputs."""
    sp = special_token_ids(cfg)
    g = torch.Generator().manual_seed(seed)
    base = sp.base_vocab_size

    def text(n):
        return torch.randint(0, base, (n,), generator=g).tolist()

    samples, images, videos, patches, grids, waves, names = [], [], [], [], [], [], []
    samples.append(text(12))
    names.append("text0")
    if vision:
        img = (1, 4, 4)
        samples.append([sp.image_start] + [sp.image_patch] * 4 + [sp.image_end] + text(6))
        images.append(img)
        grids.append(img)
        names.append("image0")
        vid = (2, 4, 6)
        samples.append(text(3) + [sp.video_start] + [sp.video_patch] * 12 + [sp.video_end]
                       + text(4))
        videos.append(vid)
        grids.append(vid)
        names.append("video0")
        n = sum(math.prod(x) for x in grids)
        patches = torch.randn(n, 3 * 2 * 14 * 14, generator=g)
    if audio:
        samples.append(text(2) + [sp.audio_start] + [sp.audio_patch] * 256 + [sp.audio_end]
                       + text(5))
        waves = [torch.randn(8000, generator=g) * 0.1, torch.randn(19000, generator=g) * 0.1]
        samples.append([sp.audio_start] + [sp.audio_patch] * 256 + [sp.audio_end] + text(3)
                       + [sp.gen_audio_start, sp.speech_offset + 3, sp.speech_offset + 7,
                          sp.gen_audio_end])
        names += ["audio0", "audio1"]
    lens = [len(s) for s in samples]
    total = sum(lens)
    pad = (-total) % pad_to
    if pad:
        samples.append([0] * pad)
        lens.append(pad)
        names.append("pad")
    tokens = torch.tensor(sum(samples, []))[None]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    # Next-token labels inside each sample; the last position of a sample has no target.
    labels = torch.zeros_like(tokens)
    mask = torch.zeros(tokens.shape, dtype=torch.float)
    for a, b, name in zip(cu[:-1].tolist(), cu[1:].tolist(), names):
        labels[0, a:b - 1] = tokens[0, a + 1:b]
        if name != "pad":
            mask[0, a:b - 1] = 1.0
    mask[labels == sp.image_patch] = 0
    mask[labels == sp.video_patch] = 0
    mask[labels == sp.audio_patch] = 0
    pos = get_packed_rope_index(tokens[0], cu, image_grid_thw=images or None,
                                video_grid_thw=videos or None, token_ids=sp)
    return dict(tokens=tokens, labels=labels, loss_mask=mask, position_ids=pos[:, None],
                cu_seqlens=cu,
                vision_patches=patches if vision else None,
                vision_grid_thw=torch.tensor(grids) if vision else None,
                audio_waveforms=waves if audio else None, sample_names=names)


class MemoryData:
    """An in-memory data source with the Trainer's data interface (next / val_batches /
    save_state / restore_state / skipped_total): micro-batch n of a modality is
    ``omni_batch(cfg, seed=offset + n % period)`` with media only where the modality has them
    (``vision`` / ``audio`` name the modalities that carry images / audio; None: none)."""

    def __init__(self, cfg, period: int = 3, offset: int = 0, vision: str | None = "image",
                 audio: str | None = "audio", val_seed: int | None = None):
        self.cfg, self.period, self.offset = cfg, period, offset
        self.vision, self.audio, self.val_seed = vision, audio, val_seed
        self.n = 0
        self.skipped_total = 0

    def _batch(self, modality, seed):
        return omni_batch(self.cfg, seed=seed, vision=modality == self.vision,
                          audio=modality == self.audio)

    def next(self, modality):
        self.n += 1
        return self._batch(modality, self.offset + self.n % self.period)

    def val_batches(self, modality, n):
        if self.val_seed is None:
            return []
        return [self._batch(modality, self.val_seed + i) for i in range(n)]

    def save_state(self):
        return {"n": self.n}

    def restore_state(self, state):
        self.n = state["n"]
