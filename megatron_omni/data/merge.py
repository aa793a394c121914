"""Combine the parts of a preprocessing job array into ONE Energon dataset per modality.

``slurm/preprocess_array.sbatch`` runs ``omni-preprocess`` once per part (array task)
into ``OUT/parts/part-NNNNN/<modality>/``. Each part is a complete dataset on its own, but
training reads exactly one dataset per modality (``data.path/<modality>``), and Energon's index
requires sample keys to be unique within a dataset, while every part names its samples after its
input file (``image-000000012`` in every part). So:

1. ``rekey PART_DIR`` (run by each array task right after preprocessing): rewrites the part's
   shards so every sample key starts with the part name (``part-00003-image-000000012``),
   streaming tar to tar (one extra shard of space), and drops the part's own Energon index.
   Idempotent: shards already rekeyed are skipped.
2. ``merge OUT`` (one small job after the whole array, ``--dependency=afterok``): checks that
   every part finished and that all parts were made with the same tokenizer and media settings
   (``.nv-meta/omni.json`` fingerprints), hard-links (copies across file systems) the shards into
   ``OUT/<modality>/train-NNNNNN.tar`` / ``val-NNNNNN.tar``, runs Energon's prepare step over all
   of them (the index), writes ``omni.json`` with the summed split sizes and a combined
   ``OUT/preprocess_report.json`` / ``OUT/skipped.jsonl``. ``data.path=OUT`` then trains on it.
   Re-running it rebuilds the merged datasets from the parts (which are kept).

The command line is ``omni-merge-parts`` (``python -m megatron_omni.cli.merge_parts``, what the
sbatch script runs; ``slurm/merge_parts.py`` is the same)::

    omni-merge-parts rekey OUT/parts/part-00003
    omni-merge-parts merge OUT [--workers 8] [--allow-missing]
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path

# The dataset format preprocessing writes (a light module: no media stack, no torch).
from megatron_omni.data.format import (
    ENERGON_INDEX_FILES,
    META_DIR,
    REPORT_NAME,
    SKIPPED_NAME,
    SPLITS,
    load_omni_meta,
    omni_meta_path,
    prepare_energon,
)

DONE = ".done"
"""Marker an array task writes into its part directory after preprocessing and rekeying."""
EXPECTED = "expected_parts"
"""``OUT/parts/expected_parts``: how many parts the list had (written by every array task)."""
REKEYED = ".rekeyed"


class MergeError(RuntimeError):
    """Parts that cannot be combined; the message says what to do."""


def _modality_dirs(part: Path) -> list[Path]:
    return sorted(d for d in part.iterdir()
                  if d.is_dir() and omni_meta_path(d).is_file())


def _split_name(name: str) -> tuple[str, str, str]:
    """``dir/key.part.ext`` -> (``dir/``, ``key``, ``.part.ext``); Energon's key is the base name
    up to its first dot."""
    head, slash, base = name.rpartition("/")
    key, dot, rest = base.partition(".")
    return head + slash, key, dot + rest


def rekey_tar(path: Path, prefix: str) -> bool:
    """Prefix every sample key in shard ``path`` with ``prefix-``; False if it already was."""
    tag = prefix + "-"
    with tarfile.open(path) as fin:
        first = fin.next()
        if first is None or _split_name(first.name)[1].startswith(tag):
            return False
    tmp = path.with_name(path.name + ".rekey")
    with tarfile.open(path) as fin, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as fout:
        for info in fin:
            head, key, rest = _split_name(info.name)
            new = tarfile.TarInfo(f"{head}{tag}{key}{rest}")
            new.mtime, new.mode, new.uname, new.gname = info.mtime, info.mode, "", ""
            if not info.isfile():
                fout.addfile(new)
                continue
            src = fin.extractfile(info)
            if rest == ".json":
                record = json.loads(src.read())
                if isinstance(record, dict) and "key" in record:
                    record["key"] = tag + str(record["key"])
                data = json.dumps(record, ensure_ascii=False, sort_keys=True).encode()
                new.size = len(data)
                fout.addfile(new, io.BytesIO(data))
            else:
                new.size = info.size
                fout.addfile(new, src)
    os.replace(tmp, path)
    return True


def rekey_part(part: Path, prefix: str | None = None, progress: bool = False) -> int:
    """Rekey every shard of every modality of one part; returns the shards rewritten.
    ``progress``: a progress bar (stderr) over the shards."""
    from tqdm import tqdm

    part = Path(part)
    prefix = prefix or part.name
    marker = part / REKEYED
    if marker.is_file() and marker.read_text().strip() == prefix:
        return 0
    n = 0
    dirs = _modality_dirs(part)
    bar = tqdm(total=sum(len(list(ds.glob("*.tar"))) for ds in dirs), desc="rekey",
               unit="shard", disable=not progress)
    for ds in dirs:
        for shard in sorted(ds.glob("*.tar")):
            n += rekey_tar(shard, prefix)
            bar.update()
        # The part's own Energon index names the old keys: drop it (merge indexes everything).
        for idx in ds.glob("*.tar.idx"):
            idx.unlink()
        for name in ENERGON_INDEX_FILES:
            (ds / META_DIR / name).unlink(missing_ok=True)
    bar.close()
    marker.write_text(prefix + "\n")
    return n


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _parts(out: Path, allow_missing: bool) -> list[Path]:
    root = out / "parts"
    if not root.is_dir():
        raise MergeError(f"{root} does not exist: run the preprocessing array first "
                         f"(slurm/preprocess_array.sbatch)")
    parts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("part-"))
    done = [p for p in parts if (p / DONE).is_file()]
    missing = [p.name for p in parts if p not in done]
    expected_file = root / EXPECTED
    if expected_file.is_file():
        expected = int(expected_file.read_text().split()[0])
        names = {p.name for p in done}
        missing += [f"part-{i:05d}" for i in range(expected)
                    if f"part-{i:05d}" not in names and f"part-{i:05d}" not in missing]
    if missing and not allow_missing:
        raise MergeError(f"{len(missing)} part(s) did not finish: {sorted(missing)[:10]}; rerun "
                         f"those array tasks (sbatch --array=<ids> ...) or pass --allow-missing")
    if not done:
        raise MergeError(f"no finished part under {root}")
    unkeyed = [p.name for p in done if not (p / REKEYED).is_file()]
    if unkeyed:
        raise MergeError(f"parts {unkeyed[:10]} were not rekeyed; run "
                         f"`omni-merge-parts rekey {root}/<part>` on them")
    return done


def merge(out: Path, workers: int = 1, allow_missing: bool = False,
          progress: bool = False) -> dict:
    """Build ``out/<modality>`` from ``out/parts/*``; returns the combined report.
    ``progress``: a progress bar (stderr) over the shards linked, naming the modality and
    step."""
    from tqdm import tqdm

    out = Path(out)
    parts = _parts(out, allow_missing)
    modalities = sorted({ds.name for p in parts for ds in _modality_dirs(p)})
    bar = tqdm(total=sum(len(list((p / m).glob(f"{sp}-*.tar")))
                         for m in modalities for p in parts for sp in SPLITS),
               desc="merge", unit="shard", disable=not progress)
    report: dict = {"out_dir": str(out), "parts": [p.name for p in parts], "settings": None,
                    "written": 0, "skipped": Counter(), "datasets": {}, "modalities": {}}
    for m in modalities:
        srcs = [p / m for p in parts if omni_meta_path(p / m).is_file()]
        metas = [load_omni_meta(s) for s in srcs]
        prints = {meta.get("fingerprint") for meta in metas}
        if len(prints) != 1:
            by = {s.parent.name: meta.get("fingerprint") for s, meta in zip(srcs, metas)}
            raise MergeError(f"modality {m}: parts were preprocessed with different tokenizers or "
                             f"media settings {by}; rerun them with the same options")
        ds = out / m
        if ds.is_dir():
            for old in list(ds.glob("train-*.tar*")) + list(ds.glob("val-*.tar*")):
                old.unlink()
            shutil.rmtree(ds / META_DIR, ignore_errors=True)
        ds.mkdir(parents=True, exist_ok=True)
        bar.set_postfix_str(f"{m}: linking shards")
        shards: list[str] = []
        counts = {sp: 0 for sp in SPLITS}
        for src in srcs:
            for sp in SPLITS:
                for shard in sorted(src.glob(f"{sp}-*.tar")):
                    name = f"{sp}-{counts[sp]:06d}.tar"
                    _link_or_copy(shard, ds / name)
                    shards.append(name)
                    counts[sp] += 1
                    bar.update()
        if not counts["train"]:
            print(f"merge_parts: modality {m}: no training shard in any part; skipped",
                  file=sys.stderr)
            continue
        bar.set_postfix_str(f"{m}: Energon index")
        prepare_energon(ds, shards, m, workers)
        meta = dict(metas[0])
        meta["splits"] = {sp: sum(x.get("splits", {}).get(sp, 0) for x in metas)
                          for sp in SPLITS if any(sp in x.get("splits", {}) for x in metas)}
        hist = {sp: sum((Counter(x.get("token_counts", {}).get(sp, {})) for x in metas),
                        Counter()) for sp in SPLITS}
        meta["token_counts"] = {sp: dict(sorted(h.items(), key=lambda kv: int(kv[0])))
                                for sp, h in hist.items() if sp in meta["splits"]}
        meta["parts"] = [s.parent.name for s in srcs]
        omni_meta_path(ds).write_text(json.dumps(meta, indent=2, sort_keys=True))
        report["datasets"][m] = str(ds)
    bar.close()

    # Combined report and skip log.
    per_split: dict = {}
    with open(out / SKIPPED_NAME, "w", encoding="utf-8") as skipped_out:
        for p in parts:
            rp = p / REPORT_NAME
            if rp.is_file():
                r = json.loads(rp.read_text())
                report["settings"] = report["settings"] or r.get("settings")
                for m, splits in r.get("modalities", {}).items():
                    for sp, s in splits.items():
                        acc = per_split.setdefault(m, {}).setdefault(sp, {
                            "lines": 0, "written": 0, "skipped": Counter(), "tokens": 0,
                            "max_tokens": 0})
                        acc["lines"] += s.get("lines", 0)
                        acc["written"] += s.get("written", 0)
                        acc["skipped"].update(s.get("skipped", {}))
                        acc["tokens"] += s.get("tokens", 0)
                        acc["max_tokens"] = max(acc["max_tokens"], s.get("max_tokens", 0))
            sk = p / SKIPPED_NAME
            if sk.is_file():
                for line in sk.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        rec = json.loads(line)
                        rec["part"] = p.name
                        skipped_out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    for m, splits in per_split.items():
        report["modalities"][m] = {}
        for sp, acc in splits.items():
            report["written"] += acc["written"]
            report["skipped"].update(acc["skipped"])
            report["modalities"][m][sp] = dict(acc, skipped=dict(sorted(acc["skipped"].items())),
                                               num_skipped=sum(acc["skipped"].values()))
    report["num_skipped"] = sum(report["skipped"].values())
    report["skipped"] = dict(sorted(report["skipped"].items()))
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
