"""Data-side checks of a run configuration, before any process group starts.

:func:`validate` (``config/validate.py``) checks the configuration against itself; this module
checks it against the files it names: the tokenizer (and ``model.llm.vocab_size`` against it),
``data.path`` and one prepared dataset per modality with the splits the stage needs (``val`` for
the dynamic balance, the ``text`` dataset for pure-text mixing), the tokenizer the data was
prepared with, and ``data.seq_length`` against the token counts stored at preprocessing (how many
samples would not fit). A few small files are read; no shard is opened. Every message names the
setting and what to change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .schema import ConfigError, OmniConfig

log = logging.getLogger(__name__)


def _fail(errors: list[str]) -> None:
    if errors:
        raise ConfigError("invalid configuration (data):\n  - " + "\n  - ".join(errors))


def load_checked_tokenizer(cfg: OmniConfig):
    """The tokenizer of ``data.tokenizer`` with ``model.llm.vocab_size`` checked against it
    (None when no tokenizer is configured)."""
    if not cfg.data.tokenizer:
        return None
    from ..data.tokenizer import load_tokenizer

    path = Path(cfg.data.tokenizer)
    if not path.exists():
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} does not exist; point it at the "
                          f"tokenizer the data was preprocessed with")
    tok = load_tokenizer(str(path), speech_codebook_size=cfg.model.speech_codebook_size)
    if tok.vocab_size != cfg.model.llm.vocab_size:
        raise ConfigError(
            f"model.llm.vocab_size ({cfg.model.llm.vocab_size}) != the tokenizer's vocabulary "
            f"with special tokens and speech codes ({tok.vocab_size}, data.tokenizer="
            f"{cfg.data.tokenizer}, model.speech_codebook_size="
            f"{cfg.model.speech_codebook_size}); set model.llm.vocab_size={tok.vocab_size}")
    return tok


def too_long(token_counts: dict, seq_length: int) -> tuple[int, int, int]:
    """(samples longer than seq_length, samples in all, longest) from a stored histogram
    ``{num_tokens: samples}``."""
    over = total = longest = 0
    for n, c in token_counts.items():
        n, c = int(n), int(c)
        total += c
        longest = max(longest, n)
        if n > seq_length:
            over += c
    return over, total, longest


def validate_data(cfg: OmniConfig, need_data: bool = True) -> Optional[object]:
    """Raise ConfigError for data settings that cannot work; return the loaded tokenizer.

    ``need_data=False`` (a caller-supplied data source) checks only the tokenizer.
    """
    tok = load_checked_tokenizer(cfg)
    st = cfg.stage
    errors: list[str] = []
    if st.balance == "step" and st.step_balance_file and not Path(st.step_balance_file).is_file():
        errors.append(f"stage.step_balance_file={st.step_balance_file} does not exist; write it "
                      f"with --calibrate-step-balance or fix the path")
    if st.init_from and not Path(st.init_from).exists():
        errors.append(f"stage.init_from={st.init_from} does not exist; run the previous stage "
                      f"first or fix the path")
    if cfg.training.load and not Path(cfg.training.load).exists():
        errors.append(f"training.load={cfg.training.load} does not exist")
    if not need_data:
        _fail(errors)
        return tok
    d = cfg.data
    if not d.path:
        errors.append("data.path is not set; point it at the output of tools/preprocess_data.py")
        _fail(errors)
    root = Path(d.path)
    if not root.is_dir():
        errors.append(f"data.path={d.path} is not a directory; point it at the output of "
                      f"tools/preprocess_data.py")
        _fail(errors)
    if tok is None:
        errors.append("data.tokenizer is not set; give the tokenizer the data was preprocessed "
                      "with")
    from ..data.format import is_prepared, omni_meta_path, tokenizer_fingerprint

    fp = tokenizer_fingerprint(tok) if tok is not None else None
    wanted = list(d.modalities)
    if d.pure_text_ratio > 0 and "text" not in wanted:
        wanted.append("text")
    for m in wanted:
        ds = root / m
        why = "" if m in d.modalities else " (needed by data.pure_text_ratio > 0)"
        meta_file = omni_meta_path(ds)
        if not is_prepared(ds):
            errors.append(f"no prepared dataset for modality {m!r}{why} at {ds}; run "
                          f"tools/preprocess_data.py on {m}.jsonl, or remove {m} from "
                          f"data.modalities")
            continue
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            errors.append(f"{meta_file} is unreadable ({e}); rerun tools/preprocess_data.py")
            continue
        if fp is not None and meta.get("tokenizer") != fp:
            errors.append(f"{ds} was preprocessed with another tokenizer than data.tokenizer="
                          f"{d.tokenizer}; rerun tools/preprocess_data.py with it (or point "
                          f"data.tokenizer at the one used)")
        splits = meta.get("splits", {})
        if not splits.get("train"):
            errors.append(f"{ds} has no training samples (split 'train'); check "
                          f"{m}.jsonl and the preprocessing report")
        if st.balance == "dynamic" and m in d.modalities and not splits.get("val"):
            errors.append(f"stage.balance=dynamic needs held-out data for every modality, but "
                          f"{m!r} has no 'val' split at {ds}; preprocess a {m}_val.jsonl or use "
                          f"another stage.balance")
        counts = (meta.get("token_counts") or {}).get("train")
        if counts:
            over, total, longest = too_long(counts, d.seq_length)
            if over == total:
                errors.append(
                    f"data.seq_length={d.seq_length} is shorter than every {m!r} training "
                    f"sample ({total} samples, shortest "
                    f"{min(int(n) for n in counts)} tokens, longest {longest}); raise "
                    f"data.seq_length to at least {longest}")
            elif over:
                log.warning("data.seq_length=%d: %d of %d %r training samples are longer (up to "
                            "%d tokens) and will be skipped (too_long); raise data.seq_length "
                            "to %d to keep them", d.seq_length, over, total, m, longest, longest)
    _fail(errors)
    return tok
