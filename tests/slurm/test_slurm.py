"""The Slurm launchers, run for real on this machine with a faked Slurm.

A fake ``srun`` (starts the N tasks locally with SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS and
forwards signals to them), a fake ``scontrol`` (prints host names, records requeue calls) and a
fake ``sbatch`` (records its arguments, prints job ids) sit first on PATH. With them:

* every script passes ``bash -n`` and shellcheck;
* ``slurm/preprocess_array.sbatch`` preprocesses a synthetic corpus in two array tasks and merges
  the parts into one Energon dataset per modality;
* ``slurm/train.sbatch`` trains a tiny stage on that dataset with 2 CPU tasks; SIGUSR1 to the batch
  shell makes the trainer save and exit 75, the script requeues the job through ``scontrol``, and
  a second run resumes from the saved step;
* ``slurm/submit_chain.sh`` submits PT-1 .. IT-3, AT plus the calibration job with afterok
  dependencies (dry run and fake sbatch);
* the 9B / 72B stage recipes load, chain their checkpoints and fit on H100s by the planner.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*REPO.glob("slurm/*.sh"), *REPO.glob("slurm/*.sbatch")])
STAGES = ("pt1", "pt2", "pt3", "it1", "it2", "it3", "at")
TINY_MODEL = [
    "model.speech_codebook_size=64", "model.llm.num_layers=2",
    "model.llm.make_vocab_size_divisible_by=64", "model.vision.depth=1",
    "model.vision.hidden_size=32", "model.vision.num_heads=2", "model.audio.hidden_size=32",
    "model.audio.num_heads=2", "model.audio.ffn_hidden_size=64", "model.audio.num_blocks=2",
]

FAKE_SRUN = r'''#!{python}
"""Fake srun: record the call, then run the command as N local tasks (or exit FAKE_SRUN_RC)."""
import json, os, signal, subprocess, sys
args, opts = sys.argv[1:], {}
while args and args[0].startswith("-"):
    k, _, v = args.pop(0).partition("=")
    opts[k] = v
keys = ("MASTER_ADDR", "MASTER_PORT", "CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF",
        "OMP_NUM_THREADS", "SITE_VAR")
with open(os.path.join(os.environ["FAKE_SLURM_LOG"], "srun.jsonl"), "a") as f:
    f.write(json.dumps({"opts": opts, "cmd": args,
                        "env": {k: os.environ.get(k) for k in keys}}) + "\n")
if os.environ.get("FAKE_SRUN_RC"):
    sys.exit(int(os.environ["FAKE_SRUN_RC"]))
n = int(opts.get("--ntasks") or os.environ.get("SLURM_NTASKS", "1"))
procs = []
def forward(sig, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)
for i in range(n):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NTASKS=str(n),
               SLURM_STEP_NUM_TASKS=str(n))
    procs.append(subprocess.Popen(args, env=env))
rcs = [p.wait() for p in procs]
sys.exit(max(rc if rc >= 0 else 128 - rc for rc in rcs))
'''

FAKE_SCONTROL = r'''#!/bin/bash
# Fake scontrol: record the call; `show hostnames` prints a two-node list.
echo "$*" >>"$FAKE_SLURM_LOG/scontrol.log"
if [ "$1" = show ] && [ "$2" = hostnames ]; then
  echo localhost
  echo node002
fi
'''

FAKE_SBATCH = r'''#!{python}
"""Fake sbatch: record the arguments, print a job id (1000, 1001, ...)."""
import json, os, sys
path = os.path.join(os.environ["FAKE_SLURM_LOG"], "sbatch.jsonl")
n = sum(1 for _ in open(path)) if os.path.exists(path) else 0
with open(path, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
print(f"{1000 + n};fakecluster" if "--parsable" in sys.argv else f"Submitted batch job {1000 + n}")
'''


# ------------------------------------------------------------------------------------ helpers

def _write_exe(path: Path, text: str) -> None:
    path.write_text(text.replace("{python}", sys.executable))
    path.chmod(0o755)


class FakeSlurm:
    """A bin folder with the fake commands, a log folder, and the environment of a batch job
    running on 1 node with 2 tasks."""

    def __init__(self, root: Path, with_scontrol: bool = True):
        self.bin = root / "bin"
        self.log = root / "slurm_log"
        self.bin.mkdir(parents=True)
        self.log.mkdir()
        _write_exe(self.bin / "srun", FAKE_SRUN)
        _write_exe(self.bin / "sbatch", FAKE_SBATCH)
        if with_scontrol:
            _write_exe(self.bin / "scontrol", FAKE_SCONTROL)
        self.job_id = _job_id_with_free_port()

    def env(self, **extra) -> dict:
        drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "CONTAINER_IMAGE", "CONTAINER_MOUNTS", "CONFIG", "REPO"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}
        env.update(PATH=f"{self.bin}:{os.environ['PATH']}", FAKE_SLURM_LOG=str(self.log),
                   SLURM_JOB_ID=str(self.job_id), SLURM_JOB_NAME="m2omni-test",
                   SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1", SLURM_NTASKS="2",
                   SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost",
                   SLURM_SUBMIT_DIR=str(REPO), PYTHON=sys.executable, OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def sruns(self) -> list[dict]:
        p = self.log / "srun.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    def scontrol(self) -> list[str]:
        p = self.log / "scontrol.log"
        return p.read_text().splitlines() if p.exists() else []

    def sbatches(self) -> list[list[str]]:
        p = self.log / "sbatch.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _job_id_with_free_port() -> int:
    """A job id whose derived MASTER_PORT (20000 + id % 20000, train.sbatch and the runtime)
    is free on this machine right now."""
    start = 4242 + os.getpid() % 10000
    for k in range(2000):
        job = start + 7 * k
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job % 20000))
                return job
            except OSError:
                continue
    raise RuntimeError("no free port")


def _bash(args, env, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kw)


# ------------------------------------------------------------------------------------ lint

@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bash_syntax_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it: apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_executable_and_documented():
    names = {p.name for p in SCRIPTS}
    assert {"train.sbatch", "submit_chain.sh", "preprocess_array.sbatch"} <= names
    for p in [*SCRIPTS, REPO / "slurm" / "merge_parts.py"]:
        assert os.access(p, os.X_OK), f"{p} is not executable"
    readme = (REPO / "slurm" / "README.md").read_text()
    for word in ("train.sbatch", "submit_chain.sh", "preprocess_array.sbatch", "merge_parts.py",
                 "--signal=B:USR1@300", "scontrol requeue", "CONTAINER_IMAGE", "NCCL_IB_HCA",
                 "CUDA_DEVICE_MAX_CONNECTIONS", "logs/%x-%j.out", "--dry-run"):
        assert word in readme, word


# ------------------------------------------------------------------------------------ train.sbatch

def test_train_sbatch_launch_layout_env_and_container(tmp_path):
    slurm = FakeSlurm(tmp_path)
    cfg = "examples/stages/tiny/pt2.yaml"
    site = tmp_path / "site.env"
    site.write_text("export SITE_VAR=from_site_env\n")
    r = _bash(["slurm/train.sbatch", cfg, "training.train_iters=3"],
              slurm.env(FAKE_SRUN_RC=0, SITE_ENV=site))
    assert r.returncode == 0, r.stdout + r.stderr
    (call,) = slurm.sruns()
    assert call["opts"] == {"--nodes": "1", "--ntasks": "2", "--ntasks-per-node": "2",
                            "--kill-on-bad-exit": "1"}
    assert call["cmd"] == [sys.executable, "-u", "-m", "megatron_omni.train", "--config", cfg,
                           "training.train_iters=3"]
    assert call["env"]["MASTER_ADDR"] == "localhost"          # first of `scontrol show hostnames`
    assert call["env"]["MASTER_PORT"] == str(20000 + slurm.job_id % 20000)
    assert call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert call["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert call["env"]["OMP_NUM_THREADS"] == "1"              # the caller's value wins
    assert call["env"]["SITE_VAR"] == "from_site_env"
    assert slurm.scontrol() == ["show hostnames localhost"]   # no requeue after exit 0

    # Container flags only with CONTAINER_IMAGE; config from the environment; extra srun flags.
    r = _bash(["slurm/train.sbatch", "training.train_iters=3"],
              slurm.env(FAKE_SRUN_RC=0, CONFIG=cfg, CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01",
                        CONTAINER_MOUNTS="/lustre:/lustre", SRUN_EXTRA_ARGS="--mpi=pmix --label",
                        MASTER_PORT=29999))
    assert r.returncode == 0, r.stdout + r.stderr
    call = slurm.sruns()[-1]
    assert call["opts"]["--container-image"] == "nvcr.io#nvidia/pytorch:25.01"
    assert call["opts"]["--container-mounts"] == "/lustre:/lustre"
    assert call["opts"]["--container-workdir"] == str(REPO)
    assert call["opts"]["--mpi"] == "pmix" and "--label" in call["opts"]
    assert call["cmd"][-3:] == ["--config", cfg, "training.train_iters=3"]
    assert call["env"]["MASTER_PORT"] == "29999"


def test_train_sbatch_without_scontrol_leaves_master_to_the_runtime(tmp_path):
    if shutil.which("scontrol"):
        pytest.skip("a real scontrol is on PATH")
    slurm = FakeSlurm(tmp_path, with_scontrol=False)
    r = _bash(["slurm/train.sbatch", "examples/stages/tiny/pt1.yaml"],
              slurm.env(FAKE_SRUN_RC=0, SLURM_JOB_NODELIST="gpu[007-010]"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert slurm.sruns()[0]["env"]["MASTER_ADDR"] is None
    from megatron_omni.parallel.runtime import dist_env_from_environ

    env = dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                                 "SLURM_JOB_NODELIST": "gpu[007-010]",
                                 "SLURM_JOB_ID": str(slurm.job_id)})
    assert env.master_addr == "gpu007"
    assert env.master_port == 20000 + slurm.job_id % 20000  # the same rule as the script


@pytest.mark.parametrize("rc,extra,requeued", [
    (75, {}, True),
    (0, {}, False),
    (1, {}, False),
    (2, {}, False),
    (1, {"REQUEUE_ON_FAILURE": 1}, True),
    (2, {"REQUEUE_ON_FAILURE": 1}, False),
    (75, {"SLURM_RESTART_COUNT": 3, "MAX_REQUEUES": 3}, False),
])
def test_train_sbatch_requeues_on_exit_75(tmp_path, rc, extra, requeued):
    slurm = FakeSlurm(tmp_path)
    r = _bash(["slurm/train.sbatch", "examples/stages/tiny/pt1.yaml"],
              slurm.env(FAKE_SRUN_RC=rc, **extra))
    assert r.returncode == rc, r.stdout + r.stderr
    assert (f"requeue {slurm.job_id}" in slurm.scontrol()) == requeued, r.stdout


def test_train_sbatch_errors(tmp_path):
    slurm = FakeSlurm(tmp_path)
    r = _bash(["slurm/train.sbatch"], slurm.env())
    assert r.returncode == 2 and "no stage config" in r.stderr
    r = _bash(["slurm/train.sbatch", "examples/stages/nope.yaml"], slurm.env())
    assert r.returncode == 2 and "not found" in r.stderr
    assert slurm.sruns() == []


# ------------------------------------------------------------------------------------ submit_chain

def _chain_expectations(calls, ids):
    """Check 8 submissions PT-1 .. IT-3, AT with the calibration before PT-3, chained by
    afterok."""
    names = [next(a.split("=", 1)[1] for a in c if a.startswith("--job-name=")) for c in calls]
    assert [n.rsplit("-", 1)[1] for n in names] == ["pt1", "pt2", "calibrate", "pt3", "it1",
                                                    "it2", "it3", "at"]
    for i, c in enumerate(calls):
        deps = [a for a in c if a.startswith("--dependency=")]
        if i == 0:
            assert deps == []
        else:
            assert deps == [f"--dependency=afterok:{ids[i - 1]}"], c
            assert "--kill-on-invalid-dep=yes" in c
        assert "--parsable" in c
    script = [c.index("slurm/train.sbatch") for c in calls]
    configs = [c[k + 1] for c, k in zip(calls, script)]
    assert configs == [f"examples/stages/9b/{s}.yaml" for s in
                       ("pt1", "pt2", "pt3", "pt3", "it1", "it2", "it3", "at")]
    cal = calls[2]
    bal = "runs/m2omni-9b/step_balance.json"
    assert cal[-2:] == ["--calibrate-step-balance", bal] and "stage.balance=none" in cal
    assert f"stage.step_balance_file={bal}" in calls[3]
    assert all("--calibrate-step-balance" not in c for i, c in enumerate(calls) if i != 2)


def test_submit_chain_with_fake_sbatch(tmp_path):
    slurm = FakeSlurm(tmp_path)
    r = _bash(["slurm/submit_chain.sh", "--size", "9b", "--time", "12:00:00", "--",
               "data.path=/lustre/energon"], slurm.env(ACCOUNT="proj42", PARTITION="h100"))
    assert r.returncode == 0, r.stdout + r.stderr
    calls = slurm.sbatches()
    assert len(calls) == 8
    ids = [str(1000 + i) for i in range(8)]
    _chain_expectations(calls, ids)
    for c in calls:
        assert {"--account=proj42", "--partition=h100", "--nodes=8", "--time=12:00:00"} <= set(c)
        assert c[-1] == "data.path=/lustre/energon" or "data.path=/lustre/energon" in c
    # One line per job: stage, job id, config.
    lines = [ln.split() for ln in r.stdout.splitlines()]
    assert [(ln[0], ln[1]) for ln in lines] == list(zip(
        ["pt1", "pt2", "calibrate", "pt3", "it1", "it2", "it3", "at"], ids))

    # Restart the chain at PT-3 behind a running job, weights already calibrated, per-stage nodes.
    (slurm.log / "sbatch.jsonl").unlink()
    r = _bash(["slurm/submit_chain.sh", "--size", "72b", "--from", "pt3", "--after", "777",
               "--no-calibrate"], slurm.env(NODES_IT3=16))
    assert r.returncode == 0, r.stdout + r.stderr
    calls = slurm.sbatches()
    assert len(calls) == 5
    assert "--dependency=afterok:777" in calls[0] and "--dependency=afterok:1000" in calls[1]
    assert "--nodes=32" in calls[0] and "--nodes=16" in calls[3]
    assert calls[0][-1] == "stage.step_balance_file=runs/m2omni-72b/step_balance.json"


def test_submit_chain_dry_run(tmp_path):
    slurm = FakeSlurm(tmp_path)
    r = _bash(["slurm/submit_chain.sh", "--dry-run"], slurm.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert slurm.sbatches() == []                                 # nothing submitted
    import shlex

    calls = [shlex.split(ln) for ln in r.stdout.splitlines()]
    assert all(c[0] == "sbatch" for c in calls)
    _chain_expectations([c[1:] for c in calls],
                        ["<pt1>", "<pt2>", "<calibrate>", "<pt3>", "<it1>", "<it2>", "<it3>"])
    r = _bash(["slurm/submit_chain.sh", "--dry-run", "--to", "it3"], slurm.env())
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 7
    r = _bash(["slurm/submit_chain.sh", "--from", "it2", "--to", "pt1"], slurm.env())
    assert r.returncode == 2 and "comes after" in r.stderr


# ------------------------------------------------------------------------------------ preprocessing

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A synthetic corpus preprocessed by slurm/preprocess_array.sbatch as 2 array tasks (one
    folder part, one MODALITY=FILE part), then merged; records every step's outcome."""
    from megatron_omni.data.synthetic import MODALITIES, corpus_texts, make_synthetic_dataset
    from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

    base = tmp_path_factory.mktemp("slurm")
    raw = base / "raw"
    make_synthetic_dataset(raw, num_per_modality=12, seed=3, num_val_per_modality=4)
    tok = train_tiny_tokenizer(corpus_texts(raw), 400, base / "tokenizer.json")
    vocab = load_tokenizer(tok, speech_codebook_size=64).vocab_size
    # Part 0: a folder in preprocess_data.py's layout (first half + the val files); part 1: the
    # second halves as MODALITY=FILE pairs with other file names.
    (raw / "p0").mkdir()
    pairs = []
    for m in MODALITIES:
        lines = (raw / f"{m}.jsonl").read_text().splitlines(keepends=True)
        (raw / "p0" / f"{m}.jsonl").write_text("".join(lines[:6]))
        shutil.copy(raw / f"{m}_val.jsonl", raw / "p0" / f"{m}_val.jsonl")
        (raw / f"second_{m}.jsonl").write_text("".join(lines[6:]))
        pairs.append(f"{m}={raw / f'second_{m}.jsonl'}")
    parts = base / "parts.txt"
    parts.write_text(f"# two parts\n{raw / 'p0'}\n\n{' '.join(pairs)}\n")
    out = base / "energon"
    slurm = FakeSlurm(base / "fake")
    env = slurm.env(MEDIA_ROOT=raw, SLURM_CPUS_PER_TASK=1)
    task = ["slurm/preprocess_array.sbatch", parts, out, tok, "--speech-codebook-size", "64"]
    res = {"task0": _bash(task, dict(env, SLURM_ARRAY_TASK_ID="0"), timeout=120)}
    res["merge_early"] = _bash(["slurm/preprocess_array.sbatch", "--merge", out], env)
    res["task1"] = _bash(task, dict(env, SLURM_ARRAY_TASK_ID="1"), timeout=120)
    res["task1_again"] = _bash(task, dict(env, SLURM_ARRAY_TASK_ID="1"))
    res["merge"] = _bash(["slurm/preprocess_array.sbatch", "--merge", out], env, timeout=120)
    res["submit"] = _bash(["slurm/preprocess_array.sbatch", "--submit", parts, out, tok],
                          slurm.env(SBATCH_ARGS="--account=proj42"))
    return {"base": base, "raw": raw, "out": out, "tok": tok, "vocab": vocab, "res": res,
            "slurm": slurm}


def test_preprocess_array_parts_and_merge(prepared):
    res, out = prepared["res"], prepared["out"]
    for k in ("task0", "task1", "task1_again", "merge", "submit"):
        assert res[k].returncode == 0, f"{k}:\n{res[k].stdout}\n{res[k].stderr}"
    # Merging before every part is done is refused, naming the missing part.
    assert res["merge_early"].returncode == 2 and "part-00001" in res["merge_early"].stderr
    assert "already done" in res["task1_again"].stdout
    assert (out / "parts" / "expected_parts").read_text().strip() == "2"
    # The work ran through srun (one task) with the task's CPUs as preprocessing workers.
    calls = [c for c in prepared["slurm"].sruns()
             if "megatron_omni.cli.preprocess_data" in c["cmd"]]
    assert len(calls) == 2 and calls[0]["opts"]["--ntasks"] == "1"
    assert calls[0]["cmd"][calls[0]["cmd"].index("--workers") + 1] == "1"

    report = json.loads((out / "preprocess_report.json").read_text())
    assert report["parts"] == ["part-00000", "part-00001"]
    assert report["written"] == 5 * (12 + 4) and report["num_skipped"] == 0
    for m in ("text", "image", "video", "audio", "interleaved"):
        meta = json.loads((out / m / ".nv-meta" / "omni.json").read_text())
        assert meta["splits"] == {"train": 12, "val": 4}
        assert meta["parts"] == ["part-00000", "part-00001"]
        # The token-length histogram covers every part (data.seq_length is checked against it).
        assert {sp: sum(h.values()) for sp, h in meta["token_counts"].items()} == meta["splits"]
        assert sorted(p.name for p in out.joinpath(m).glob("*.tar")) == [
            "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    # Keys are unique across parts (Energon's index requires it) and carry the part name.
    import tarfile

    keys = []
    for shard in sorted((out / "image").glob("train-*.tar")):
        with tarfile.open(shard) as t:
            names = [i.name for i in t if i.name.endswith(".json")]
            keys += [n[:-5] for n in names]
            rec = json.loads(t.extractfile(names[0]).read())
            assert rec["key"] == names[0][:-5]
    assert len(keys) == len(set(keys)) == 12
    assert {k.split("-image", 1)[0] for k in keys} == {"part-00000", "part-00001"}

    # --submit: the array over both parts, then the merge behind it.
    sub = prepared["slurm"].sbatches()
    assert len(sub) == 2 and "--array=0-1%64" in sub[0] and "--account=proj42" in sub[0]
    assert "--dependency=afterok:1000" in sub[1] and sub[1][-2:] == ["--merge", str(out)]


def test_merge_progress_bar_and_rerun_from_copied_parts(prepared, tmp_path, capsys):
    """The merge shows a progress bar over the shards it links; merging a copy of the parts
    elsewhere gives the same report."""
    from megatron_omni.data.merge import merge

    shutil.copytree(prepared["out"] / "parts", tmp_path / "parts")
    rep = merge(tmp_path, progress=True)
    err = capsys.readouterr().err
    shards = sorted(p.relative_to(tmp_path) for p in tmp_path.glob("*/*.tar"))
    assert len(shards) == 5 * 3  # 2 train + 1 val shard per modality
    assert "merge" in err and f"{len(shards)}/{len(shards)}" in err and "shard" in err
    want = json.loads((prepared["out"] / "preprocess_report.json").read_text())
    assert {k: v for k, v in rep.items() if k not in ("out_dir", "datasets")} == {
        k: v for k, v in want.items() if k not in ("out_dir", "datasets")}
    # Quiet: no bar.
    merge(tmp_path, progress=False)
    assert "shard" not in capsys.readouterr().err


def test_merge_parts_names_match_preprocess():
    from megatron_omni.data import format as dataset_format
    from megatron_omni.data import merge as merge_parts

    for name in ("META_DIR", "REPORT_NAME", "SKIPPED_NAME", "SPLITS"):  # omni.json: omni_meta_path
        assert getattr(merge_parts, name) == getattr(dataset_format, name), name


def test_merged_dataset_loads(prepared):
    """The merged datasets are what the trainer's loaders read (index, omni.json, tokenizer)."""
    from megatron_omni.config import load_config
    from megatron_omni.data.loaders import OmniLoaders
    from megatron_omni.data.tokenizer import load_tokenizer

    cfg = load_config(None, [f"data.path={prepared['out']}", f"data.tokenizer={prepared['tok']}",
                             "data.modalities=[image,audio]", "data.seq_length=1024",
                             "data.media_backend=cpu", "data.packing_buffer_size=4",
                             "data.shuffle_buffer_size=4"]).data
    loaders = OmniLoaders(cfg, load_tokenizer(prepared["tok"], speech_codebook_size=64),
                          dp_rank=0, dp_size=1)
    for m in ("image", "audio"):
        b = loaders.next(m)
        assert b["tokens"].shape == (1, 1024) and b["modality"] == m
        assert all(k.startswith("part-0000") for k in b["sample_names"])


# ------------------------------------------------------------------------------------ real run

def _history(save: Path) -> list[dict]:
    p = save / "losses.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.slow
def test_train_sbatch_preemption_requeue_and_resume(prepared, tmp_path):
    """2 CPU tasks train a tiny stage; SIGUSR1 to the batch shell -> checkpoint, exit 75,
    `scontrol requeue`; running the script again (what the requeued job does) resumes."""
    slurm = FakeSlurm(tmp_path)
    save = tmp_path / "run"
    cfg = "examples/stages/tiny/pt2.yaml"
    args = ["slurm/train.sbatch", cfg, *TINY_MODEL, f"model.llm.vocab_size={prepared['vocab']}",
            f"data.path={prepared['out']}", f"data.tokenizer={prepared['tok']}",
            "data.media_backend=cpu", "data.packing_buffer_size=4",
            "data.shuffle_buffer_size=4", "stage.init_from=null", f"training.save={save}",
            "training.train_iters=1000", "training.log_interval=1", "training.save_interval=0"]
    env = slurm.env()
    log1 = tmp_path / "job-run1.out"
    with open(log1, "w") as f:
        job = subprocess.Popen(["bash", *map(str, args)], env=env, cwd=REPO, stdout=f,
                               stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 150
            while len(_history(save)) < 2:
                assert job.poll() is None, log1.read_text()[-5000:]
                assert time.time() < deadline, "no training steps within 150 s"
                time.sleep(0.2)
            job.send_signal(signal.SIGUSR1)            # what --signal=B:USR1@300 does
            rc = job.wait(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
    out1 = log1.read_text()
    assert rc == 75, out1[-5000:]
    assert "received SIGUSR1" in out1 and "saved checkpoint" in out1
    assert f"requeue {slurm.job_id}" in slurm.scontrol()
    from megatron_omni.training.checkpoint import find_latest

    k = _history(save)[-1]["step"]
    assert k >= 2 and find_latest(save).name == f"step_{k:08d}"

    # The requeued job: same script, same arguments (+ stop after 2 more steps for the test).
    r = _bash([*args, "training.exit_interval=2"], env, timeout=150)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert f"at step {k}" in r.stdout and "resumed from" in r.stdout
    steps = [h["step"] for h in _history(save)]
    assert steps == list(range(1, k + 3))
    assert slurm.scontrol().count(f"requeue {slurm.job_id}") == 1
    assert find_latest(save).name == f"step_{k + 2:08d}"


# ------------------------------------------------------------------------------------ recipes

def _load(size, stage):
    from megatron_omni.config import load_config

    return load_config(REPO / "examples" / "stages" / size / f"{stage}.yaml")


@pytest.mark.parametrize("size", ["9b", "72b"])
def test_stage_recipes_validate_and_chain(size):
    cfgs = {s: _load(size, s) for s in STAGES}
    base = _load(size, "base")
    llm = base.model.llm
    assert (llm.num_layers, llm.hidden_size) == ((32, 4096) if size == "9b" else (80, 8192))
    v, a = base.model.vision, base.model.audio
    assert (v.depth, v.hidden_size, v.num_heads, v.merger_hidden_size) == (32, 1280, 16, None)
    assert (a.hidden_size, a.num_heads, a.ffn_hidden_size, a.num_blocks) == (512, 4, 2048, 50)
    run = f"runs/m2omni-{size}"
    prev = None
    for s, c in cfgs.items():
        assert c.stage.name == s
        assert c.training.save == f"{run}/{s}"
        if prev is not None:
            assert c.stage.init_from == cfgs[prev].training.save, s
        prev = s
        t, p = c.training, c.parallel
        # recomputation is per stage, chosen with the planner (tests/tools/test_plan.py holds
        # every recipe within 5% of the best layout); selective never pays with flash attention
        assert t.bf16 and t.use_distributed_optimizer and t.recompute_granularity in (None, "full")
        assert t.fp8 == ("hybrid" if size == "72b" else None)
        assert c.model.transformer_impl == "transformer_engine"
        assert p.sequence_parallel
        if size == "72b":
            assert p.tensor_model_parallel_size == 8 and p.pipeline_model_parallel_size <= 8
            assert c.data.seq_length == 8192
            if p.first_stage_num_layers is not None:
                per_stage = (80 - p.first_stage_num_layers) // (p.pipeline_model_parallel_size - 1)
                assert p.first_stage_num_layers < per_stage
        else:
            assert p.tensor_model_parallel_size in (4, 8)
            assert p.pipeline_model_parallel_size in (1, 2)
            assert 4096 <= c.data.seq_length <= 8192
        if c.stage.train_llm:
            assert c.data.pure_text_ratio >= 0.15
        if "audio" not in c.data.modalities:
            assert not c.stage.train_audio
    assert not cfgs["pt1"].stage.train_llm and cfgs["pt1"].data.pure_text_ratio == 0.0
    assert cfgs["pt1"].stage.init_from == f"{run}/init"
    assert set(cfgs["pt1"].data.modalities) == {"image", "audio"}
    assert cfgs["pt2"].data.pure_text_ratio == 0.15
    assert cfgs["it1"].data.pure_text_ratio == 0.30
    for s in ("pt3", "it2", "it3"):
        assert cfgs[s].data.pure_text_ratio == 0.25
    assert cfgs["pt3"].stage.balance == "step" and cfgs["pt3"].stage.step_balance_file
    assert cfgs["it3"].stage.balance == "dynamic"
    assert {s for s, c in cfgs.items() if c.stage.balance != "none"} == {"pt3", "it3"}
    assert set(cfgs["pt3"].data.modalities) == set(cfgs["it3"].data.modalities) == {
        "text", "image", "video", "audio", "interleaved"}
    # AT: DPO + 0.3 x SFT, 1 : 1 mix, only LoRA adapters of about 5% of the LLM.
    from megatron_omni.training.lora import lora_rank_for_share

    at, al = cfgs["at"], cfgs["at"].alignment
    assert not (at.stage.train_llm or at.stage.train_vision or at.stage.train_audio
                or at.stage.train_projectors)
    assert al.sft_weight == 0.3 and al.preference_ratio == 1.0 and al.dpo_beta == 0.1
    assert abs(al.lora_rank - lora_rank_for_share(llm, 0.05)) <= 0.05 * al.lora_rank


GPUS = {"9b": 64, "72b": 256}


def _workloads(seq: int) -> dict:
    """Rows the planner is asked about: text only; a row of image patches (4 images of 896x896 =
    16K patches in 8K rows, 3 in 4K rows); the largest video (32 frames of 532x532, ~5.8K
    tokens; 8K rows only); a row full of audio clips of 15 s (28 in 8K rows, 14 in 4K)."""
    long = seq >= 8192
    out = {"text": {},
           "images": {"samples_per_row": 4 if long else 3,
                      "images": [(896, 896, 1)] * (4 if long else 3)},
           "audio": {"samples_per_row": 28 if long else 14,
                     "audio_seconds": [15.0] * (28 if long else 14)}}
    if long:
        out["video"] = {"images": [(532, 532, 32)]}
    return out


@pytest.mark.parametrize("size", ["9b", "72b"])
def test_stage_layouts_fit_on_h100(size):
    from megatron_omni.plan import Layout, Workload, image_grid, plan
    from megatron_omni.training.flops import audio_encoder_frames

    for s in STAGES:
        cfg = _load(size, s)
        p, t, d, v = cfg.parallel, cfg.training, cfg.data, cfg.model.vision
        dp = GPUS[size] // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
        layout = Layout(
            tp=p.tensor_model_parallel_size,
            pp=p.pipeline_model_parallel_size,
            vpp=p.virtual_pipeline_model_parallel_size,
            dp=dp,
            global_batch=dp * t.num_micro_batches * len(d.modalities),
            first_stage_num_layers=p.first_stage_num_layers,
            recompute=t.recompute_granularity,
            distributed_optimizer=True,
        )
        for name, w in _workloads(d.seq_length).items():
            grids = tuple(
                image_grid(h, w_, f, v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
                for h, w_, f in w.get("images", [])
            )
            frames = tuple(audio_encoder_frames(x) for x in w.get("audio_seconds", []))
            work = Workload(d.seq_length, w.get("samples_per_row", 1), grids, frames)
            res = plan(cfg, layout, work, "h100", "fp8" if t.fp8 else "bf16")
            assert res.fits, f"{size} {s} {name}: {res.peak_bytes / 2**30:.1f} GiB"
            assert res.peak_bytes < 0.9 * res.gpu.memory_bytes, (size, s, name)


def test_plan_cli_accepts_stage_recipes():
    for size, gpus in GPUS.items():
        r = subprocess.run(
            [
                sys.executable,
                "tools/plan.py",
                "--config",
                f"examples/stages/{size}/pt3.yaml",
                "--gpus",
                str(gpus),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert ": fits" in r.stdout and "DOES NOT FIT" not in r.stdout
