"""One run per save directory: an exclusive ``flock`` on ``<save>/.run.lock`` for the run's life.

Two jobs pointed at one ``training.save`` would adopt each other's checkpoints, delete each
other's in-progress ``tmp_step_*`` or both crash mid-publish. The trainer's global rank 0 takes
this lock before it touches the directory (before resuming or cleaning up) and keeps the file
descriptor open until the process ends; a second run's rank 0 gets :class:`RunLockError`, whose
message names the holder (host, Slurm job id, pid, start time) and is raised on every rank.

The lock is a kernel ``flock(LOCK_EX | LOCK_NB)``: it is released when the holding process dies
for any reason (SIGKILL, OOM kill, node reboot for local disks), so a killed run never blocks the
next one; the holder line in the file is only information, never trusted as the lock itself.

Shared file systems (flock is as good as the file system's lock support):

* local disks, NFSv4 (Linux clients emulate flock with whole-file POSIX locks held by the
  server, so it works across nodes; NFSv3 needs a running lockd/statd), IBM Spectrum Scale
  (GPFS), CephFS, WekaFS: honoured across nodes.
* Lustre: across nodes only when the clients mount with ``-o flock``; ``localflock`` makes it
  node-local (two jobs on different nodes would both get the lock), ``noflock`` makes flock fail
  with ENOSYS/EINVAL, which is reported as an error here rather than silently ignored.
* BeeGFS: node-local unless ``tuneUseGlobalFileLocks=true`` on the clients.

If the file system cannot lock at all, set ``training.run_lock=false`` (and make sure yourself
that one job owns the directory).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional, Union

LOCK_NAME = ".run.lock"


class RunLockError(RuntimeError):
    """Another live run holds the save directory, or the file system cannot lock."""


def holder_info() -> dict:
    """Who we are: host, job id (Slurm / PBS / LSF if any), pid, start time."""
    job = (os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")
           or os.environ.get("LSB_JOBID"))
    return {"host": socket.gethostname(), "job_id": job, "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


class RunLock:
    """Exclusive lock of a save directory; :meth:`acquire` / :meth:`release` or a context."""

    def __init__(self, directory: Union[str, Path]):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockError(
                    f"{self.directory} is in use by another run ({_fmt(holder)}); two runs must "
                    f"not share training.save. Wait for it to end or stop it (scancel "
                    f"{holder.get('job_id') or '<job>'} / kill {holder.get('pid', '<pid>')}), "
                    f"or give this run another training.save") from None
            raise RunLockError(
                f"cannot lock {self.path} ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror})"
                f": the file system does not support flock (Lustre mounted without -o flock?). "
                f"Use a directory on a file system that does, or set training.run_lock=false "
                f"and make sure only one job uses {self.directory}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}


def _fmt(h: dict) -> str:
    if not h:
        return "holder unknown: it has not written its details yet"
    return (f"host {h.get('host', '?')}, job id {h.get('job_id') or 'none'}, pid "
            f"{h.get('pid', '?')}, started {h.get('started', '?')}")
