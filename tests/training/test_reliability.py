"""Reliability of a run's save directory, in one process with an in-memory data source:
damaged checkpoints are reported, set aside and the older one used (an explicit training.load
fails hard), a flipped byte is caught by the CRC-32 of complete.json, the run lock refuses a
second run and is released by a killed one, rank state files never run code, a missing rank file
warns, tmp_* leftovers are cleaned at start, and a resume that repeats steps marks losses.jsonl."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omni_batch import MemoryData, tiny_omni_cfg

from megatron_omni.training import checkpoint as ckpt
from megatron_omni.training import safe_state
from megatron_omni.training.run_lock import RunLock, RunLockError
from megatron_omni.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def make_trainer(save, *extra, setup=True):
    cfg = tiny_omni_cfg("data.modalities=[text]", "training.log_interval=1", "training.lr=1e-3",
                        f"training.save={save}", "training.keep_last_checkpoints=0",
                        "training.save_interval=1", *extra, vision=False, audio=False)
    lines = []
    t = Trainer(cfg, data=MemoryData(cfg, vision=None, audio=None), printer=lines.append)
    if setup:
        t.setup()
    return t, lines


@pytest.fixture(scope="module")
def two_checkpoints(single_rank, tmp_path_factory):
    """A save directory with complete step_00000001 and step_00000002 (pristine copy)."""
    save = tmp_path_factory.mktemp("rel") / "run"
    t, _ = make_trainer(save, "training.train_iters=2")
    t.train()
    assert [s for s, _ in ckpt.list_checkpoints(save)] == [1, 2]
    return save


def fresh_copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _truncate(p: Path):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _distcp(step_dir: Path) -> Path:
    return sorted(step_dir.glob("*.distcp"))[0]


DAMAGE = {
    "truncated_distcp": (lambda d: _truncate(_distcp(d)), ".distcp"),
    "missing_distcp": (lambda d: _distcp(d).unlink(), ".distcp: missing"),
    "missing_metadata": (lambda d: (d / ".metadata").unlink(), ".metadata: missing"),
    "truncated_common": (lambda d: _truncate(d / "common.pt"), "common.pt"),
    "garbage_rank_file": (lambda d: (d / "rank_state" / "rank_00000.json").write_bytes(
        b"\x00garbage" * 10), "rank_00000.json"),
    "garbage_metadata_json": (lambda d: (d / "metadata.json").write_text("{not json"),
                              "metadata.json"),
    "flipped_byte": (lambda d: _flip(_distcp(d)), "CRC-32"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_older_used(two_checkpoints, tmp_path, kind):
    save = fresh_copy(two_checkpoints, tmp_path)
    damage, needle = DAMAGE[kind]
    damage(save / "step_00000002")
    t, lines = make_trainer(save, "training.train_iters=2")
    try:
        assert t.step == 1  # resumed from the older, intact checkpoint
        report = "\n".join(lines)
        assert "step_00000002 is damaged" in report and needle in report, report
        aside = save / "damaged_step_00000002"
        assert aside.is_dir() and f"set aside as {aside}" in report
        assert (save / "step_00000001").is_dir()
    finally:
        t.close()
    # An explicit training.load of a damaged checkpoint fails hard, naming the file.
    explicit = tmp_path / "explicit"
    shutil.copytree(two_checkpoints, explicit)
    damage(explicit / "step_00000002")
    with pytest.raises(ckpt.CheckpointError, match="is damaged") as e:
        make_trainer(tmp_path / "other", "training.train_iters=2",
                     f"training.load={explicit / 'step_00000002'}")
    assert needle in str(e.value)
    assert (explicit / "step_00000002").is_dir()  # not renamed


def test_flipped_byte_is_caught_by_checksum(two_checkpoints, tmp_path):
    from megatron_omni.training.ckpt_integrity import verify_checkpoint

    save = fresh_copy(two_checkpoints, tmp_path)
    step = save / "step_00000002"
    marker = json.loads((step / "complete.json").read_text())
    assert set(marker["files"]) >= {"common.pt", ".metadata", "metadata.json",
                                    "rank_state/rank_00000.json", "rank_state/index.json"}
    assert verify_checkpoint(step) == []
    _flip(_distcp(step))
    problems = verify_checkpoint(step)
    assert len(problems) == 1 and "CRC-32" in problems[0] and ".distcp" in problems[0]


def test_run_lock_refuses_second_run_and_killed_holder_does_not_block(single_rank, tmp_path):
    save = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from megatron_omni.training.run_lock import RunLock
            RunLock({str(save)!r}).acquire()
            print("locked", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, SLURM_JOB_ID="4242", PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError) as e:
            make_trainer(save, "training.train_iters=1")
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and "job id 4242" in msg and "host " in msg
        assert not (save / "step_00000001").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    t, _ = make_trainer(save, "training.train_iters=1")  # the killed holder blocks nothing
    assert t._run_lock is not None and t._run_lock.held
    with pytest.raises(RunLockError):
        RunLock(save).acquire()  # while this run holds it
    t.train()
    RunLock(save).acquire().release()  # released at the end of the run


def test_rank_state_is_json_and_a_pickle_payload_never_runs(two_checkpoints, tmp_path):
    save = fresh_copy(two_checkpoints, tmp_path)
    rank_dir = save / "step_00000002" / "rank_state"
    state = safe_state.loads((rank_dir / "rank_00000.json").read_bytes())
    assert state["rank_local"] == {"data": {"n": 2}}
    assert set(state["rng"]) >= {"python", "numpy", "torch", "tracker"}
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    # A rank file of the old (pickle) name and one in place of the JSON file.
    (rank_dir / "rank_00000.json").unlink()
    torch.save({"layout": {}, "rng": Payload(), "rank_local": None}, rank_dir / "rank_00000.pt")
    with pytest.raises(ckpt.CheckpointError, match="pickled rank state"):
        make_trainer(save, "training.train_iters=2", "training.verify_checkpoint=false",
                     f"training.load={save / 'step_00000002'}")
    assert not marker.exists()
    # A JSON file naming a class outside the allow-list is refused too.
    (rank_dir / "rank_00000.pt").unlink()
    (rank_dir / "rank_00000.json").write_text(json.dumps(
        {"__class__": "os:system", "fields": {"command": f"touch {marker}"}}))
    with pytest.raises(ckpt.CheckpointError, match="unreadable rank state"):
        make_trainer(save, "training.train_iters=2", "training.verify_checkpoint=false",
                     f"training.load={save / 'step_00000002'}")
    assert not marker.exists()
    with pytest.raises(safe_state.UnsafeStateError):
        safe_state.dumps({"x": Payload()})  # refused at save time, named


def test_missing_rank_file_warns_and_tmp_leftovers_are_removed(two_checkpoints, tmp_path,
                                                               caplog):
    save = fresh_copy(two_checkpoints, tmp_path)
    (save / "step_00000002" / "rank_state" / "rank_00000.json").unlink()
    leftover = save / "tmp_step_00000003"
    leftover.mkdir()
    (leftover / "big.distcp").write_bytes(b"\0" * 1000)  # what a full disk left behind
    with caplog.at_level(logging.WARNING):
        t, _ = make_trainer(save, "training.train_iters=2", "training.verify_checkpoint=false")
    t.close()
    assert not leftover.exists()
    assert any("no state file for rank 0" in r.getMessage() for r in caplog.records)
    assert any("holds no data-loader state" in r.getMessage() for r in caplog.records)


def test_resume_that_repeats_steps_marks_losses_jsonl(two_checkpoints, tmp_path):
    save = fresh_copy(two_checkpoints, tmp_path)
    shutil.rmtree(save / "step_00000002")  # as if the newest checkpoint was lost
    t, _ = make_trainer(save, "training.train_iters=2")
    t.train()
    rows = [json.loads(x) for x in (save / "losses.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in rows] == [1, 2, None, 2]
    assert rows[2]["resume"]["step"] == 1 and rows[2]["resume"]["repeats_steps"] == [2, 2]
    # Exact resume, no repeat: no marker.
    t, _ = make_trainer(save, "training.train_iters=3")
    t.train()
    rows = [json.loads(x) for x in (save / "losses.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in rows] == [1, 2, None, 2, 3]


def test_no_intact_checkpoint_left_is_an_error_not_a_fresh_start(two_checkpoints, tmp_path):
    save = fresh_copy(two_checkpoints, tmp_path)
    for step in ("step_00000001", "step_00000002"):
        (save / step / "common.pt").write_bytes(b"garbage")
    for _ in range(2):  # the first run sets both aside; a requeue must not start from 0 either
        with pytest.raises(ckpt.CheckpointError, match="holds no intact checkpoint"):
            make_trainer(save, "training.train_iters=2")
    assert sorted(p.name for p in save.glob("damaged_*")) == ["damaged_step_00000001",
                                                              "damaged_step_00000002"]


def test_loaders_never_guess_the_data_parallel_rank(monkeypatch):
    """A failing megatron parallel-state query used to be swallowed into "rank 0 of 1" (every
    rank reading the same data); now it surfaces."""
    from megatron.core import parallel_state as ps

    from megatron_omni.data import loaders

    def broken():
        raise RuntimeError("data-parallel group not built")

    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(ps, "get_data_parallel_rank", broken)
    with pytest.raises(RuntimeError, match="data-parallel group not built"):
        loaders._dp_from_megatron()


def test_checkpoint_writer_processes_end_with_a_sigkilled_rank(tmp_path):
    """megatron-core's checkpoint writer keeps a multiprocessing manager (+ resource tracker)
    alive after the first save; they must not outlive a rank killed with SIGKILL."""
    import time

    psutil = pytest.importorskip("psutil")
    script = tmp_path / "save_then_wait.py"
    script.write_text(textwrap.dedent(f"""
        import time
        import conftest  # noqa: F401  (fast megatron import, one thread)
        from training.test_reliability import make_trainer

        def main():
            import psutil
            from dist_utils import free_port
            from megatron_omni.config import ParallelConfig
            from megatron_omni.parallel import runtime
            runtime.initialize(ParallelConfig(), seed=1,
                               env=runtime.DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
            t, _ = make_trainer({str(tmp_path / 'run')!r}, "training.train_iters=1")
            t.train()
            print(" ".join(str(c.pid) for c in psutil.Process().children(recursive=True)),
                  flush=True)
            time.sleep(600)

        if __name__ == "__main__":
            main()
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ,
                                     PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")])))
    try:
        kids = [int(x) for x in proc.stdout.readline().split()]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert kids, "no writer processes were started (nothing to check)"
    deadline = time.time() + 10
    alive = kids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in kids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    for p in alive:  # do not leave them behind if the check fails
        psutil.Process(p).kill()
    assert not alive, f"processes {alive} outlived the SIGKILLed rank"
