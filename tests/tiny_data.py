"""A tiny prepared omni dataset for trainer-level tests, built one way everywhere: the
synthetic JSONL of ``megatron_omni/data/synthetic.py`` -> a tiny byte-level BPE tokenizer ->
Energon shards by ``preprocess``."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from megatron_omni.data.preprocess import preprocess
from megatron_omni.data.synthetic import corpus_texts, make_synthetic_dataset
from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

SPEECH_CODES = 64


def prepare_tiny_dataset(base: Path, num_per_modality: int, seed: int,
                         num_val_per_modality: int,
                         splits: Mapping[str, Sequence[str]] | None = None,
                         preference: bool = False, media_root: bool = False,
                         out_name: str = "prepared") -> dict:
    """Write ``base/raw``, ``base/tokenizer.json`` and ``base/<out_name>``.

    ``splits``: modality -> ("train"[, "val"]) to preprocess (None: every file in raw/);
    ``media_root``: pass raw/ as preprocessing's media root. Returns ``base``, ``raw``,
    ``prepared``, ``tok``, ``tokenizer``, ``vocab`` and the preprocessing ``report``."""
    raw = base / "raw"
    make_synthetic_dataset(raw, num_per_modality=num_per_modality, seed=seed,
                           num_val_per_modality=num_val_per_modality,
                           **({"preference": True} if preference else {}))
    tok = train_tiny_tokenizer(corpus_texts(raw), 400, base / "tokenizer.json")
    tokenizer = load_tokenizer(tok, speech_codebook_size=SPEECH_CODES)
    inputs = raw if splits is None else {
        m: {s: raw / (f"{m}.jsonl" if s == "train" else f"{m}_{s}.jsonl") for s in ss}
        for m, ss in splits.items()}
    kw = {"media_root": raw} if media_root else {}
    report = preprocess(inputs, base / out_name, tokenizer, workers=1, progress=False, **kw)
    return {"base": base, "raw": raw, "prepared": base / out_name, "tok": tok,
            "tokenizer": tokenizer, "vocab": tokenizer.vocab_size, "report": report}
