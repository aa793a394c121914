"""Start-of-run safety around ``training.save`` / ``training.load`` (collective helpers).

* :func:`lock_save_dir`: global rank 0 takes the run lock of ``training.save``
  (``training/run_lock.py``) and removes ``tmp_*`` leftovers of killed saves (a save cut short by
  a full disk leaves one behind; while it stays, the disk stays full); the outcome is broadcast so
  every rank raises the same error.
* :func:`choose_checkpoint`: which checkpoint to resume from. Auto-resume (newest complete
  checkpoint of ``training.save``) verifies it first (``ckpt_integrity.verify_checkpoint``, the
  files shared out over the ranks); a
  damaged one is reported (which file, what is wrong), renamed ``damaged_step_*`` (never
  deleted) and the next older one is tried. ``training.load`` (an explicit choice) fails hard.
* :func:`check_data_parallel_size`: the data loaders' positions are per data-parallel rank
  (Energon's ``save_state_rank``) and do not map onto another DP size; resuming at another DP
  size is refused with what to do, unless ``training.on_dp_change=restart_data`` accepts that the
  data stream starts over.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config.schema import ConfigError
from . import checkpoint as ckpt
from . import ckpt_integrity as integrity
from .run_lock import RunLock, RunLockError

log = logging.getLogger(__name__)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _broadcast(obj):
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def lock_save_dir(cfg) -> Optional[RunLock]:
    """Rank 0 locks ``training.save`` for this process's life and cleans ``tmp_*``; collective.
    Returns the lock on rank 0 (keep a reference), None elsewhere or without ``training.save``."""
    save = cfg.training.save
    if not save:
        return None
    lock, err = None, None
    if _rank() == 0:
        try:
            if cfg.training.run_lock:
                lock = RunLock(save).acquire()
            removed = ckpt.cleanup_tmp(save)
            if removed:
                log.warning("removed %d unfinished save(s) of an earlier run: %s", len(removed),
                            ", ".join(p.name for p in removed))
        except RunLockError as e:
            err = str(e)
        except OSError as e:
            err = f"cannot prepare training.save={save}: {e}"
    err = _broadcast(err)
    if err is not None:
        raise RunLockError(err)
    return lock


def choose_checkpoint(cfg, printer: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint to resume from (None: start fresh); collective. See the module docstring."""
    tr = cfg.training
    if tr.load is not None:
        path = ckpt.resolve_checkpoint(tr.load)
        problems = _verify_together(path, tr.verify_checkpoint)
        if problems:
            raise ckpt.CheckpointError(
                f"training.load={tr.load}: {path} is damaged:{integrity.describe(problems)}\n"
                f"  Pick another checkpoint (its root's older step_* directories), or unset "
                f"training.load to resume from training.save's newest intact one")
        return path
    if not tr.save:
        return None
    set_aside_here = []
    while True:
        found = ckpt.find_latest(tr.save) if _rank() == 0 else None
        found_s = _broadcast(str(found) if found is not None else None)
        problems = _verify_together(found_s, tr.verify_checkpoint) if found_s else []
        aside = None
        if problems and _rank() == 0:
            try:
                aside = str(integrity.set_aside(Path(found_s)))
            except OSError as e:
                problems.append(f"(could not rename it: {e})")
        problems, aside = _broadcast((problems, aside))
        if found_s is None:
            _refuse_fresh_start_over_damaged(tr.save, set_aside_here)
            return None
        if not problems:
            return Path(found_s)
        if aside is None:
            raise ckpt.CheckpointError(f"checkpoint {found_s} is damaged and could not be set "
                                       f"aside:{integrity.describe(problems)}")
        set_aside_here.append(aside)
        msg = (f" checkpoint {found_s} is damaged, not resuming from it:"
               f"{integrity.describe(problems)}\n  set aside as {aside} (kept for inspection; "
               f"delete it when done); trying the next older checkpoint")
        log.error(msg)
        if _rank() == 0 or _is_last():
            printer(msg)


def _verify_together(path, checksums: bool) -> list[str]:
    """Every rank checks a share of the files (``verify_checkpoint(part=...)``); the union of
    the problems, identical on every rank."""
    if not torch.distributed.is_initialized():
        return integrity.verify_checkpoint(path, checksums)
    world = torch.distributed.get_world_size()
    mine = integrity.verify_checkpoint(path, checksums, part=(_rank(), world))
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    return [p for part in everyone for p in part]


def _refuse_fresh_start_over_damaged(save, set_aside_here: list) -> None:
    """No intact checkpoint is left: starting the stage from step 0 would silently throw the
    run's progress away (and do so again at every requeue), so stop and say what to do."""
    damaged = sorted(str(p) for p in Path(save).glob(integrity.DAMAGED_PREFIX + "step_*"))
    if not damaged:
        return
    raise ckpt.CheckpointError(
        f"training.save={save} holds no intact checkpoint, only damaged ones set aside: "
        f"{', '.join(damaged[-4:])}{' ...' if len(damaged) > 4 else ''}. Not starting the stage "
        f"from step 0 on my own: restore a checkpoint from a backup, point training.load at one, "
        f"or, to really start over, move the damaged_* directories out of {save}")


def _is_last() -> bool:
    return (torch.distributed.is_initialized()
            and _rank() == torch.distributed.get_world_size() - 1)


def check_data_parallel_size(cfg, path: Path, dp_size: int) -> bool:
    """Whether the rank-local data state of ``path`` can be used at ``dp_size``. Raises a
    ConfigError at another DP size unless ``training.on_dp_change=restart_data``; then returns
    False (the data stream restarts) after a warning."""
    layout = integrity.marker_layout(path) or {}
    saved = layout.get("dp")
    if saved is None or int(saved) == int(dp_size):
        return True
    what = (f"checkpoint {path} was saved at data-parallel size {saved}; this run has "
            f"{dp_size} (world size / (TP x PP x CP)). Each data-parallel rank's loader "
            f"position is saved separately (Energon) and cannot be carried to another DP size")
    if cfg.training.on_dp_change != "restart_data":
        raise ConfigError(
            f"{what}, so resuming would silently read the data again from its start. Either "
            f"relaunch with DP={saved} (the same world size with the same TP/PP/CP, or change "
            f"TP/PP to keep DP={saved}), or set training.on_dp_change=restart_data to accept "
            f"that the data stream starts over (samples seen before step "
            f"{_step_of(path)} are seen again)")
    log.warning("%s; training.on_dp_change=restart_data: the data stream starts over", what)
    return False


def _step_of(path: Path) -> str:
    try:
        return str(integrity.read_complete(path).get("step", "?"))
    except ValueError:
        return "?"
