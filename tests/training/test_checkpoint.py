"""Checkpointing (megatron_omni.training.checkpoint) and the optimizer/scheduler it saves.

Fast tests: file-system rules (find_latest, latest, keep-last-K, tmp clean-up), signals, the lr
schedule, and single-process (world size 1) save/load round trips, frozen parameters and the
megatron-core bugs the module works around (canaries: they fail once upstream fixes a bug, so the
work-around can be reviewed).

Slow tests (2 gloo ranks, tests/workers/checkpoint_resume.py, two launches = NEW processes):
exact resume at TP=2, PP=2 and DP=2 with the distributed optimizer; reshard TP=2 -> TP=1 x PP=2;
a save killed by SIGKILL before publishing; keep-last-K; weights-only load with a new submodule;
signal agreement.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from dist_utils import REPO, free_port, run_workers

from megatron_omni.config import ConfigError, load_config
from megatron_omni.training import checkpoint as ckpt
from megatron_omni.training import signals

K, N = 3, 6


def _complete(root: Path, step: int, marker: bool = True) -> Path:
    d = root / ckpt.step_dir_name(step)
    d.mkdir(parents=True)
    (d / "common.pt").write_bytes(b"x")
    if marker:
        (d / ckpt.COMPLETE).write_text("{}")
    return d


# --- file-system rules ----------------------------------------------------------------------------

def test_find_latest_only_counts_published_complete_dirs(tmp_path):
    assert ckpt.find_latest(tmp_path) is None
    assert ckpt.find_latest(tmp_path / "nope") is None
    _complete(tmp_path, 1)
    s3 = _complete(tmp_path, 3)
    _complete(tmp_path, 5, marker=False)  # published name but no marker
    t = tmp_path / "tmp_step_00000007"  # a killed save, even with a marker inside
    t.mkdir()
    (t / ckpt.COMPLETE).write_text("{}")
    ckpt.write_latest(tmp_path, "step_00000005")  # stale pointer: the scan decides
    assert ckpt.find_latest(tmp_path) == s3
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 3]
    assert ckpt.resolve_checkpoint(tmp_path) == s3
    assert ckpt.resolve_checkpoint(s3) == s3
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "step_00000005")
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "empty")


def test_latest_is_written_atomically(tmp_path, monkeypatch):
    ckpt.write_latest(tmp_path, "step_00000001")
    ckpt.write_latest(tmp_path, "step_00000002")
    assert ckpt.read_latest(tmp_path) == "step_00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]

    def crash(*a, **k):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ckpt.write_latest(tmp_path, "step_00000003")
    assert ckpt.read_latest(tmp_path) == "step_00000002"  # old content, never a partial file


def test_prune_keeps_last_k_and_cleanup_removes_only_tmp(tmp_path):
    for s in (1, 2, 3, 4):
        _complete(tmp_path, s)
    _complete(tmp_path, 9, marker=False)
    (tmp_path / "tmp_step_00000010").mkdir()
    assert ckpt.prune_checkpoints(tmp_path, 0) == []
    removed = ckpt.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["step_00000001", "step_00000002"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert (tmp_path / "step_00000009").is_dir()  # incomplete: not a checkpoint, not pruned
    assert [p.name for p in ckpt.cleanup_tmp(tmp_path)] == ["tmp_step_00000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000003", "step_00000004", "step_00000009"]


# --- signals, schedule ----------------------------------------------------------------------------

def test_signal_sets_flag_instead_of_killing():
    assert signals.REQUEUE_EXIT_CODE not in (0, 1, 2) and signals.REQUEUE_EXIT_CODE < 128
    signals.reset_signal_flag()
    previous = signals.install_signal_handlers((signal.SIGUSR1,))
    try:
        assert signals.signal_received() is None and signals.should_save_and_exit() is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.signal_received() == signal.SIGUSR1
        assert signals.should_save_and_exit() is True
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        signals.reset_signal_flag()


def test_scheduler_linear_warmup_then_cosine():
    import math

    from megatron_omni.training.optimizer import build_scheduler

    cfg = load_config(None, ["training.lr=1e-3", "training.min_lr=1e-4", "training.train_iters=10",
                             "training.lr_warmup_iters=4", "training.weight_decay=0.1"])
    opt = SimpleNamespace(param_groups=[{"wd_mult": 1.0}, {"wd_mult": 0.0}])
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(1)
    warm = [1e-3 * k / 4 for k in range(5)]
    cos = [1e-4 + 0.5 * (1 + math.cos(math.pi * (k - 4) / 6)) * 9e-4 for k in range(5, 11)]
    assert lrs == pytest.approx(warm + cos + [1e-4], abs=1e-12)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0
    bad = load_config(None, ["training.train_iters=4", "training.lr_warmup_iters=4"])
    with pytest.raises(ConfigError, match="lr_warmup_iters"):
        build_scheduler(bad, opt)


def test_optimizer_config_follows_training_config():
    from megatron_omni.training.optimizer import ddp_config, optimizer_config

    cfg = load_config(None, ["training.optimizer=adam", "training.adam_beta2=0.99",
                             "training.use_distributed_optimizer=true", "training.clip_grad=0.5",
                             "training.bf16=true", "training.overlap_grad_reduce=true"])
    o, d = optimizer_config(cfg), ddp_config(cfg)
    assert o.decoupled_weight_decay is False and o.adam_beta2 == 0.99 and o.clip_grad == 0.5
    assert o.use_distributed_optimizer and d.use_distributed_optimizer and d.grad_reduce_in_fp32
    # bf16 and the overlapped reduction run on the CPU too (tests see what a GPU run sees)
    assert o.bf16 and o.params_dtype == torch.bfloat16 and d.overlap_grad_reduce
    assert optimizer_config(load_config(None, [])).decoupled_weight_decay is True  # adamw
    with pytest.raises(ConfigError, match="training.optimizer"):
        load_config(None, ["training.optimizer=sgd"])


# --- single process (world size 1) ----------------------------------------------------------------

BASE = ["model.llm.num_layers=2", "model.vision.enabled=false", "model.audio.enabled=false",
        "model.llm.vocab_size=128", "model.llm.make_vocab_size_divisible_by=64",
        "data.seq_length=16", "training.train_iters=10", "training.lr=1e-3",
        "training.lr_warmup_iters=1"]


def _build(overrides=(), freeze=()):
    from megatron_omni.models.llm import build_llm_chunks
    from megatron_omni.training.optimizer import build_optimizer, build_scheduler, wrap_ddp

    cfg = load_config(None, BASE + list(overrides))
    chunks = build_llm_chunks(cfg)
    for name, p in chunks[0].named_parameters():
        if name.startswith(tuple(freeze)):
            p.requires_grad_(False)
    model = wrap_ddp(cfg, chunks)
    opt = build_optimizer(cfg, model)
    return cfg, chunks, model, opt, build_scheduler(cfg, opt)


def _step(model, opt, sched, seed):
    from megatron_omni.models.attention import packed_seq_params

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (1, 16), generator=g)
    labels = torch.randint(0, 128, (1, 16), generator=g)
    for m in model:
        m.zero_grad_buffer()
    opt.zero_grad()
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)
    loss = model[0](ids, torch.cat([torch.arange(7), torch.arange(9)])[None], labels=labels,
                    packed_seq_params=packed_seq_params(cu)).mean()
    loss.backward()
    model[0].finish_grad_sync()
    ok, _, _ = opt.step()
    sched.step(1)
    return loss.item()


@pytest.mark.parametrize("distributed", [False, True], ids=["local_opt", "distributed_opt"])
def test_frozen_parameters_get_no_optimizer_state(single_rank, distributed):
    from megatron_omni.training.optimizer import inner_optimizers

    frozen = ("embedding.", "decoder.layers.0.")
    cfg, chunks, model, opt, sched = _build(
        [f"training.use_distributed_optimizer={str(distributed).lower()}"], freeze=frozen)
    params = dict(chunks[0].named_parameters())
    frozen_before = {n: p.detach().clone() for n, p in params.items() if n.startswith(frozen)}
    trainable = {n: p.detach().clone() for n, p in params.items() if not n.startswith(frozen)}
    assert frozen_before and trainable
    _step(model, opt, sched, 0)
    _step(model, opt, sched, 1)
    opt_params = [p for inner in inner_optimizers(opt) for g in inner.param_groups
                  for p in g["params"]]
    states = [s for inner in inner_optimizers(opt) for s in inner.state.values()]
    # Only trainable parameters are optimised (the distributed optimizer holds flat shards).
    assert sum(p.numel() for p in opt_params) == sum(p.numel() for p in trainable.values())
    assert len(states) == len(opt_params) and all(s["step"] == 2 for s in states)
    if not distributed:
        ids = {id(p) for p in opt_params}
        assert all(id(params[n]) not in ids for n in frozen_before)
    for n, before in frozen_before.items():
        assert torch.equal(params[n], before), n
    assert all(not torch.equal(params[n], trainable[n]) for n in trainable)


def test_upstream_distributed_optimizer_step_bugs_still_present(single_rank):
    """Canary for the megatron-core bugs checkpoint.py works around (bugs 1 and 3 of its
    docstring). If this fails, megatron-core fixed them: review the work-arounds."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if HAVE_APEX_OR_TE:
        pytest.skip("the bugs concern torch Adam (no Apex / Transformer Engine)")
    cfg, chunks, model, opt, sched = _build(["training.use_distributed_optimizer=true"])
    model_sd = {"model0": chunks[0].sharded_state_dict()}
    with pytest.raises(AssertionError):  # bug 1: fresh torch-Adam DistributedOptimizer
        opt.sharded_state_dict(model_sd, is_loading=True, metadata=dict(ckpt.SHARDED_METADATA))
    _step(model, opt, sched, 0)
    sub = opt.chained_optimizers[0]
    sub.load_state_dict(sub.state_dict())
    steps = [s["step"] for s in sub.optimizer.state.values()]
    assert len(steps) > 1 and len({id(s) for s in steps}) == 1  # bug 3: one shared tensor
    assert ckpt._unshare_adam_steps(opt) == len(steps) - 1
    assert len({id(s["step"]) for s in sub.optimizer.state.values()}) == len(steps)


@pytest.mark.parametrize("distributed", [False, True], ids=["local_opt", "distributed_opt"])
def test_save_load_round_trip_single_rank(single_rank, tmp_path, distributed):
    from megatron.core import parallel_state as ps

    flag = [f"training.use_distributed_optimizer={str(distributed).lower()}"]
    cfg, chunks, model, opt, sched = _build(flag)
    (tmp_path / "tmp_step_00000001").mkdir()  # leftover of a killed save
    for s in range(2):
        _step(model, opt, sched, s)
    rank_local = {"loader": {"epoch": 0, "offset": 17}, "gen": torch.Generator().get_state()}
    extra = {"iteration": 2, "balancer": {"w": [0.5, 0.25]}, ckpt.RANK_LOCAL: rank_local}
    ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, extra, cfg, keep_last=1)
    _step(model, opt, sched, 2)
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, dict(extra, iteration=3), cfg,
                                keep_last=1)
    after_save = torch.rand(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]
    assert ckpt.read_latest(tmp_path) == "step_00000003"
    assert (path / "config.yaml").read_text().startswith("model:")
    ref = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    lr = opt.param_groups[0]["lr"]
    ref_loss = _step(model, opt, sched, 3)

    torch.manual_seed(999)  # different init; everything must come from the checkpoint
    cfg2, chunks2, model2, opt2, sched2 = _build(flag)
    out = ckpt.load_checkpoint(tmp_path, model2, opt2, sched2)
    assert torch.equal(torch.rand(4), after_save)  # RNG restored (same layout)
    meta = out.pop(ckpt.META_KEY)
    assert meta["step"] == 3 and meta["rng_restored"] and meta["rank_local_source"] == "exact"
    assert out["iteration"] == 3 and out["balancer"] == {"w": [0.5, 0.25]}
    assert out[ckpt.RANK_LOCAL]["loader"] == rank_local["loader"]
    assert torch.equal(out[ckpt.RANK_LOCAL]["gen"], rank_local["gen"])
    for n, p in chunks2[0].named_parameters():
        assert torch.equal(p, ref[n]), n
    assert sched2.num_steps == 3 and opt2.param_groups[0]["lr"] == lr
    steps = [s["step"] for inner in opt2.chained_optimizers for s in inner.optimizer.state.values()]
    assert all(float(s) == 3 for s in steps) and len({id(s) for s in steps}) == len(steps)
    assert _step(model2, opt2, sched2, 3) == ref_loss
    for (n, p), (_, q) in zip(chunks[0].named_parameters(), chunks2[0].named_parameters()):
        assert torch.equal(p, q), n  # same Adam update after the resume
    assert ps.get_data_parallel_world_size() == 1


@pytest.mark.parametrize("distributed", [False, True], ids=["local_opt", "distributed_opt"])
def test_save_before_first_step_then_resume(single_rank, tmp_path, distributed):
    """A never-stepped torch Adam has no state: megatron-core's distributed optimizer cannot
    save it (bug 1) and the local one drops the zero step, which torch Adam's load_state_dict
    then misses (bug 4; KeyError: 'step')."""
    flag = [f"training.use_distributed_optimizer={str(distributed).lower()}"]
    cfg, chunks, model, opt, sched = _build(flag)
    ckpt.save_checkpoint(tmp_path, 0, model, opt, sched, {}, cfg)
    ref = _step(model, opt, sched, 5)
    torch.manual_seed(5)
    _, chunks2, model2, opt2, sched2 = _build(flag)
    ckpt.load_checkpoint(tmp_path, model2, opt2, sched2)
    assert _step(model2, opt2, sched2, 5) == ref
    for (n, p), (_, q) in zip(chunks[0].named_parameters(), chunks2[0].named_parameters()):
        assert torch.equal(p, q), n


class _Opaque:
    """Not loadable by torch.load(weights_only=True)."""


def test_load_refuses_optimizer_kind_change_and_unsafe_extra_state(single_rank, tmp_path):
    cfg, chunks, model, opt, sched = _build()
    _step(model, opt, sched, 0)
    with pytest.raises(ckpt.CheckpointError, match="weights_only=True"):
        ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"obj": _Opaque()}, cfg)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before writing
    ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {}, cfg)
    _, chunks2, model2, opt2, sched2 = _build(["training.use_distributed_optimizer=true"])
    with pytest.raises(ckpt.CheckpointError, match="use_distributed_optimizer"):
        ckpt.load_checkpoint(tmp_path, model2, opt2, sched2)
    out = ckpt.load_checkpoint(tmp_path, model2, opt2, sched2, load_optimizer=False)
    assert sched2.num_steps == 1 and out[ckpt.META_KEY]["step"] == 1
    for (n, p), (_, q) in zip(chunks[0].named_parameters(), chunks2[0].named_parameters()):
        assert torch.equal(p, q), n


def test_failed_publish_raises_everywhere_and_keeps_previous(single_rank, tmp_path, monkeypatch):
    cfg, chunks, model, opt, sched = _build()
    _step(model, opt, sched, 0)
    first = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {}, cfg)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_publish", broken)
    with pytest.raises(ckpt.CheckpointError, match="publishing .* failed on rank 0: OSError"):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {}, cfg)
    assert ckpt.find_latest(tmp_path) == first and ckpt.read_latest(tmp_path) == first.name
    assert (tmp_path / "tmp_step_00000002" / "common.pt").is_file()  # unpublished, ignored


def test_weights_only_new_submodule_single_rank(single_rank, tmp_path):
    cfg, chunks, model, opt, sched = _build()
    _step(model, opt, sched, 0)
    ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"iteration": 1}, cfg)
    from megatron_omni.models.llm import build_llm_chunks

    new = build_llm_chunks(cfg)
    new[0].new_encoder = torch.nn.Linear(4, 4)
    init = new[0].new_encoder.weight.detach().clone()
    with pytest.raises(ckpt.CheckpointError, match=r"new_encoder\.weight.*allow_missing"):
        ckpt.load_checkpoint(tmp_path, new, weights_only=True)
    out = ckpt.load_checkpoint(tmp_path, new, weights_only=True, allow_missing=["new_encoder."])
    assert set(out) == {ckpt.META_KEY, ckpt.RANK_LOCAL} and out[ckpt.RANK_LOCAL] is None
    assert torch.equal(new[0].new_encoder.weight, init)
    for (n, p), (_, q) in zip(chunks[0].named_parameters(), new[0].named_parameters()):
        assert torch.equal(p, q), n
    # the other way round: the checkpoint has tensors the model lacks
    ckpt.save_checkpoint(tmp_path / "b", 1, new, None, None, {}, cfg)
    with pytest.raises(ckpt.CheckpointError, match="this model does not.*strict=False"):
        ckpt.load_checkpoint(tmp_path / "b", chunks, weights_only=True)
    ckpt.load_checkpoint(tmp_path / "b", chunks, weights_only=True, strict=False)


# --- multi-process --------------------------------------------------------------------------------

def _launch_killed(script: str, world_size: int, args: list, timeout: int = 300) -> Path:
    """Run a worker whose rank 0 is expected to SIGKILL itself; returns the log directory.

    The other ranks then fail in a collective (gloo: "Connection closed by peer") or are killed
    here after a grace period."""
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="omni_killed_"))
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
        env.pop("SLURM_PROCID", None)
        log = open(logs / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(REPO / "tests" / "workers" / script),
                                        *map(str, args)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=REPO), log))
    try:
        rc0 = procs[0][0].wait(timeout=timeout)
        deadline = time.time() + 30
        for p, _ in procs[1:]:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    if rc0 != -signal.SIGKILL:
        raise AssertionError(f"rank 0 exited with {rc0}, expected SIGKILL\n"
                             + (logs / "rank0.log").read_text()[-6000:])
    return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    r1_path = base / "phase1.json"
    t0 = time.time()
    _launch_killed("checkpoint_resume.py", 2, [r1_path, "train", base])
    t1 = time.time()
    tp2 = base / "tp2"
    killed = tp2 / "tmp_step_00000004"
    after_kill = {
        "find_latest": str(ckpt.find_latest(tp2)), "latest": ckpt.read_latest(tp2),
        "tmp_files": sorted(p.name for p in killed.iterdir()) if killed.is_dir() else [],
    }
    r2 = run_workers("checkpoint_resume.py", 2, ["resume", str(base)])
    print(f"checkpoint phases: train+kill {t1 - t0:.1f}s, resume {time.time() - t1:.1f}s")
    return SimpleNamespace(r1=json.loads(r1_path.read_text()), r2=r2, after_kill=after_kill,
                           base=base)


LAYOUTS = ["tp2", "pp2", "dp2_distopt"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_resume(runs, layout):
    a, b = runs.r1[layout], runs.r2[layout]
    assert a["first_losses"] == a["ref_losses"][:K]  # the build is deterministic
    assert a["after_save_loss"] == a["ref_losses"][K]  # saving does not perturb training
    # NEW processes, fresh (differently initialised) model: bit-identical continuation.
    assert b["losses"] == a["ref_losses"][K:]
    assert b["lrs"] == a["ref_lrs"][K:]
    assert b["grad_norms"] == a["ref_grad_norms"][K:]
    assert b["eval_at_k"] == a["eval_at_k"]
    assert b["rng"] == a["rng"]  # every rank's RNG streams restored
    assert b["rng_restored"] and b["rank_local_source"] == "exact"
    assert b["iteration"] == K and b["sched_num_steps"] == K
    assert b["consumed_rows"] == K * 2 * (2 if layout == "dp2_distopt" else 1)
    assert b["steps"]["values"] == [float(K)] and not b["steps"]["shared"]
    assert len(set(a["ref_losses"])) == N  # the loss moves; equality is not trivial


@pytest.mark.slow
def test_distributed_optimizer_really_shards(runs):
    d = runs.r1["dp2_distopt"]
    assert d["optimizer_kind"] == "DistributedOptimizer"
    assert runs.r1["tp2"]["optimizer_kind"] == "FP32Optimizer"
    assert sum(d["optimizer_numel"]) == d["model_numel"][0]
    assert all(0 < n < d["model_numel"][0] for n in d["optimizer_numel"])


@pytest.mark.slow
def test_reshard_tp2_to_tp1_pp2(runs):
    r, ref = runs.r2["reshard_tp2_to_tp1pp2"], runs.r1["tp2"]
    assert abs(r["eval_at_k"] - ref["eval_at_k"]) < 1e-5  # forward-only, same batch
    # optimizer + scheduler resharded too: training continues on the same curve
    assert r["steps"]["values"] == [float(K)] and r["sched_num_steps"] == K
    assert r["lrs"] == ref["ref_lrs"][K:]
    assert max(abs(x - y) for x, y in zip(r["losses"], ref["ref_losses"][K:])) < 1e-5
    # rank-specific state: RNG re-seeded; data state found through the data-parallel rank
    assert not r["rng_restored"] and r["rank_local_source"] == "data_parallel_rank"
    assert r["iteration"] == K


@pytest.mark.slow
def test_killed_save_leaves_previous_checkpoint(runs):
    k = runs.after_kill
    assert "common.pt" in k["tmp_files"] and any(f.endswith(".distcp") for f in k["tmp_files"])
    assert ckpt.COMPLETE not in k["tmp_files"]
    assert k["find_latest"].endswith("step_00000003") and k["latest"] == "step_00000003"
    assert runs.r2["tp2"]["latest"] == k["find_latest"]  # and the resume from it is exact


@pytest.mark.slow
def test_keep_last_k_latest_and_tmp_cleanup(runs):
    tp2 = runs.base / "tp2"
    assert sorted(p.name for p in tp2.iterdir()) == ["latest", "step_00000005", "step_00000006"]
    assert ckpt.read_latest(tp2) == "step_00000006" == ckpt.find_latest(tp2).name
    assert json.loads((ckpt.find_latest(tp2) / ckpt.COMPLETE).read_text())["step"] == N


@pytest.mark.slow
def test_weights_only_into_model_with_new_submodule(runs):
    w = runs.r2["weights_only"]
    assert "extra_head.weight" in w["refused"] and "allow_missing" in w["refused"]
    assert w["untouched_after_refusal"]
    assert w["allowed_missing"] == ["extra_head.bias", "extra_head.weight"]
    assert w["extra_head_kept_init"]
    assert w["eval_at_k"] == runs.r1["tp2"]["eval_at_k"]
    assert w["returned_keys"] == sorted([ckpt.META_KEY, ckpt.RANK_LOCAL])


@pytest.mark.slow
def test_signal_on_one_rank_stops_all(runs):
    s = runs.r2["signals"]
    assert s["before"] == [False, False] and s["after"] == [True, True]
    assert s["local"] == [None, int(signal.SIGUSR1)]
