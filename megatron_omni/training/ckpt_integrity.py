"""Checkpoint integrity: per-file checksums at save, verification before load, set-aside.

At publish time :func:`file_checksums` records the size and CRC-32 of every file of the step
directory in ``complete.json`` (``"files": {relative path: {"size": n, "crc32": "xxxxxxxx"}}``).
Before a resume, :func:`verify_checkpoint` re-reads them and reports each problem with the file
and what is wrong (missing, truncated/grown, checksum mismatch), and for checkpoints written
before checksums existed at least checks that the parts every load needs are there and parse
(``.metadata``, ``metadata.json``, ``common.pt``, the rank-state index).

Auto-resume (no ``training.load``) uses :func:`set_aside` on a checkpoint that fails: the
directory is renamed ``damaged_step_XXXXXXXX`` (never deleted; :func:`find_latest` no longer
sees it) and the next older complete checkpoint is tried. An explicit ``training.load`` fails
hard instead.

CRC-32 (zlib) catches truncation, garbage and single flipped bits; it is not a defence against a
deliberate forgery (that is what the safe rank-state format is for: nothing in a checkpoint runs
code). Cost: one read of the checkpoint at save and at resume, spread over the ranks (at save each
rank checksums the files it wrote, rank 0 the few common ones; at resume rank r checks every
world-size-th file); see ``bench/bench_ckpt_checksum.py`` and BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Optional, Union

COMPLETE = "complete.json"
DAMAGED_PREFIX = "damaged_"
_CHUNK = 8 << 20


def crc32_file(path: Union[str, Path]) -> tuple[int, str]:
    """(size in bytes, CRC-32 as 8 hex digits) of one file, read in 8 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            size += len(block)
            crc = zlib.crc32(block, crc)
    return size, f"{crc & 0xFFFFFFFF:08x}"


def list_files(directory: Union[str, Path]) -> list[str]:
    """Relative paths of every file under ``directory`` except ``complete.json``, sorted."""
    root = Path(directory)
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = (Path(dirpath) / n).relative_to(root).as_posix()
            if rel != COMPLETE:
                out.append(rel)
    return sorted(out)


def file_checksums(directory: Union[str, Path], only: Optional[Iterable[str]] = None,
                   skip: Iterable[str] = ()) -> dict[str, dict]:
    """Size and CRC-32 of every file under ``directory`` except ``complete.json`` (or of the
    relative paths ``only``), leaving out ``skip``."""
    root = Path(directory)
    skip = set(skip)
    names = list_files(root) if only is None else sorted(only)
    out = {}
    for rel in names:
        if rel in skip:
            continue
        size, crc = crc32_file(root / rel)
        out[rel] = {"size": size, "crc32": crc}
    return out


def own_files(directory: Union[str, Path], rank: int) -> list[str]:
    """The files a save's rank ``rank`` wrote itself (its ``__<rank>_*.distcp`` and its rank
    state file): each rank checksums its own, in parallel, before the publish."""
    root = Path(directory)
    mine = [p.name for p in root.glob(f"__{int(rank)}_*.distcp")]
    mine += [f"rank_state/{p.name}" for p in (root / "rank_state").glob(f"rank_{int(rank):05d}.*")]
    return sorted(mine)


def read_complete(ckpt: Union[str, Path]) -> dict:
    """``complete.json`` of a step directory (ValueError with the reason if unreadable)."""
    p = Path(ckpt) / COMPLETE
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: unreadable completion marker ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: completion marker is not a JSON object")
    return data


def _structural_problems(ckpt: Path, marker: dict) -> list[str]:
    """What a load needs, checked without checksums (cheap; also run when they exist)."""
    problems = []
    meta = ckpt / ".metadata"
    if not meta.is_file():
        problems.append(f"{meta}: missing (dist_checkpointing metadata)")
    for name in ("metadata.json", "common.pt"):
        if not (ckpt / name).is_file():
            problems.append(f"{ckpt / name}: missing")
    if not problems:
        try:
            json.loads((ckpt / "metadata.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{ckpt / 'metadata.json'}: not valid JSON ({e})")
        try:
            import torch

            torch.load(ckpt / "common.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is reported with its reason
            problems.append(f"{ckpt / 'common.pt'}: does not load ({type(e).__name__}: "
                            f"{str(e)[:200]})")
    # A missing rank state file is not fatal by itself (that rank is re-seeded, with a warning);
    # with checksums recorded it counts as damage like any other missing file.
    index = ckpt / "rank_state" / "index.json"
    if index.is_file():
        try:
            [int(r["rank"]) for r in json.loads(index.read_text())]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{index}: unreadable ({type(e).__name__}: {e})")
    return problems


def verify_checkpoint(ckpt: Union[str, Path], checksums: bool = True,
                      part: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems of a published step directory, one line each naming the file (empty = fine).

    With ``checksums`` and a marker that records them, every recorded file is re-read and its
    size and CRC-32 compared; files the marker does not list are ignored. ``part=(i, n)``
    checks only the i-th of n interleaved shares of the files (and the structural checks only
    for i == 0), so n ranks verify a checkpoint together, each reading 1/n of it.
    """
    ckpt = Path(ckpt)
    i, n = part
    try:
        marker = read_complete(ckpt)
    except ValueError as e:
        return [str(e)] if i == 0 else []
    problems = _structural_problems(ckpt, marker) if i == 0 else []
    files = marker.get("files")
    if checksums and isinstance(files, dict):
        for k, (rel, want) in enumerate(sorted(files.items())):
            if k % n != i:
                continue
            p = ckpt / rel
            if not p.is_file():
                if not any(x.startswith(f"{p}:") for x in problems):
                    problems.append(f"{p}: missing")
                continue
            size = p.stat().st_size
            if size != want.get("size"):
                problems.append(f"{p}: {size} bytes, {want.get('size')} at save (truncated or "
                                f"overwritten)")
                continue
            _, crc = crc32_file(p)
            if crc != want.get("crc32"):
                problems.append(f"{p}: CRC-32 {crc} != {want.get('crc32')} recorded at save "
                                f"(content changed: bit flip or overwrite)")
    return problems


def set_aside(ckpt: Union[str, Path]) -> Path:
    """Rename a damaged step directory to ``damaged_<name>`` (``.1``, ``.2``, ... if taken);
    never deletes anything. Returns the new path."""
    ckpt = Path(ckpt)
    target = ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
    n = 0
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{DAMAGED_PREFIX}{ckpt.name}.{n}")
    os.rename(ckpt, target)
    return target


def describe(problems: list[str], limit: int = 6) -> str:
    more = f"\n    ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n    " + "\n    ".join(problems[:limit]) + more


def marker_layout(ckpt: Union[str, Path]) -> Optional[dict]:
    """The layout recorded in ``complete.json`` (None if unreadable)."""
    try:
        return read_complete(ckpt).get("layout")
    except ValueError:
        return None
