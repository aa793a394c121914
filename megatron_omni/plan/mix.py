"""A recipe's data mix: rows per modality group, encoder work on the first stage."""

from __future__ import annotations

import functools
import random
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from ..config.schema import ConfigError, OmniConfig
from .core import Plan, plan
from .inputs import Layout, Workload, image_grid
from .schedule import step_seconds

DEFAULT_MIX_SAMPLES = """Stated per-sample defaults without a prepared dataset (uniform draws):
text 200-8000 tokens; image: one image of 100-2560 LLM tokens + 34-94 text/template tokens;
video: 16 frames (8 temporal patches) of 1024-6144 LLM tokens in all + 24-74 tokens; audio: one
clip of 5-15 s (256 LLM tokens) + 24-74 tokens; interleaved: 3 images of 256-1024 tokens each +
200-1000 text tokens."""


def _grid_for_tokens(tokens: int, frames: int = 1) -> tuple[int, int, int]:
    """A near-square (t, h, w) pre-merge patch grid holding about ``tokens`` LLM tokens."""
    t = max(1, frames // 2)
    per = max(1, round(tokens / t))
    a = max(1, round(per ** 0.5))
    b = max(1, round(per / a))
    return (t, 2 * a, 2 * b)


def default_samples(modality: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` sample descriptors of ``modality`` drawn from :data:`DEFAULT_MIX_SAMPLES`.
    Each: ``num_tokens``, ``grids`` (pre-merge (t, h, w)), ``audio_frames`` (SAN-M frames)."""
    from ..training.flops import audio_encoder_frames
    rng = random.Random(f"{seed}-{modality}")
    out = []
    for _ in range(n):
        grids: list = []
        frames: list = []
        if modality == "text":
            tokens = rng.randint(200, 8000)
        elif modality == "image":
            grids = [_grid_for_tokens(rng.randint(100, 2560))]
            tokens = rng.randint(34, 94)
        elif modality == "video":
            grids = [_grid_for_tokens(rng.randint(1024, 6144), frames=16)]
            tokens = rng.randint(24, 74)
        elif modality == "audio":
            frames = [audio_encoder_frames(rng.uniform(5.0, 15.0))]
            tokens = 258 + rng.randint(24, 74)
        elif modality == "interleaved":
            grids = [_grid_for_tokens(rng.randint(256, 1024)) for _ in range(3)]
            tokens = rng.randint(200, 1000)
        else:
            raise ConfigError(f"unknown modality {modality!r}")
        tokens += sum(t * h * w // 4 + 2 for t, h, w in grids)
        out.append({"num_tokens": tokens, "grids": grids, "audio_frames": frames})
    return out


def dataset_samples(path: str | Path, modality: str, limit: int = 2000) -> list[dict]:
    """Descriptors of up to ``limit`` training samples of one modality, read from the per-sample
    JSON that ``tools/preprocess_data.py`` stored in the shards (``<path>/<modality>/train-*.tar``;
    no media is decoded): ``num_tokens``, ``image_grid_thw`` + ``video_grid_thw``, and
    ``audio_num_samples`` (16 kHz) turned into SAN-M frames."""
    import json
    import tarfile

    from ..training.flops import audio_encoder_frames
    shards = sorted((Path(path) / modality).glob("train-*.tar"))
    if not shards:
        raise ConfigError(f"no training shards under {Path(path) / modality}; give the "
                          f"tools/preprocess_data.py output directory (data.path)")
    out: list[dict] = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.name.endswith(".json") or "." in member.name[:-5].rsplit("/", 1)[-1]:
                    continue
                d = json.load(tar.extractfile(member))
                grids = [tuple(g) for g in (d.get("image_grid_thw") or [])]
                grids += [tuple(g) for g in (d.get("video_grid_thw") or [])]
                frames = [audio_encoder_frames(n / 16000.0)
                          for n in (d.get("audio_num_samples") or [])]
                out.append({"num_tokens": int(d["num_tokens"]), "grids": grids,
                            "audio_frames": frames})
                if len(out) >= limit:
                    return out
    return out


def recipe_workloads(cfg: OmniConfig, data_path: str | Path | None = None,
                     rows_per_modality: int = 2, samples: int = 512,
                     seed: int = 0) -> list[tuple[float, Workload, str]]:
    """(weight, row, label) for the rows a recipe's step is made of.

    Every modality group of ``data.modalities`` gets the same micro-batches per step; in a
    non-text group ``data.pure_text_ratio`` of them are pure text. Each group's samples (from the
    dataset when ``data_path`` is given, else :data:`DEFAULT_MIX_SAMPLES`) are packed with the
    project's packer under the recipe's budgets; the rows, sorted by vision patches + audio
    frames, are represented by ``rows_per_modality`` quantile rows of equal weight.
    """
    from ..data.packing import PackingConfig, SampleInfo, pack_samples
    d = cfg.data
    mods = list(d.modalities)
    pcfg = PackingConfig(d.seq_length, d.max_images_per_row, d.max_vision_patches_per_row,
                         truncate_text=True)
    text_share = d.pure_text_ratio if len(mods) > 1 else 0.0
    groups: list[tuple[float, str]] = []
    for m in mods:
        if m == "text":
            groups.append((1.0 / len(mods), "text"))
        else:
            groups.append(((1.0 - text_share) / len(mods), m))
            if text_share:
                groups.append((text_share / len(mods), "text"))
    rows_of: dict[str, list[Workload]] = {}
    out: list[tuple[float, Workload, str]] = []
    for weight, m in groups:
        if m not in rows_of:
            descs = dataset_samples(data_path, m, samples) if data_path is not None \
                else default_samples(m, samples, seed)
            infos = [SampleInfo(i, x["num_tokens"], len(x["grids"]),
                                sum(t * h * w for t, h, w in x["grids"]),
                                "text" if m == "text" else m) for i, x in enumerate(descs)]
            packed = pack_samples(infos, pcfg)
            rows = []
            for row in packed.rows:
                ids = [int(i) for i in row.sample_ids]
                grids = [g for i in ids for g in descs[i]["grids"]]
                frames = [f for i in ids for f in descs[i]["audio_frames"]]
                rows.append(Workload(d.seq_length, max(1, len(ids)), tuple(grids),
                                     tuple(frames)))
            if not rows:
                raise ConfigError(f"no {m} sample fits a row of {d.seq_length} tokens")
            rows.sort(key=lambda w: (sum(t * h * ww for t, h, ww in w.vision_grids)
                                     + sum(w.audio_frames), w.samples_per_row))
            k = min(rows_per_modality, len(rows))
            rows_of[m] = [rows[min(len(rows) - 1, int((j + 0.5) * len(rows) / k))]
                          for j in range(k)]
        reps = rows_of[m]
        out += [(weight / len(reps), w, m) for w in reps]
    return out


def stress_workloads(cfg: OmniConfig) -> list[Workload]:
    """The heaviest rows a recipe must survive (memory only): text; a row of 896x896 images (4 in
    8K-token rows = 16K patches, 3 in shorter rows); the largest video (32 frames of 532x532,
    ~5.8K tokens; 8K rows only); a row full of 15-s audio clips (28 in 8K rows, 14 in 4K)."""
    from ..training.flops import audio_encoder_frames
    d, v = cfg.data, cfg.model.vision
    long = d.seq_length >= 8192
    grid = functools.partial(image_grid, patch_size=v.patch_size, merge=v.spatial_merge_size,
                             temporal_patch_size=v.temporal_patch_size)
    out = [Workload(d.seq_length)]
    if v.enabled:
        n = 4 if long else 3
        out.append(Workload(d.seq_length, n, (grid(896, 896, 1),) * n))
        if long:
            out.append(Workload(d.seq_length, 1, (grid(532, 532, 32),)))
    if cfg.model.audio.enabled:
        n = 28 if long else 14
        out.append(Workload(d.seq_length, n, (), (audio_encoder_frames(15.0),) * n))
    return out


def plan_mix(cfg: OmniConfig, layout: Layout, workloads: Sequence[tuple[float, Workload, str]],
             gpu: str = "h100", precision: str = "bf16",
             memory_workloads: Sequence[Workload] = (), **kwargs) -> Plan:
    """:func:`plan` over the row types of a step (:func:`recipe_workloads`).

    Memory is the worst row type's (every row must fit), ``memory_workloads`` (e.g.
    :func:`stress_workloads`) included. Per stage, the time per micro-batch is
    the weighted mean over row types (the encoder work on the first stage follows the mix); the
    step is then composed as in :func:`plan`. Row-to-row variance within a step is not modelled.
    """
    if not workloads:
        raise ConfigError("plan_mix needs at least one row type")
    plans = [plan(cfg, layout, w, gpu, precision, check=(i == 0), **kwargs)
             for i, (_, w, _) in enumerate(workloads)]
    total = sum(wt for wt, _, _ in workloads)
    extra = [plan(cfg, layout, w, gpu, precision, check=False, **kwargs)
             for w in memory_workloads]
    base = max(plans + extra, key=lambda p: p.peak_bytes)
    mix = [(round(wt / total, 4), label) for wt, _, label in workloads]
    if base.step_time is None:
        return replace(base, mix=mix)
    stages = []
    for r, st in enumerate(base.stages):
        times = {k: sum(wt * p.stages[r].times[k] for (wt, _, _), p in zip(workloads, plans))
                 / total for k in st.times}
        flops = sum(wt * p.stages[r].flops_per_micro_batch
                    for (wt, _, _), p in zip(workloads, plans)) / total
        sixteen = sum(wt * p.stages[r].sixteen_bit_flops
                      for (wt, _, _), p in zip(workloads, plans)) / total
        stages.append(replace(st, times=times, flops_per_micro_batch=flops,
                              sixteen_bit_flops=sixteen))
    step = step_seconds(layout, stages)
    model_flops = sum(wt * p.model_flops_per_step
                      for (wt, _, _), p in zip(workloads, plans)) / total
    return replace(base, stages=stages, step_time=step, model_flops_per_step=model_flops, mix=mix)


def balanced_first_stage_layers(cfg: OmniConfig, layout: Layout,
                                workloads: Sequence[tuple[float, Workload, str]],
                                gpu: str = "h100", precision: str = "bf16") -> Optional[int]:
    """LLM layers for the first pipeline stage so that its time per micro-batch (its layers +
    the encoders at the mix) matches the other stages' (``(L - f) / (p - 1)`` layers each):
    ``f = (L - (p-1) * t_enc / t_layer) / p``, rounded to a value that leaves the rest evenly
    divisible (and at least one layer). None without PP, VPP or encoders."""
    llm = cfg.model.llm
    pp = layout.pp
    if pp == 1 or layout.vpp or not (cfg.model.vision.enabled or cfg.model.audio.enabled):
        return None
    even = replace(layout, first_stage_num_layers=None)
    p = plan_mix(cfg, even, workloads, gpu, precision)
    s0, s1 = p.stages[0], p.stages[1]
    per_layer = s1.micro_batch_time / max(1, s1.llm_layers)
    enc = s0.micro_batch_time - s0.llm_layers * per_layer
    ideal = (llm.num_layers - (pp - 1) * max(0.0, enc) / per_layer) / pp
    ok = [f for f in range(1, llm.num_layers) if (llm.num_layers - f) % (pp - 1) == 0]
    return min(ok, key=lambda f: (abs(f - ideal), f))
