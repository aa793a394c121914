"""Energon loaders, one per modality: pack on metadata, then decode, template and batch.

Input: the datasets ``tools/preprocess_data.py`` wrote under ``DataConfig.path`` (one Energon
dataset per modality, see ``preprocess.py``). Per modality the pipeline is Energon's, with our
task encoder (:class:`OmniTaskEncoder`) plugged into its hooks::

    shards --(Energon: rank slice, shuffle, repeat)--> crude dict {json, img0.png, ...}
      --cook_omni_sample (cooker)--> OmniSample(record, raw media bytes)        nothing decoded
      --select_samples_to_pack (packing hook)--> rows chosen from the stored token counts and
            media sizes by megatron_omni.data.packing (token + image + patch budgets)
      --pack_selected_samples (packing hook)--> decode the row's media (MediaProcessor: DALI or
            CPU), template every sample, concatenate -> PackedRow. With deferred decoding
            (media/deferred.py) images/videos are only planned here and travel encoded in
            ``batch["deferred_media"]``; the training process decodes them on its GPU
      --batch / encode_batch--> the batch dict (below)

So packing never waits for decoding (docs/architecture.md principle 4) and only the samples that
made it into a row are decoded. Everything a sample can fail on at this point (damaged media that
passed the header probe, a token count that no longer matches, a sample too long for ``seq_length``)
is skipped and counted per reason, never raised (principle 6); the counts arrive with the batches
(``batch["skipped"]``) and are summed in :attr:`ModalityLoader.skipped`.

The batch dict (B = ``DataConfig.micro_batch_size`` rows of T = ``seq_length`` tokens):

=========================  =================================================================
``tokens``                 LongTensor [B, T]; padded with the tokenizer's pad id
``labels``                 LongTensor [B, T]: the *next* token inside each sample,
                           ``labels[i] = tokens[i + 1]``; the last token of every sample and
                           the padding have no target and hold the pad id. Always a valid id
                           (Megatron's convention): ``loss_mask`` says what is trained on
``loss_mask``              float [B, T]: 1.0 where ``labels[i]`` is trained on (assistant
                           answers, pure text); 0.0 for prompts, media, sample ends, padding
``gen_audio_mask``         bool [B, T]: targets inside ``<gen_audio> ... </gen_audio>`` (L_gen_a)
``position_ids``           LongTensor [3, B, T]: M-RoPE (t, h, w) ids restarting at 0 in every
                           sample (``models.rope_index.get_packed_rope_index``)
``cu_seqlens``             int32: sample boundaries with the padding as a final segment
                           ([0, l0, l0+l1, ..., T]); for B > 1 the rows' boundaries are
                           concatenated with row b offset by b*T (flattened THD)
``max_seqlen``             int: longest segment
``vision_patches``         float [P, 1176]: ViT patches of every image AND video of the batch in
                           token order (what ``OmniModel`` splices into the patch tokens);
                           ``vision_grid_thw`` LongTensor [N, 3] in the same order
``image_pixel_values``     float [P_img, 1176]: ViT patches of every image, in order
``image_grid_thw``         LongTensor [N_img, 3]
``video_pixel_values``     float [P_vid, 1176], ``video_grid_thw`` LongTensor [N_vid, 3]
``audio_waveforms``        list of float [samples] 16 kHz mono clips, in order;
                           ``audio_lengths`` LongTensor [N_aud]
``image_grids_per_sample`` / ``video_grids_per_sample``: per row, per sample, LongTensor [n, 3]
                           (what the rope index needs)
``sample_keys``            per row, the shard keys of its samples (``image-000000012``, ...);
                           ``sample_names`` the same keys as one flat list
``num_tokens``             LongTensor [B]: real (non-pad) tokens per row
``modality``               the dataset the rows came from (``text`` for mixed-in text rows)
``group``                  the modality group the batch belongs to (the loader's name)
``skipped``                {reason: count} of samples dropped since the previous batch
=========================  =================================================================

Pure text is mixed in per *row*: :class:`ModalityLoader` interleaves a text loader's batches with
the modality's at ``DataConfig.pure_text_ratio``, deterministically (batch n is text when
``floor((n + 1) * r) > floor(n * r)``), so after n batches exactly ``floor(n * r)`` were text.

Data parallelism: every loader gets an Energon :class:`~megatron.energon.WorkerConfig` with the
rank and size of the data-parallel group, so ranks read disjoint slices. Resume:
:meth:`OmniLoaders.save_state` returns this rank's state (Energon's ``save_state_rank`` of every
loader plus the mixer counters); :meth:`OmniLoaders.restore_state` on a fresh instance continues
at the exact next batch. Save per rank (no collective is involved), e.g. into the rank's own
checkpoint file.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from megatron.energon import (
    Cooker,
    Sample,
    SkipSample,
    TaskEncoder,
    WorkerConfig,
    basic_sample_keys,
    cooker,
    edataclass,
    get_loader,
    get_savable_loader,
    get_train_dataset,
    get_val_dataset,
    stateless,
)

from megatron_omni.config.schema import DataConfig
from megatron_omni.data.format import (
    image_settings_from,
    load_omni_meta,
    template_config_from,
    tokenizer_fingerprint,
    video_settings_from,
)
from megatron_omni.data.media import MediaError, MediaProcessor, select_backend
from megatron_omni.data.media.deferred import (
    DeferredMediaProcessor,
    DeferredVisual,
    defers_decoding,
    worker_backend_name,
)
from megatron_omni.data.packing import (
    PackingConfig,
    PackingStats,
    SampleInfo,
    select_samples_to_pack,
)
from megatron_omni.data.preprocess import wav_truncation
from megatron_omni.data.templates import (
    IGNORE_INDEX,
    SampleError,
    TemplateConfig,
    template_sample,
)
from megatron_omni.data.tokenizer import OmniTokenizer, load_tokenizer
from megatron_omni.models.rope_index import get_packed_rope_index

log = logging.getLogger("megatron_omni.data.loaders")

__all__ = [
    "LOADER_SKIP_REASONS",
    "TEXT_MODALITY",
    "ModalityLoader",
    "OmniLoaders",
    "OmniSample",
    "OmniTaskEncoder",
    "PackedRow",
    "cook_omni_sample",
    "is_text_batch",
    "make_worker_config",
]

TEXT_MODALITY = "text"
"""The dataset pure-text rows are mixed in from."""
MAX_SAMPLES_PER_SEQUENCE = 100
"""Energon reads at most this many consecutive samples of a shard slice before switching."""

LOADER_SKIP_REASONS = (
    "too_long", "too_many_images", "too_many_patches", "empty",  # packing (packing.py)
    "preference_pair",        # DPO pairs need the alignment loader, not these rows
    "token_count_mismatch",   # decoded/templated length differs from the stored count
    "missing_part",           # a media part named by the record is not in the shard
    "bad_sample",             # the stored sample no longer templates (SampleError)
    "audio_size_mismatch",    # decoded audio length differs from the header's (truncated file)
    "decode_failed",          # a decoder raised instead of reporting the item (any modality)
    # + the media decode reasons of megatron_omni.data.media (corrupt_image, unreadable_video, ...)
)


def is_text_batch(n: int, ratio: float) -> bool:
    """Whether batch ``n`` (0-based) of a mixed stream is a pure-text batch at ``ratio``."""
    if ratio <= 0.0:
        return False
    return int((n + 1) * ratio) > int(n * ratio)


# ------------------------------------------------------------------------------ sample types


@edataclass
class OmniSample(Sample):
    """One shard sample after cooking: the preprocessing record and the raw media bytes."""

    #: The JSON record written by preprocessing (sample, num_tokens, grids, media part names).
    record: dict
    #: Media part name -> encoded bytes (``img0.png`` -> PNG file content).
    media: dict


@edataclass
class PackedRow(Sample):
    """One packed, decoded and templated row (the output of ``pack_selected_samples``)."""

    tokens: torch.Tensor          # long [T]
    labels: torch.Tensor          # long [T], shifted within each sample
    loss_mask: torch.Tensor       # float [T]
    gen_audio_mask: torch.Tensor  # bool [T]
    position_ids: torch.Tensor    # long [3, T]
    cu_seqlens: torch.Tensor      # int32, pad segment included
    vision_order: list            # ("image"|"video", index) of every vision item in token order
    num_tokens: int
    sample_keys: list
    modality: str
    image_pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    video_pixel_values: torch.Tensor
    video_grid_thw: torch.Tensor
    audio_waveforms: list
    image_grids_per_sample: list
    video_grids_per_sample: list
    #: Deferred decoding (``media/deferred.py``): the row's still-encoded images then videos.
    deferred_media: list | None = None


@stateless
@cooker
def cook_omni_sample(sample: dict) -> OmniSample:
    """Cooker of the ``CrudeWebdataset`` shards: parse the JSON record, keep media bytes raw."""
    record = json.loads(sample["json"])
    media = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
    return OmniSample(**basic_sample_keys(sample), record=record, media=media)


# ------------------------------------------------------------------------------ task encoder


class OmniTaskEncoder(TaskEncoder):
    """Energon task encoder of one modality dataset (see the module docstring for the stages).

    Every hook is a pure function of its inputs (Energon ``@stateless``), which is what makes
    save/restore exact; the only side channel is the per-reason skip counter, reported with the
    next batch.
    """

    cookers = [Cooker(cook_omni_sample)]
    decoder = None  # keep media as raw bytes: we decode after packing, with MediaProcessor

    def __init__(self, *, modality: str, tokenizer: OmniTokenizer, packing: PackingConfig,
                 template: TemplateConfig, processor_factory: Callable[[], MediaProcessor],
                 seed: int = 0):
        self.modality = modality
        self.tok = tokenizer
        self.packing = packing
        self.template = template
        self._processor_factory = processor_factory
        self._processor: MediaProcessor | None = None
        self.seed = int(seed)
        self.skipped: Counter = Counter()
        sp = tokenizer.special
        self._vision_start = {sp.image_start: "image", sp.video_start: "video"}

    @property
    def processor(self) -> MediaProcessor:
        # Built lazily inside the (possibly forked) worker: DALI pipelines do not survive a fork.
        if self._processor is None:
            self._processor = self._processor_factory()
        return self._processor

    @staticmethod
    def sample_info(s: OmniSample) -> SampleInfo:
        r = s.record
        if r.get("form") == "text":
            modality = TEXT_MODALITY
        else:  # a chat sample of the text dataset is not "pure text" for the packer
            modality = r.get("modality") if r.get("modality") != TEXT_MODALITY else "chat"
        return SampleInfo(s.__key__, int(r["num_tokens"]), int(r["num_images"]),
                          int(r["num_patches"]), modality)

    # ----------------------------------------------------------------------- packing hooks
    @stateless
    def select_samples_to_pack(self, samples: list[OmniSample]) -> list[list[OmniSample]]:
        keep = []
        for s in samples:
            if s.record.get("form") == "preference":
                self.skipped["preference_pair"] += 1
            else:
                keep.append(s)
        stats = PackingStats(seq_length=self.packing.seq_length)
        groups = select_samples_to_pack(keep, self.packing, info=self.sample_info, stats=stats)
        self.skipped.update(stats.skipped)
        return groups

    @stateless
    def pack_selected_samples(self, samples: list[OmniSample]) -> PackedRow:
        encoded = self._decode_and_template(samples)
        if not encoded:
            raise SkipSample()  # every sample of the row failed; counted above
        return self._concat(encoded)

    @stateless
    def batch(self, rows: list[PackedRow]) -> dict:
        T = self.packing.seq_length
        cu = [0]
        for b, r in enumerate(rows):
            cu += [b * T + int(x) for x in r.cu_seqlens[1:].tolist()]
        cu_t = torch.tensor(cu, dtype=torch.int32)
        waves = [w for r in rows for w in r.audio_waveforms]
        vis, grids = [], []
        for r in rows:
            per_kind = {"image": (r.image_pixel_values, r.image_grid_thw),
                        "video": (r.video_pixel_values, r.video_grid_thw)}
            offsets = {k: [0] + torch.cumsum(g.prod(dim=1), 0).tolist()
                       for k, (_, g) in per_kind.items()}
            for kind, i in r.vision_order:
                pix, g = per_kind[kind]
                vis.append(pix[offsets[kind][i]:offsets[kind][i + 1]])
                grids.append(g[i])
        width = rows[0].image_pixel_values.shape[1]
        deferred = {}
        if any(r.deferred_media for r in rows):  # decoded later, by media.deferred.TrainingDecoder
            deferred = {"deferred_media": [list(r.deferred_media or []) for r in rows],
                        "vision_order": [list(r.vision_order) for r in rows]}
        return {**deferred,
            "__restore_key__": (),
            "tokens": torch.stack([r.tokens for r in rows]),
            "labels": torch.stack([r.labels for r in rows]),
            "loss_mask": torch.stack([r.loss_mask for r in rows]),
            "gen_audio_mask": torch.stack([r.gen_audio_mask for r in rows]),
            "position_ids": torch.stack([r.position_ids for r in rows], dim=1),
            "cu_seqlens": cu_t,
            "max_seqlen": int((cu_t[1:] - cu_t[:-1]).max()),
            "vision_patches": torch.cat(vis) if vis else torch.zeros(0, width),
            "vision_grid_thw": (torch.stack(grids) if grids
                                else torch.zeros(0, 3, dtype=torch.long)),
            "image_pixel_values": torch.cat([r.image_pixel_values for r in rows]),
            "image_grid_thw": torch.cat([r.image_grid_thw for r in rows]),
            "video_pixel_values": torch.cat([r.video_pixel_values for r in rows]),
            "video_grid_thw": torch.cat([r.video_grid_thw for r in rows]),
            "audio_waveforms": waves,
            "audio_lengths": torch.tensor([w.numel() for w in waves], dtype=torch.long),
            "image_grids_per_sample": [r.image_grids_per_sample for r in rows],
            "video_grids_per_sample": [r.video_grids_per_sample for r in rows],
            "sample_keys": [list(r.sample_keys) for r in rows],
            "sample_names": [k for r in rows for k in r.sample_keys],
            "num_tokens": torch.tensor([r.num_tokens for r in rows], dtype=torch.long),
            "modality": self.modality,
        }

    @stateless
    def encode_batch(self, batch: dict) -> dict:
        batch["skipped"] = dict(self.skipped)
        self.skipped.clear()
        return batch

    # ----------------------------------------------------------------------- internals
    def _skip(self, reason: str, key: str, detail: Any = "") -> None:
        self.skipped[reason] += 1
        log.debug("skipping %s: %s %s", key, reason, detail)

    def _decode_and_template(self, samples: list[OmniSample]) -> list[dict]:
        """Decode every medium of the row in one call per kind, then template each sample.
        Returns the samples that survived, each as a dict of lists."""
        proc = self.processor
        wanted: list[tuple[OmniSample, dict] | None] = []
        imgs, vids, seeds, auds = [], [], [], []
        for s in samples:
            m = s.record["media"]
            try:
                srcs = {k: [s.media[p] for p in m.get(k, [])]
                        for k in ("images", "videos", "audios")}
            except KeyError as e:
                self._skip("missing_part", s.__key__, e)
                wanted.append(None)
                continue
            short = next((w for w in map(wav_truncation, srcs["audios"]) if w), "")
            if short:  # decoders would silently return fewer samples than the header says
                self._skip("audio_size_mismatch", s.__key__, short)
                wanted.append(None)
                continue
            spans = {"images": (len(imgs), len(imgs) + len(srcs["images"])),
                     "videos": (len(vids), len(vids) + len(srcs["videos"])),
                     "audios": (len(auds), len(auds) + len(srcs["audios"]))}
            imgs += srcs["images"]
            vids += srcs["videos"]
            seeds += [(zlib.crc32(s.__key__.encode()) + self.seed + j) & 0x7FFFFFFF
                      for j in range(len(srcs["videos"]))]
            auds += srcs["audios"]
            wanted.append((s, spans))
        dec = {
            "images": _decode_guarded(proc.images, imgs),
            "videos": _decode_guarded(proc.videos, vids, seeds),
            "audios": _decode_guarded(proc.audios, auds),
        }
        out = []
        for item in wanted:
            if item is None:
                continue
            s, spans = item
            got = {k: dec[k][a:b] for k, (a, b) in spans.items()}
            err = next((x for k in got for x in got[k] if isinstance(x, MediaError)), None)
            if err is not None:
                self._skip(err.reason, s.__key__, err)
                continue
            stored = s.record.get("audio_num_samples")
            if stored is not None and [int(w.numel()) for w in got["audios"]] != list(stored):
                self._skip("audio_size_mismatch", s.__key__,
                           f"decoded {[int(w.numel()) for w in got['audios']]} samples, header "
                           f"said {stored}")
                continue
            enc = self._template(s, got)
            if enc is not None:
                out.append(enc)
        return out

    def _template(self, s: OmniSample, got: dict) -> dict | None:
        r = s.record
        for kind, field in (("images", "image"), ("videos", "video")):
            toks = [v.num_tokens for v in got[kind]]
            grids = [list(v.grid_thw) for v in got[kind]]
            stored = [list(g) for g in r[f"{field}_grid_thw"]]
            if toks != list(r[f"{field}_tokens"]) or grids != stored:
                self._skip("token_count_mismatch", s.__key__, f"{field} grids {grids}")
                return None
        try:
            t = template_sample(r["sample"], self.tok, image_tokens=r["image_tokens"],
                                video_tokens=r["video_tokens"], config=self.template)
        except SampleError as e:
            self._skip("bad_sample", s.__key__, e)
            return None
        return self._encode(s, t, got)

    def _encode(self, s: OmniSample, t, got: dict) -> dict | None:
        """A templated chat/text sample as the dict ``_concat`` packs (None: skipped)."""
        r = s.record
        if not hasattr(t, "input_ids"):  # a PreferencePair (filtered before packing already)
            self._skip("preference_pair", s.__key__)
            return None
        n = len(t.input_ids)
        if n != int(r["num_tokens"]) or n > self.packing.seq_length:
            self._skip("token_count_mismatch", s.__key__, f"{n} != stored {r['num_tokens']}")
            return None
        return self._sequence(s.__key__, t, got)

    def _sequence(self, key: str, t, got: dict) -> dict:
        n = len(t.input_ids)
        # Next-token targets inside the sample: position i predicts token i + 1; it is trained on
        # where the template gives token i + 1 a label. The last position has no target.
        loss = [lab != IGNORE_INDEX for lab in t.labels[1:]] + [False]
        gen_audio = [False] * n
        for a, b in t.gen_audio_spans:
            for i in range(max(a - 1, 0), b - 1):
                gen_audio[i] = loss[i]
        return {
            "key": key,
            "ids": t.input_ids,
            "labels": t.input_ids[1:] + [self.tok.pad_id],
            "loss": loss,
            "gen_audio": gen_audio,
            "images": got["images"],
            "videos": got["videos"],
            "audios": got["audios"],
        }

    def _concat(self, enc: list[dict]) -> PackedRow:
        T = self.packing.seq_length
        ids = [i for e in enc for i in e["ids"]]
        labels = [i for e in enc for i in e["labels"]]
        loss = [x for e in enc for x in e["loss"]]
        gen_audio = [g for e in enc for g in e["gen_audio"]]
        n = len(ids)
        pad = T - n
        vision_order = []  # image / video blocks in token order, numbered across the row
        counts = {"image": 0, "video": 0}
        for e in enc:
            for tid in e["ids"]:
                kind = self._vision_start.get(tid)
                if kind is not None:
                    vision_order.append((kind, counts[kind]))
                    counts[kind] += 1
        lengths = [len(e["ids"]) for e in enc]
        cu = [0]
        for ln in lengths:
            cu.append(cu[-1] + ln)
        cu_padded = cu + ([T] if pad > 0 else [])
        tokens = torch.tensor(ids + [self.tok.pad_id] * pad, dtype=torch.long)
        labels_t = torch.tensor(labels + [self.tok.pad_id] * pad, dtype=torch.long)
        loss_mask = torch.tensor(loss + [False] * pad, dtype=torch.float)
        gen_t = torch.tensor(gen_audio + [False] * pad, dtype=torch.bool)

        def grids(kind: str, e: dict) -> torch.Tensor:
            g = [list(v.grid_thw) for v in e[kind]]
            return torch.tensor(g, dtype=torch.long).reshape(-1, 3)

        img_per = [grids("images", e) for e in enc]
        vid_per = [grids("videos", e) for e in enc]
        pos = get_packed_rope_index(tokens, cu, img_per, vid_per, token_ids=self.tok.special,
                                    spatial_merge_size=self.processor.image_settings.merge_size)
        images = [v for e in enc for v in e["images"]]
        videos = [v for e in enc for v in e["videos"]]
        deferred = [v for v in images + videos if isinstance(v, DeferredVisual)] or None
        for e, a, b in zip(enc, cu, cu[1:]):
            for v in e["images"] + e["videos"]:
                if isinstance(v, DeferredVisual):
                    v.span = (a, b)
        s = self.processor.image_settings
        width = 3 * s.temporal_patch_size * s.patch_size * s.patch_size
        return PackedRow(
            __key__=",".join(e["key"] for e in enc),
            __restore_key__=(),
            tokens=tokens,
            labels=labels_t,
            loss_mask=loss_mask,
            gen_audio_mask=gen_t,
            position_ids=pos,
            cu_seqlens=torch.tensor(cu_padded, dtype=torch.int32),
            vision_order=vision_order,
            num_tokens=n,
            sample_keys=[e["key"] for e in enc],
            modality=self.modality,
            image_pixel_values=_cat_patches(images, width),
            image_grid_thw=torch.cat(img_per) if img_per else torch.zeros(0, 3, dtype=torch.long),
            video_pixel_values=_cat_patches(videos, width),
            video_grid_thw=torch.cat(vid_per) if vid_per else torch.zeros(0, 3, dtype=torch.long),
            audio_waveforms=[w for e in enc for w in e["audios"]],
            image_grids_per_sample=img_per,
            video_grids_per_sample=vid_per,
            deferred_media=deferred,
        )


def _decode_guarded(fn: Callable, items: list, *extra: list) -> list:
    """``fn(items, *extra)`` (one call per kind for the row); if it raises instead of returning
    a MediaError per bad item, decode item by item so only the failing ones are lost, each as a
    ``decode_failed`` MediaError (skipped and counted, never raised into the training loop)."""
    if not items:
        return []
    try:
        return fn(items, *extra)
    except Exception:  # noqa: BLE001 - isolated per item below
        out = []
        for i, item in enumerate(items):
            try:
                out += fn([item], *[[e[i]] for e in extra])
            except Exception as e:  # noqa: BLE001 - becomes a counted skip
                out.append(MediaError("decode_failed", f"{type(e).__name__}: {e}"))
        return out


def _cat_patches(items: Sequence, width: int) -> torch.Tensor:
    if not items:
        return torch.zeros(0, width)
    return torch.cat([v.patches for v in items])


# ------------------------------------------------------------------------------ loaders


def make_worker_config(cfg: DataConfig, *, dp_rank: int, dp_size: int, dp_group=None,
                       seed_offset: int | None = None,
                       error_handler: Callable | None = None) -> WorkerConfig:
    """Energon's per-rank config: this rank's slice of the data-parallel group."""
    kw = {}
    if error_handler is not None:
        kw["global_error_handler"] = error_handler
    return WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=cfg.num_workers,
                        data_parallel_group=dp_group,
                        seed_offset=cfg.seed if seed_offset is None else seed_offset, **kw)


def _dp_from_megatron() -> tuple[int, int, Any]:
    """This rank in the data-parallel group, from megatron-core's parallel state. Without it, a
    single process (no torch.distributed) is rank 0 of 1; a distributed job without megatron's
    parallel state is an error: guessing "rank 0 of 1" would make every rank read the same data.
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                ps.get_data_parallel_group(with_context_parallel=False))
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise RuntimeError(
            "OmniLoaders: torch.distributed runs on "
            f"{torch.distributed.get_world_size()} ranks but megatron-core's parallel state is "
            "not initialised, so the data-parallel rank is unknown; pass dp_rank= and dp_size= "
            "(the trainer does)")
    return 0, 1, None


class ModalityLoader:
    """The training stream of one modality group: an Energon savable loader, with a pure-text
    loader's batches mixed in at ``text_ratio`` (see :func:`is_text_batch`)."""

    def __init__(self, name: str, main, text=None, text_ratio: float = 0.0):
        self.name = name
        self.main, self.text = main, text
        self.text_ratio = text_ratio if text is not None else 0.0
        self.batches = 0
        self.skipped: Counter = Counter()
        self._iters: dict[str, Iterator] = {}

    def _next_from(self, which: str) -> dict:
        loader = self.main if which == "main" else self.text
        if which not in self._iters:
            self._iters[which] = iter(loader)
        try:
            return next(self._iters[which])
        except StopIteration:  # an epoch of a non-repeating loader: start the next one
            self._iters[which] = iter(loader)
            return next(self._iters[which])

    def __iter__(self) -> ModalityLoader:
        return self

    def __next__(self) -> dict:
        which = "text" if is_text_batch(self.batches, self.text_ratio) else "main"
        batch = self._next_from(which)
        self.batches += 1
        for reason, n in batch.get("skipped", {}).items():
            if reason not in self.skipped:
                log.warning("%s: skipping samples (%s); counts in ModalityLoader.skipped",
                            self.name, reason)
            self.skipped[reason] += n
        batch["group"] = self.name
        return batch

    def save_state(self) -> dict:
        return {
            "batches": self.batches,
            "skipped": dict(self.skipped),
            # Energon returns None for a loader whose workers never started (= initial state).
            "main": self.main.save_state_rank(),
            "mixes_text": self.text is not None,
            "text": self.text.save_state_rank() if self.text is not None else None,
        }

    def restore_state(self, state: Mapping) -> None:
        if self._iters:
            raise RuntimeError("restore_state must be called before the first batch is drawn")
        self.batches = int(state["batches"])
        self.skipped = Counter(state["skipped"])
        self.main.restore_state_rank(state["main"])
        if bool(state.get("mixes_text")) != (self.text is not None):
            was = "on" if state.get("mixes_text") else "off"
            raise ValueError(f"{self.name}: pure-text mixing was {was} when the state was saved; "
                             "pure_text_ratio must stay 0 (or stay > 0) across a resume")
        if self.text is not None:
            self.text.restore_state_rank(state["text"])


@dataclass
class _Dataset:
    path: Path
    meta: dict


def loader_media_backend(name: str):
    """The media backend of the loader side (Energon workers, or the training process with
    ``num_workers: 0``): ``data.media_backend`` with DALI restricted to its CPU operators.

    Energon forks its workers after the trainer initialised CUDA, so a GPU pipeline built in a
    worker fails ("Cannot re-initialize CUDA in forked subprocess"), and one per loader and worker
    (9 loaders x 4 workers) would be dozens of GPU pipelines per rank. Loader-side decoding
    therefore never touches the GPU, whatever the machine has.
    """
    return select_backend(name, dali_device="cpu")


class OmniLoaders:
    """One training loader per modality of ``cfg.modalities`` (``cfg.path/<modality>``).

    Args:
        cfg: the data config (seq_length, media budgets, micro_batch_size, pure_text_ratio, seed,
            num_workers, packing/shuffle buffers, media_backend, path, tokenizer).
        tokenizer: an :class:`OmniTokenizer`, or None to load ``cfg.tokenizer``.
        dp_rank, dp_size, dp_group: this rank in the data-parallel group; default: from
            megatron-core's parallel state when initialised, else (0, 1).
        error_handler: Energon's error handler for exceptions in our code (default: Energon's,
            which logs and skips); tests pass one that re-raises.
        media_processor: a factory for the :class:`MediaProcessor` used to decode (default: one
            from ``cfg.media_backend`` with the sizes stored by preprocessing).
        preference_modality: the dataset of preference pairs (alignment stage), loaded with
            :class:`~megatron_omni.data.preference.PreferenceTaskEncoder` (added to the
            modalities if absent).
    """

    def __init__(self, cfg: DataConfig, tokenizer: OmniTokenizer | None = None, *,
                 dp_rank: int | None = None, dp_size: int | None = None, dp_group=None,
                 error_handler: Callable | None = None,
                 media_processor: Callable[[dict], MediaProcessor] | None = None,
                 modalities: Sequence[str] | None = None,
                 preference_modality: str | None = None):
        if cfg.path is None:
            raise ValueError("data.path is not set: point it at the output of "
                             "tools/preprocess_data.py")
        if tokenizer is None:
            if cfg.tokenizer is None:
                raise ValueError("data.tokenizer is not set and no tokenizer was given")
            tokenizer = load_tokenizer(cfg.tokenizer)
        if dp_rank is None or dp_size is None:
            dp_rank, dp_size, dp_group = _dp_from_megatron()
        self.cfg, self.tok = cfg, tokenizer
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group
        self.error_handler = error_handler
        self._processor_factory = media_processor
        #: Images/videos travel encoded and are decoded in the training process (media/deferred.py).
        self.defer_decoding = defers_decoding(cfg.media_backend)
        self.packing = PackingConfig(seq_length=cfg.seq_length,
                                     max_images_per_row=cfg.max_images_per_row,
                                     max_patches_per_row=cfg.max_vision_patches_per_row)
        self.modalities = list(modalities if modalities is not None else cfg.modalities)
        # The dataset of DPO pairs (alignment stage): packed by data/preference.py, pairs kept
        # whole, never mixed with pure text.
        self.preference_modality = preference_modality
        if preference_modality is not None and preference_modality not in self.modalities:
            self.modalities.append(preference_modality)
        self._fp = tokenizer_fingerprint(tokenizer)
        self._datasets: dict[str, _Dataset] = {}
        self.loaders: dict[str, ModalityLoader] = {}
        mix_text = cfg.pure_text_ratio > 0
        for k, m in enumerate(self.modalities):
            main = self._savable(m, seed_offset=cfg.seed)
            text = None
            if mix_text and m not in (TEXT_MODALITY, preference_modality):
                # Its own seed per group, so groups do not draw the same text rows in one step.
                text = self._savable(TEXT_MODALITY, seed_offset=cfg.seed + 7919 * (k + 1))
            self.loaders[m] = ModalityLoader(m, main, text, cfg.pure_text_ratio)

    # ----------------------------------------------------------------------- building blocks
    def dataset(self, modality: str) -> _Dataset:
        if modality not in self._datasets:
            path = Path(self.cfg.path) / modality
            if not (path / ".nv-meta" / "dataset.yaml").is_file():
                raise FileNotFoundError(
                    f"no prepared dataset for modality {modality!r} at {path}; run "
                    f"tools/preprocess_data.py on {modality}.jsonl (data.path={self.cfg.path})")
            meta = load_omni_meta(path)
            if meta.get("tokenizer") != self._fp:
                raise ValueError(
                    f"{path} was preprocessed with another tokenizer (fingerprint "
                    f"{meta.get('tokenizer')}, this one is {self._fp}): its stored token counts "
                    "would be wrong; rerun tools/preprocess_data.py with data.tokenizer")
            self._datasets[modality] = _Dataset(path, meta)
        return self._datasets[modality]

    def _make_processor(self, meta: dict) -> MediaProcessor:
        if self._processor_factory is not None:
            return self._processor_factory(meta)
        tmpl = template_config_from(meta["template"])
        cls = DeferredMediaProcessor if self.defer_decoding else MediaProcessor
        return cls(loader_media_backend(worker_backend_name(self.cfg.media_backend)),
                              image=image_settings_from(meta["image"]),
                              video=video_settings_from(meta["video"]),
                              audio_tokens=tmpl.audio_tokens_per_clip)

    def task_encoder(self, modality: str) -> OmniTaskEncoder:
        ds = self.dataset(modality)
        meta = ds.meta
        cls = OmniTaskEncoder
        if modality == self.preference_modality:
            from megatron_omni.data.preference import PreferenceTaskEncoder as cls
        return cls(modality=modality, tokenizer=self.tok, packing=self.packing,
                               template=template_config_from(meta["template"]),
                               processor_factory=lambda: self._make_processor(meta),
                               seed=self.cfg.seed)

    def worker_config(self, seed_offset: int) -> WorkerConfig:
        return make_worker_config(self.cfg, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                  dp_group=self.dp_group, seed_offset=seed_offset,
                                  error_handler=self.error_handler)

    def _savable(self, modality: str, seed_offset: int):
        ds = get_train_dataset(
            self.dataset(modality).path,
            split_part="train",
            worker_config=self.worker_config(seed_offset),
            batch_size=self.cfg.micro_batch_size,
            packing_buffer_size=self.cfg.packing_buffer_size,
            shuffle_buffer_size=self.cfg.shuffle_buffer_size,
            max_samples_per_sequence=MAX_SAMPLES_PER_SEQUENCE,
            task_encoder=self.task_encoder(modality),
        )
        return get_savable_loader(ds)

    # ----------------------------------------------------------------------- public API
    def __getitem__(self, modality: str) -> ModalityLoader:
        return self.loaders[modality]

    def next(self, modality: str) -> dict:
        """The next training batch of ``modality``'s group."""
        return next(self.loaders[modality])

    def skipped(self) -> dict[str, Counter]:
        """Samples dropped per modality group and reason since the start (resumes included)."""
        return {m: Counter(ld.skipped) for m, ld in self.loaders.items()}

    def save_state(self) -> dict:
        """This rank's state of every loader (picklable); see :meth:`restore_state`."""
        return {"modalities": list(self.loaders), "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "loaders": {m: ld.save_state()
                                                     for m, ld in self.loaders.items()}}

    def restore_state(self, state: Mapping) -> None:
        """Continue where :meth:`save_state` was taken (call before the first batch)."""
        if list(state["modalities"]) != list(self.loaders):
            raise ValueError(f"saved loaders {state['modalities']} != configured "
                             f"{list(self.loaders)}")
        if (state["dp_rank"], state["dp_size"]) != (self.dp_rank, self.dp_size):
            raise ValueError(f"state of DP rank {state['dp_rank']}/{state['dp_size']} restored on "
                             f"{self.dp_rank}/{self.dp_size}")
        for m, ld in self.loaders.items():
            ld.restore_state(state["loaders"][m])

    def val_loader(self, modality: str, *, limit: int | None = None):
        """One pass over the held-out ``val`` split of ``modality`` (this rank's slice), packed
        and batched like training; never mixed, shuffled or repeated."""
        ds = get_val_dataset(
            self.dataset(modality).path,
            split_part="val",
            worker_config=self.worker_config(self.cfg.seed),
            batch_size=self.cfg.micro_batch_size,
            packing_buffer_size=self.cfg.packing_buffer_size,
            limit=limit,
            task_encoder=self.task_encoder(modality),
        )
        return get_loader(ds)
