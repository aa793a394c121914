"""The on-disk format of a prepared dataset: names, the ``omni.json`` settings record and its
readers, in one place for everything that writes or reads it (preprocessing, the loaders,
generation, data validation before training, the Slurm merge of preprocessing parts).

A prepared dataset root (``DataConfig.path``, written by ``tools/preprocess_data.py``)::

    out_dir/
      preprocess_report.json        written / skipped per modality, split and reason
      skipped.jsonl                 one line per skipped input line (file, line, reason, message)
      <modality>/                   one Energon dataset per modality (DataConfig.path/<modality>)
        train-000000.tar ...        training shards
        val-000000.tar ...          validation shards (the ``val`` split; never trained on)
        .nv-meta/dataset.yaml       CrudeWebdataset, subflavors {modality: <modality>}
        .nv-meta/split.yaml         train: train-*.tar, val: val-*.tar
        .nv-meta/omni.json          the settings the token counts depend on (checked by loaders)
        .nv-meta/.info.json, index.sqlite, ...   Energon's own prepare output

One sample in a shard (key ``<file stem>-<line index>``, e.g. ``image-000000012``):

* ``<key>.json``: ``{"key", "modality", "split", "source", "form", "sample": <the JSONL object>,
  "num_tokens", "sequence_lengths", "num_images", "num_patches", "image_tokens",
  "image_grid_thw", "video_tokens", "video_grid_thw", "audio_num_samples", "media": {"images":
  [part, ...], "videos": [...], "audios": [...]}}``. ``num_tokens`` is the exact templated length
  (``templates.count_tokens``), ``num_images`` the vision items (images + videos) and
  ``num_patches`` the pre-merge ViT patches, i.e. everything the packer budgets with
  (:class:`~megatron_omni.data.packing.SampleInfo`).
* ``<key>.img0.png``, ``<key>.vid0.webm``, ``<key>.aud0.wav``, ...: the media files, byte for byte,
  in placeholder order.

``omni.json`` holds :func:`settings_dict` (format version, image / video / template settings,
the tokenizer's :func:`tokenizer_fingerprint`) plus ``modality``, ``fingerprint``
(:func:`settings_fingerprint` of the settings: parts of one dataset must agree on it), ``splits``
(samples per split) and ``token_counts`` (``{split: {num_tokens: samples}}``).

This module imports nothing heavy (no media stack, no torch): the merge of preprocessing parts
imports it at start-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover - type names only
    from megatron_omni.data.media.vision import ImageSettings, VideoSettings
    from megatron_omni.data.templates import TemplateConfig
    from megatron_omni.data.tokenizer import OmniTokenizer

MODALITIES = ("text", "image", "video", "audio", "interleaved", "preference")
"""Modality datasets preprocessing looks for (``<name>.jsonl``, ``<name>_val.jsonl``)."""
SPLITS = ("train", "val")
META_DIR = ".nv-meta"
"""Energon's metadata folder inside each modality dataset."""
OMNI_META = "omni.json"
"""Our settings record, ``<modality>/.nv-meta/omni.json``."""
DATASET_YAML = "dataset.yaml"
"""Energon's dataset description, ``<modality>/.nv-meta/dataset.yaml``."""
REPORT_NAME = "preprocess_report.json"
SKIPPED_NAME = "skipped.jsonl"
FORMAT_VERSION = 1
ENERGON_INDEX_FILES = ("index.sqlite", "index.uuid", ".info.json", ".info.yaml", "split.yaml")
"""What Energon's prepare step writes into ``.nv-meta`` (removed before it runs again)."""

# A probe text for the tokenizer fingerprint: plain words, digits, whitespace, special strings.
_FINGERPRINT_TEXT = ("The quick brown fox, 12 + 7 = 19.\n\n  naïve café <image> <|eot_id|> "
                     "<speech_3> reverse: cat dog -> dog cat")


def omni_meta_path(dataset_dir: str | Path) -> Path:
    """``<dataset_dir>/.nv-meta/omni.json``."""
    return Path(dataset_dir) / META_DIR / OMNI_META


def is_prepared(dataset_dir: str | Path) -> bool:
    """Whether ``dataset_dir`` holds a prepared modality dataset (Energon's dataset.yaml and our
    omni.json)."""
    meta = Path(dataset_dir) / META_DIR
    return (meta / DATASET_YAML).is_file() and (meta / OMNI_META).is_file()


def tokenizer_fingerprint(tok: OmniTokenizer) -> str:
    """Short hash of what templating depends on: vocabulary sizes, chat ids, and the ids of a
    probe text. Two tokenizers with the same fingerprint count tokens the same way."""
    probe = {
        "base": tok.base_vocab_size,
        "vocab": tok.vocab_size,
        "chat": [tok.bos_id, tok.eos_id, tok.start_header_id, tok.end_header_id, tok.eot_id,
                 tok.pad_id],
        "ids": tok.encode(_FINGERPRINT_TEXT),
    }
    return hashlib.sha256(json.dumps(probe, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    return obj


def settings_dict(cfg: Any, tok: OmniTokenizer) -> dict[str, Any]:
    """The settings stored in ``omni.json`` (``cfg``: a ``PreprocessConfig``): a loader must
    template with the same ones."""
    return {
        "format_version": FORMAT_VERSION,
        "image": _jsonable(cfg.image),
        "video": _jsonable(cfg.video),
        "template": _jsonable(cfg.template),
        "tokenizer": tokenizer_fingerprint(tok),
    }


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """Short hash of :func:`settings_dict`'s output."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_omni_meta(dataset_dir: str | Path) -> dict[str, Any]:
    """``.nv-meta/omni.json`` of one prepared modality dataset."""
    p = omni_meta_path(dataset_dir)
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: {dataset_dir} was not written by "
                                "tools/preprocess_data.py (or by an older version); rerun it")
    return json.loads(p.read_text(encoding="utf-8"))


def image_settings_from(d: Mapping[str, Any]) -> ImageSettings:
    """The ``image`` section of ``omni.json`` as :class:`ImageSettings`."""
    from megatron_omni.data.media.vision import ImageSettings

    d = dict(d)
    for k in ("mean", "std"):
        if k in d:
            d[k] = tuple(d[k])
    return ImageSettings(**d)


def video_settings_from(d: Mapping[str, Any]) -> VideoSettings:
    """The ``video`` section of ``omni.json`` as :class:`VideoSettings`."""
    from megatron_omni.data.media.vision import VideoSettings

    return VideoSettings(**d)


def template_config_from(d: Mapping[str, Any]) -> TemplateConfig:
    """The ``template`` section of ``omni.json`` as :class:`TemplateConfig`."""
    from megatron_omni.data.templates import TemplateConfig

    return TemplateConfig(**d)


def prepare_energon(ds_dir: str | Path, shards: Sequence[str], modality: str,
                    workers: int) -> None:
    """Energon's ``energon prepare``, non-interactive: index the shards, write the split and the
    dataset.yaml (CrudeWebdataset: samples stay raw dicts; the loader's cooker types them)."""
    import yaml
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    ds_dir = Path(ds_dir)
    meta = ds_dir / META_DIR
    meta.mkdir(parents=True, exist_ok=True)
    for stale in ENERGON_INDEX_FILES:
        (meta / stale).unlink(missing_ok=True)
    WebdatasetPreparator.prepare_dataset(
        ds_dir, list(shards),
        # (no backslashes: Energon brace-expands the patterns, which eats them)
        split_parts_patterns=[("train", "^train-[0-9]+[.]tar$"), ("val", "^val-[0-9]+[.]tar$")],
        workers=max(1, min(workers, len(shards))),
    )
    dataset_yaml = {"__module__": "megatron.energon", "__class__": "CrudeWebdataset",
                    "subflavors": {"modality": modality}}
    (meta / DATASET_YAML).write_text(yaml.safe_dump(dataset_yaml, sort_keys=False))
