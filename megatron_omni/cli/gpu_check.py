"""GPU acceptance check: every GPU path one GPU can show, in one command (``make gpu-check``).

Runs the stages below in order, prints a table and writes a JSON report
``{"stages": {name: {"status": "PASS"|"FAIL"|"SKIP", ...figures}}, "meta": {...}}``.
A stage whose dependency (CUDA, Transformer Engine, DALI, FP8-capable GPU, ...) is missing is
SKIP, never PASS. The whole check is sized for at most ~8 minutes on one H100/H200; stages that
would start after ``--budget`` seconds are SKIP.

Stages:
  probe            versions of torch/CUDA/cuDNN/NCCL/TE/megatron-core/Energon/DALI/transformers and
                   whether they match the pins of docker/Dockerfile and requirements-gpu.txt
  nccl             single-rank NCCL init with the CPU shims inactive; the step's collectives
  llm_te_vs_local  LLM, TE spec vs local spec in bf16, loss and gradients against an fp32
                   reference, on a packed row with real M-RoPE ids (weights via load_full_llm_state)
  thd_packed       a packed THD row vs each sample alone (TE, else the flex-attention path)
  vit_te_vs_local  ViT, TE vs local on mixed image/video grids (bf16 vs an fp32 reference)
  omni_trainer     the whole omni model through the Trainer in bf16: plain DDP, distributed
                   optimizer + overlap_grad_reduce, FP8 (hybrid), save + resume vs uninterrupted
  fp8_vs_bf16      loss curves of a ~0.4B LLM trained in FP8 (hybrid) and in bf16
  llm_throughput   Llama-3.2-1B-shaped LLM: tokens/s and MFU of TE bf16, TE FP8, local bf16 and
                   transformers' LlamaForCausalLM (same weights, one run), peak memory vs plan.py
  dali_decode      DALI decode (GPU: mixed) vs the CPU backend on JPEG/PNG/H.264/WAV/FLAC, a
                   real OmniLoaders run with worker processes, and deferred decoding (images and
                   videos decoded in this training process by DALI mixed on its GPU) vs decoding
                   in the workers

``--dry-run`` runs every stage on the CPU with tiny shapes (gloo, local spec, DALI CPU operators):
it exercises the code of each stage; a stage whose subject is a GPU property is then SKIP (or FAIL
if its CPU exercise failed), never PASS. The test suite runs the dry run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

BASE_IMAGE = "nvcr.io/nvidia/pytorch:25.11-py3"
"""The container base of docker/Dockerfile (keep the two in step)."""

PINS = {
    "megatron-core": ("==", "0.16.1"),
    "transformer-engine": ("range", "2.9", "2.12"),
    "megatron-energon": ("==", "7.4.1"),
    "torch": (">=", "2.6"),
    "cudnn": (">=", "9.0"),
    "nccl": (">=", "2.21"),
}
"""What megatron-core 0.16.1 supports (its ``dev`` extra pins transformer-engine >=2.9,<2.12;
torch >= 2.6) and what this project is tested with."""


def _wanted(pin: tuple) -> str:
    """A pin as pip would write it: ("range", lo, hi) -> ">=lo,<hi"; ("==", v) -> "==v"."""
    return f">={pin[1]},<{pin[2]}" if pin[0] == "range" else pin[0] + pin[1]


WHEELS = """\
Runs on a machine with only a CUDA PyTorch (Python 3.12, no package registry): stages whose
dependencies are missing are SKIP. To run them all, bring these wheels (pip download on a
machine with a registry, then `pip install --no-index --find-links DIR ...`):
  pure Python (any platform):  megatron-core==0.16.1 (needs numpy, packaging),
                               megatron-energon==7.4.1 (+ its deps: webdataset, braceexpand,
                               pyyaml, s3fs/multi-storage-client optional), transformers
                               (+ tokenizers, safetensors, huggingface-hub, regex), tokenizers,
                               sentencepiece, pyyaml, tensorboard, einops
  binary (manylinux x86_64, cp312): nvidia-dali-cuda120 (CUDA 12) or nvidia-dali-cuda130 (CUDA 13),
                               av (PyAV, H.264 encode/decode), soundfile, Pillow, numpy
  Transformer Engine: transformer-engine[pytorch]>=2.9,<2.12 built for the machine's torch/CUDA
                               (the NGC PyTorch container has one; a pip wheel must match torch)
Then: make gpu-check  (or, from the repository root: python -m megatron_omni.cli.gpu_check
--out FILE; omni-gpu-check where the package is installed)."""


class Skip(Exception):
    """A dependency of the stage is missing."""


def need(module: str, why: str = ""):
    try:
        return importlib.import_module(module)
    except (ImportError, OSError, RuntimeError) as e:
        raise Skip(f"{module} not importable ({type(e).__name__}: {str(e)[:120]}){why}")


def version_of(dist: str):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _vtuple(v: str) -> tuple:
    out = []
    for part in v.replace("+", ".").split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def pin_ok(version, pin) -> bool:
    if version is None:
        return False
    v = _vtuple(str(version))
    if pin[0] == "==":
        return v[: len(_vtuple(pin[1]))] == _vtuple(pin[1])
    if pin[0] == ">=":
        return v >= _vtuple(pin[1])
    return _vtuple(pin[1]) <= v < _vtuple(pin[2])


# --------------------------------------------------------------------------------------- context


class Ctx:
    def __init__(self, dry_run: bool, budget: float, workdir: Path):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available() and not dry_run
        self.dry = dry_run or not torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        self.budget, self.t0, self.workdir = budget, time.perf_counter(), workdir
        self._te = None

    def te(self) -> bool:
        if self._te is None:
            try:
                from megatron_omni.models.specs import transformer_engine_status

                self._te = bool(self.cuda and transformer_engine_status()[0])
            except Exception:
                self._te = False
        return self._te

    def fp8(self) -> bool:
        return self.te() and self.torch.cuda.get_device_capability(0) >= (8, 9)

    def gpu_only(self, figures: dict, what: str) -> dict:
        """Dry-run result of a stage whose subject is the GPU: SKIP with what was exercised."""
        figures.setdefault("status", "SKIP")
        figures.setdefault("reason", f"no CUDA (dry run): {what} exercised on the CPU")
        figures["exercised"] = True
        return figures


def ensure_runtime():
    need("megatron.core")
    from megatron.core import parallel_state as ps

    from megatron_omni.config import ParallelConfig
    from megatron_omni.parallel import runtime

    if not ps.model_parallel_is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runtime.initialize(
            ParallelConfig(), seed=1234, env=runtime.DistEnv(0, 1, 0, "127.0.0.1", port, "single")
        )


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float().to(a.device)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def tiny_cfg(*extra, gpu: bool, vision=True, audio=True):
    """The tests' tiny omni config; on a GPU a wider LLM (head dim 64, so M-RoPE's sections
    [8, 12, 12] cover its 32 rotary pairs)."""
    from megatron_omni.testing.omni_batch import tiny_omni_cfg

    size = (
        [
            "model.llm.num_layers=4",
            "model.llm.hidden_size=256",
            "model.llm.ffn_hidden_size=704",
            "model.llm.num_attention_heads=4",
            "model.llm.num_query_groups=2",
            "model.llm.mrope_section=[8,12,12]",
        ]
        if gpu
        else []
    )
    return tiny_omni_cfg(*size, *extra, vision=vision, audio=audio)


def packed_row(cfg, device, seed=0, **kw):
    from megatron_omni.parallel.device import declared_device
    from megatron_omni.testing.omni_batch import omni_batch
    from megatron_omni.training.trainer import to_model_batch

    with declared_device(device):
        return to_model_batch(omni_batch(cfg, seed=seed, **kw))


def llm_loss_and_grads(model, b):
    from megatron_omni.training.step import model_inputs

    model.zero_grad(set_to_none=True)
    psp = model_inputs(b)[1]["packed_seq_params"]
    per_tok = model(b["tokens"], b["position_ids"], labels=b["labels"], packed_seq_params=psp)
    mask = b["loss_mask"].float()
    loss = (per_tok.float() * mask).sum() / mask.sum()
    loss.backward()
    grads = {
        n: p.grad.detach().float().clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return float(loss), grads, per_tok.detach().float()


# ---------------------------------------------------------------------------------------- stages


def stage_probe(ctx: Ctx) -> dict:
    torch = ctx.torch
    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version())
        if torch.backends.cudnn.is_available()
        else None,
        "nccl": None,
        "gpu": None,
    }
    if torch.cuda.is_available():
        v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        v["gpu"] = (
            f"{torch.cuda.get_device_name(0)} "
            f"(sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})"
        )
    for dist in (
        "transformer-engine",
        "transformer_engine",
        "megatron-core",
        "megatron-energon",
        "nvidia-dali-cuda120",
        "nvidia-dali-cuda130",
        "transformers",
        "av",
        "soundfile",
        "flash-attn",
    ):
        v[dist] = version_of(dist)
    te = v["transformer-engine"] or v["transformer_engine"]
    if te is None:
        with contextlib.suppress(Exception):
            import transformer_engine

            te = getattr(transformer_engine, "__version__", None)
    found = {
        "megatron-core": v["megatron-core"],
        "transformer-engine": te,
        "megatron-energon": v["megatron-energon"],
        "torch": torch.__version__,
        "cudnn": v["cudnn"] and f"{int(v['cudnn']) // 10000}.{int(v['cudnn']) // 100 % 100}",
        "nccl": v["nccl"],
    }
    mismatches = [
        f"{k}: have {found[k]}, want {_wanted(PINS[k])}"
        for k in PINS
        if not pin_ok(found[k], PINS[k])
    ]
    cuda_major = (v["cuda"] or "").split(".")[0]
    dali_major = "12" if v["nvidia-dali-cuda120"] else "13" if v["nvidia-dali-cuda130"] else None
    if cuda_major and dali_major and cuda_major != dali_major:
        mismatches.append(f"DALI wheel for CUDA {dali_major}, torch built for CUDA {cuda_major}")
    return {
        "status": "PASS",
        "versions": v,
        "base_image": BASE_IMAGE,
        "pins_match": not mismatches,
        "mismatches": mismatches,
    }


def stage_nccl(ctx: Ctx) -> dict:
    ensure_runtime()
    torch = ctx.torch
    from megatron_omni.models.omni import special_token_ids
    from megatron_omni.parallel import cpu_compat
    from megatron_omni.parallel.device import comm_device
    from megatron_omni.training.step import global_token_counts

    backend = torch.distributed.get_backend()
    cfg = tiny_cfg(gpu=ctx.cuda)
    b = packed_row(cfg, ctx.device)
    counts = global_token_counts({"image": [b]}, special_token_ids(cfg))
    t = torch.ones(3, device=comm_device())
    torch.distributed.all_reduce(t)
    out = {
        "backend": backend,
        "cpu_shims_applied": cpu_compat.shims_applied(),
        "comm_device": str(comm_device()),
        "token_count": counts["image"],
    }
    ok = counts["image"] > 0 and float(t.sum()) == 3.0
    if ctx.dry:
        return ctx.gpu_only(dict(out, status="SKIP" if ok else "FAIL"), "gloo collectives")
    ok = ok and backend == "nccl" and not out["cpu_shims_applied"] and t.is_cuda
    return dict(out, status="PASS" if ok else "FAIL")


def _build_llm(cfg, device):
    from megatron_omni.models.llm import build_llm

    return build_llm(cfg).to(device)


def stage_llm_te_vs_local(ctx: Ctx) -> dict:
    ensure_runtime()
    from megatron_omni.models.llm import load_full_llm_state
    from megatron_omni.models.weight_maps.sharding import local_name

    base = ["model.transformer_impl=local"]
    ref_cfg = tiny_cfg(*base, gpu=ctx.cuda, vision=False, audio=False)
    b = packed_row(tiny_cfg(gpu=ctx.cuda), ctx.device, seed=3)
    ref = _build_llm(ref_cfg, ctx.device)
    full = {
        k: v.detach().clone() for k, v in ref.state_dict().items() if not k.endswith("_extra_state")
    }
    ref_loss, ref_grads, _ = llm_loss_and_grads(ref, b)
    out = {"ref_loss_fp32": ref_loss}
    impls = ["local"] + (["transformer_engine"] if ctx.te() else [])
    errs = {}
    for impl in impls:
        cfg = tiny_cfg(
            f"model.transformer_impl={impl}",
            "training.bf16=true",
            gpu=ctx.cuda,
            vision=False,
            audio=False,
        )
        m = _build_llm(cfg, ctx.device)
        load_full_llm_state(m, full)
        loss, grads, _ = llm_loss_and_grads(m, b)
        grads = {local_name(k): g for k, g in grads.items()}
        shared = [k for k in ref_grads if k in grads]
        gerr = max(rel_err(grads[k], ref_grads[k]) for k in shared)
        errs[impl] = (abs(loss - ref_loss) / abs(ref_loss), gerr)
        out[f"{impl}_bf16"] = {
            "loss": loss,
            "loss_rel_err": errs[impl][0],
            "max_grad_rel_err": gerr,
            "params_compared": len(shared),
        }
    local_ok = errs["local"][0] < 2e-2 and errs["local"][1] < 0.15
    if "transformer_engine" not in errs:
        if ctx.dry:
            return ctx.gpu_only(
                dict(out, status="SKIP" if local_ok else "FAIL"), "local bf16 vs fp32 reference"
            )
        return dict(out, status="SKIP", reason="Transformer Engine not importable")
    te_loss, te_grad = errs["transformer_engine"]
    ok = local_ok and te_loss < 2e-2 and te_grad < max(2 * errs["local"][1], 0.05)
    return dict(out, status="PASS" if ok else "FAIL")


def stage_thd_packed(ctx: Ctx) -> dict:
    ensure_runtime()
    torch = ctx.torch
    impl = "transformer_engine" if ctx.te() else "local"
    dtype = ["training.bf16=true"] if impl == "transformer_engine" else []
    cfg = tiny_cfg(
        f"model.transformer_impl={impl}", *dtype, gpu=ctx.cuda, vision=False, audio=False
    )
    m = _build_llm(cfg, ctx.device)
    b = packed_row(tiny_cfg(gpu=ctx.cuda), ctx.device, seed=4)
    _, _, packed = llm_loss_and_grads(m, b)
    cu = b["cu_seqlens"].tolist()
    worst = 0.0
    with torch.no_grad():
        for s, e in zip(cu[:-1], cu[1:]):
            alone = m(
                b["tokens"][:, s:e], b["position_ids"][:, :, s:e], labels=b["labels"][:, s:e]
            ).float()
            worst = max(worst, float((alone - packed[:, s:e]).abs().max()))
    tol = 5e-2 if dtype else 1e-4
    out = {
        "impl": impl,
        "attention_path": "te" if dtype else ("flex" if ctx.cuda else "per-segment SDPA"),
        "samples": len(cu) - 1,
        "max_abs_diff_per_token_loss": worst,
        "tolerance": tol,
    }
    ok = worst < tol
    if ctx.cuda and impl == "local":
        # The compiled flex kernel's gradients vs the exact per-segment path.
        grads = {}
        for path in ("flex", "loop"):
            os.environ["OMNI_THD_ATTENTION"] = path
            grads[path] = llm_loss_and_grads(m, b)[1]
        os.environ.pop("OMNI_THD_ATTENTION", None)
        out["flex_vs_loop_max_grad_rel_err"] = max(
            rel_err(grads["flex"][k], grads["loop"][k]) for k in grads["loop"]
        )
        ok = ok and out["flex_vs_loop_max_grad_rel_err"] < 1e-3
    if ctx.dry:
        return ctx.gpu_only(dict(out, status="SKIP" if ok else "FAIL"), "per-segment path")
    return dict(out, status="PASS" if ok else "FAIL")


def stage_vit_te_vs_local(ctx: Ctx) -> dict:
    ensure_runtime()
    torch = ctx.torch
    from megatron_omni.models.vision import VisionEncoder, vision_transformer_config

    grids = torch.tensor([[1, 4, 4], [2, 4, 6], [1, 8, 4]])
    n = int(grids.prod(-1).sum())

    def build(impl, bf16):
        cfg = tiny_cfg(f"training.bf16={str(bf16).lower()}", gpu=ctx.cuda, audio=False)
        return VisionEncoder(cfg, config=vision_transformer_config(cfg), transformer_impl=impl).to(
            ctx.device
        )

    torch.manual_seed(0)
    ref = build("local", False)
    full = {
        k: v.detach().clone() for k, v in ref.state_dict().items() if not k.endswith("_extra_state")
    }
    patches = torch.randn(n, ref.patch_dim, device=ctx.device)
    with torch.no_grad():
        want = ref(patches, grids)
    out = {"grids": grids.tolist()}
    errs = {}
    for impl in ["local"] + (["transformer_engine"] if ctx.te() else []):
        m = build(impl, True)
        m.load_full_state_dict(full)
        with torch.no_grad():
            errs[impl] = rel_err(m(patches, grids), want)
        out[f"{impl}_bf16_rel_err"] = errs[impl]
    if "transformer_engine" not in errs:
        ok = errs["local"] < 5e-2
        if ctx.dry:
            return ctx.gpu_only(dict(out, status="SKIP" if ok else "FAIL"), "local bf16 ViT")
        return dict(out, status="SKIP", reason="Transformer Engine not importable")
    ok = errs["transformer_engine"] < max(2 * errs["local"], 5e-2)
    return dict(out, status="PASS" if ok else "FAIL")


def _train(ctx: Ctx, *extra, steps=3):
    ensure_runtime()
    torch = ctx.torch
    from megatron.core import tensor_parallel

    from megatron_omni.training.trainer import Trainer

    cfg = tiny_cfg(
        "data.modalities=[audio,image,text]",
        f"training.train_iters={steps}",
        "training.num_micro_batches=2",
        "training.lr=2e-3",
        "training.lr_warmup_iters=0",
        "training.log_interval=1000",
        *extra,
        gpu=ctx.cuda,
    )
    torch.manual_seed(7)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    from megatron_omni.testing.omni_batch import MemoryData

    t = Trainer(cfg, data=MemoryData(cfg, period=4), printer=lambda s: None)
    t.setup()
    s = t.train()
    return s, t


def stage_omni_trainer(ctx: Ctx) -> dict:
    from megatron_omni.parallel.device import off_device

    out = {}
    n = 2 if ctx.dry else 3
    # Plain DDP + the non-distributed bf16 optimizer (which cannot hold the fp32 SAN-M's state,
    # see config validation) vs the distributed optimizer with overlap_grad_reduce; the image
    # and text groups still skip the (trainable) audio projector.
    frozen = "stage.train_audio=false"
    plain, t = _train(ctx, "training.bf16=true", frozen, steps=n)
    out["placed_on_device"] = not off_device(t.chunks[0], ctx.device)
    out["bf16_losses"] = plain.loss_history
    ovl, _ = _train(
        ctx,
        "training.bf16=true",
        "training.use_distributed_optimizer=true",
        "training.overlap_grad_reduce=true",
        frozen,
        steps=n,
    )
    out["distopt_overlap_losses"] = ovl.loss_history
    gap = max(
        abs(a[k] - b[k]) / abs(a[k])
        for a, b in zip(plain.loss_history, ovl.loss_history)
        for k in a
    )
    out["distopt_overlap_max_rel_gap"] = gap
    ok = out["placed_on_device"] and plain.nan_steps == 0 and gap < 2e-2
    if ctx.fp8():
        fp8, _ = _train(
            ctx,
            "training.bf16=true",
            "training.fp8=hybrid",
            "training.use_distributed_optimizer=true",
            "model.transformer_impl=transformer_engine",
            steps=n,
        )
        out["fp8_losses"] = fp8.loss_history
        ok = (
            ok
            and fp8.nan_steps == 0
            and all(math.isfinite(v) for r in fp8.loss_history for v in r.values())
        )
    else:
        out["fp8"] = "SKIP: needs Transformer Engine on an FP8 GPU (sm_89+)"
    # bf16 with the fp32 SAN-M trainable: mixed-dtype parameters, both optimizers.
    # (The non-distributed bf16 optimizer cannot checkpoint fp32 params in megatron-core 0.16.1;
    # config validation refuses that combination.)
    for name, dist in (("resume_distopt", "training.use_distributed_optimizer=true"),):
        with tempfile.TemporaryDirectory(dir=ctx.workdir) as d:
            full, _ = _train(ctx, "training.bf16=true", dist, f"training.save={d}/a", steps=n + 1)
            _train(
                ctx,
                "training.bf16=true",
                dist,
                f"training.save={d}/b",
                "training.exit_interval=2",
                steps=n + 1,
            )
            resumed, _ = _train(
                ctx, "training.bf16=true", dist, f"training.save={d}/b", steps=n + 1
            )
        rgap = max(
            abs(a[k] - b[k]) for a, b in zip(full.loss_history[2:], resumed.loss_history) for k in a
        )
        out[name] = {"steps_after_resume": resumed.steps_done, "max_abs_gap": rgap}
        ok = ok and resumed.steps_done == n - 1 and rgap < 1e-6
    if ctx.dry:
        return ctx.gpu_only(
            dict(out, status="SKIP" if ok else "FAIL"),
            "bf16 trainer, distributed optimizer + overlap, save + resume",
        )
    return dict(out, status="PASS" if ok else "FAIL")


def _lm_data(torch, vocab, seq, steps, device, seed=0):
    """Learnable rows: each sample repeats a random 16-token motif."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(steps):
        motif = torch.randint(0, vocab, (16,), generator=g)
        ids = motif.repeat(seq // 16 + 1)[: seq + 1]
        rows.append((ids[:-1][None].to(device), ids[1:][None].to(device)))
    return rows


FP8_SHAPE = [
    "model.llm.num_layers=12",
    "model.llm.hidden_size=1536",
    "model.llm.ffn_hidden_size=4096",
    "model.llm.num_attention_heads=16",
    "model.llm.num_query_groups=4",
    "model.llm.vocab_size=32000",
    "model.llm.mrope_section=[12,18,18]",  # head dim 96: 48 rotary pairs
]
"""The LLM of the FP8-vs-BF16 stage on a GPU (large enough for FP8 GEMMs to matter)."""


def stage_fp8_vs_bf16(ctx: Ctx) -> dict:
    ensure_runtime()
    torch = ctx.torch
    if ctx.fp8():
        shape, seq, steps, impl = FP8_SHAPE, 2048, 40, "transformer_engine"
    else:
        shape, seq, steps, impl = [], 64, 3, "local"
    curves, params = {}, 0
    for name, extra in (("bf16", []), ("fp8", ["training.fp8=hybrid"])):
        if name == "fp8" and not ctx.fp8():
            continue
        cfg = tiny_cfg(
            f"model.transformer_impl={impl}",
            "training.bf16=true",
            *shape,
            *extra,
            gpu=ctx.cuda,
            vision=False,
            audio=False,
        )
        torch.manual_seed(0)
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(0)
        m = _build_llm(cfg, ctx.device)
        params = sum(p.numel() for p in m.parameters())
        opt = torch.optim.AdamW(m.parameters(), lr=3e-4)
        pos = torch.arange(seq, device=ctx.device)[None]
        losses = []
        from megatron_omni.models.omni import special_token_ids

        for ids, labels in _lm_data(
            torch, special_token_ids(cfg).base_vocab_size, seq, steps, ctx.device
        ):
            opt.zero_grad(set_to_none=True)
            loss = m(ids, pos, labels=labels).float().mean()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        curves[name] = losses
    out = {"params": params, "seq": seq, "steps": steps, "curves": curves}
    if "fp8" not in curves:
        if ctx.dry:
            return ctx.gpu_only(dict(out, status="SKIP"), "bf16 training loop")
        return dict(out, status="SKIP", reason="needs Transformer Engine on an FP8 GPU (sm_89+)")
    tail = 5
    b, f = (sum(c[-tail:]) / tail for c in (curves["bf16"], curves["fp8"]))
    out["final_bf16"], out["final_fp8"], out["final_rel_gap"] = b, f, abs(f - b) / b
    ok = abs(f - b) / b < 0.05 and curves["bf16"][-1] < curves["bf16"][0]
    return dict(out, status="PASS" if ok else "FAIL")


def stage_llm_throughput(ctx: Ctx) -> dict:
    ensure_runtime()
    torch = ctx.torch
    transformers = need("transformers")
    from megatron_omni.config import load_config
    from megatron_omni.models.llm import load_full_llm_state
    from megatron_omni.models.weight_maps.llm import hf_to_megatron, llm_config_from_hf
    from megatron_omni.training.flops import llm_flops, mfu, peak_flops

    if ctx.cuda:
        dims = dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
        )
        seq, iters = 4096, 5
    else:
        dims = dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        seq, iters = 128, 1
    hf_cfg = transformers.LlamaConfig(
        **dims,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    llm = llm_config_from_hf(hf_cfg.to_dict())
    hf_sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    full = hf_to_megatron(hf_sd, llm, dims["vocab_size"])
    hf.to(ctx.device)
    ids = torch.randint(0, dims["vocab_size"], (1, seq), device=ctx.device)
    pos = torch.arange(seq, device=ctx.device)[None]
    gpu = "h200" if ctx.cuda and "H200" in torch.cuda.get_device_name(0) else "h100"

    def timed(step):
        step()
        if ctx.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(iters):
            step()
        if ctx.cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / iters
        peak = torch.cuda.max_memory_allocated() if ctx.cuda else None
        return dt, peak

    flops = llm_flops(llm, [seq], dims["vocab_size"])
    out = {"shape": dims, "seq": seq, "model_flops_per_row": flops}
    variants = [("local_bf16", "local", [])]
    if ctx.te():
        variants.insert(0, ("te_bf16", "transformer_engine", []))
        if ctx.fp8():
            variants.insert(1, ("te_fp8", "transformer_engine", ["training.fp8=hybrid"]))
    for name, impl, extra in variants:
        cfg = load_config(
            None,
            [
                "model.vision.enabled=false",
                "model.audio.enabled=false",
                f"model.transformer_impl={impl}",
                "training.bf16=true",
                *extra,
            ],
        )
        cfg.model.llm = llm
        m = _build_llm(cfg, ctx.device)
        load_full_llm_state(m, full)

        def step(m=m):
            m.zero_grad(set_to_none=True)
            m(ids, pos, labels=ids).float().mean().backward()

        dt, peak = timed(step)
        out[name] = {
            "tokens_per_s": seq / dt,
            "peak_bytes": peak,
            "mfu": mfu(flops, dt, 1, peak_flops(gpu, "fp8" if extra else "bf16")),
        }
        del m
        if ctx.cuda:
            torch.cuda.empty_cache()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(ids).logits
        torch.nn.functional.cross_entropy(logits[0].float(), ids[0]).backward()

    dt, peak = timed(hf_step)
    out["transformers"] = {"tokens_per_s": seq / dt, "peak_bytes": peak}
    base = out["transformers"]["tokens_per_s"]
    out["ratios_vs_transformers"] = {n: out[n]["tokens_per_s"] / base for n, _, _ in variants}
    try:
        from megatron_omni.plan import Layout, Workload, plan

        pcfg = load_config(
            None, ["model.vision.enabled=false", "model.audio.enabled=false", "training.bf16=true"]
        )
        pcfg.model.llm = llm
        p = plan(pcfg, Layout(), Workload(seq_length=seq), gpu=gpu, precision="bf16")
        out["plan_peak_bytes"] = p.peak_bytes
        meas = out[variants[0][0]]["peak_bytes"]
        if meas:
            out["measured_over_plan"] = meas / p.peak_bytes
    except Exception as e:  # the plan is a figure, not the subject
        out["plan_error"] = f"{type(e).__name__}: {e}"
    if ctx.dry:
        return ctx.gpu_only(dict(out, status="SKIP"), "timing code on a tiny LLM")
    if not ctx.te():
        return dict(
            out,
            status="SKIP",
            reason="Transformer Engine not importable (local and transformers measured)",
        )
    return dict(out, status="PASS")


def _media_files(d: Path) -> dict:
    import numpy as np

    files = {}
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    img = np.stack([(xx * 255 // 320), (yy * 255 // 240), ((xx + yy) % 256)], -1).astype("uint8")
    Image.fromarray(img).save(d / "a.jpg", quality=95)
    Image.fromarray(img).save(d / "a.png")
    files["jpeg"], files["png"] = d / "a.jpg", d / "a.png"
    try:
        import soundfile as sf

        wave = (0.3 * np.sin(np.arange(16000 * 2) * 2 * np.pi * 440 / 16000)).astype("float32")
        sf.write(d / "a.wav", wave, 16000)
        sf.write(d / "a.flac", wave, 16000)
        files["wav"], files["flac"] = d / "a.wav", d / "a.flac"
    except Exception:
        pass
    try:
        import av

        with av.open(str(d / "a.mp4"), "w") as c:
            s = c.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=25)
            s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
            for i in range(50):
                frame = np.roll(img, i * 4, axis=1) + rng.integers(0, 2, img.shape, dtype="uint8")
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        files["h264"] = d / "a.mp4"
    except Exception:
        pass
    return files


def stage_dali_decode(ctx: Ctx) -> dict:
    need("nvidia.dali")
    import numpy as np

    from megatron_omni.data.media import CPUBackend, DALIBackend

    cpu = CPUBackend()
    dali = DALIBackend(device="gpu" if ctx.cuda else "cpu")
    out = {"dali": dali.describe()}
    bad = []
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as d:
        files = _media_files(Path(d))
        for kind in ("jpeg", "png", "h264", "wav", "flac"):
            if kind not in files:
                out[kind] = "SKIP: encoder not available here"
                continue
            src = str(files[kind])
            try:
                t = time.perf_counter()
                if kind in ("jpeg", "png"):
                    a = dali.decode_images([src], [None])[0]
                    ta = time.perf_counter() - t
                    t = time.perf_counter()
                    b = cpu.decode_images([src], [None])[0]
                elif kind == "h264":
                    idx = list(range(0, 48, 4))
                    a = dali.decode_videos([src], [idx], [None])[0]
                    ta = time.perf_counter() - t
                    t = time.perf_counter()
                    b = cpu.decode_videos([src], [idx], [None])[0]
                else:
                    a = dali.decode_audios([src])[0]
                    ta = time.perf_counter() - t
                    t = time.perf_counter()
                    b = cpu.decode_audios([src])[0]
                tb = time.perf_counter() - t
                if isinstance(a, Exception) or isinstance(b, Exception):
                    raise a if isinstance(a, Exception) else b
                a, b = (
                    np.asarray(x[0] if isinstance(x, tuple) else x, dtype=np.float64)
                    for x in (a, b)
                )
                diff = float(np.abs(a - b).mean()) if a.shape == b.shape else float("inf")
                tol = {"png": 0.0, "wav": 1e-6, "flac": 1e-6}.get(kind, 3.0)
                out[kind] = {
                    "shape": list(a.shape),
                    "mean_abs_diff": diff,
                    "tolerance": tol,
                    "dali_s": ta,
                    "cpu_s": tb,
                }
                if diff > tol:
                    bad.append(kind)
            except Exception as e:
                out[kind] = f"FAIL: {type(e).__name__}: {str(e)[:200]}"
                bad.append(kind)
    out["loaders"] = _loaders_with_workers(ctx)
    if isinstance(out["loaders"], str) and out["loaders"].startswith("FAIL"):
        bad.append("loaders")
    out["failed"] = bad
    if ctx.dry:
        return ctx.gpu_only(
            dict(out, status="FAIL" if bad else "SKIP"), "DALI CPU operators vs the CPU backend"
        )
    return dict(out, status="FAIL" if bad else "PASS")


def _loaders_with_workers(ctx: Ctx):
    """A real OmniLoaders run (synthetic dataset, 2 workers) after CUDA is initialised in this
    process: workers must decode without touching the GPU."""
    try:
        need("megatron.energon")
        from megatron_omni.config import load_config
        from megatron_omni.data.loaders import OmniLoaders
        from megatron_omni.data.preprocess import preprocess
        from megatron_omni.data.synthetic import corpus_texts, make_synthetic_dataset
        from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer
    except (Skip, ImportError) as e:
        return f"SKIP: {e}"
    if ctx.cuda:
        ctx.torch.ones(1, device="cuda")  # CUDA initialised before the workers fork
    try:
        base = Path(tempfile.mkdtemp(dir=ctx.workdir))
        make_synthetic_dataset(base / "raw", num_per_modality=6, seed=1, num_val_per_modality=2)
        tok = train_tiny_tokenizer(corpus_texts(base / "raw"), 400, base / "tok.json")
        tokenizer = load_tokenizer(tok, speech_codebook_size=64)
        preprocess(base / "raw", base / "prep", tokenizer, workers=1, progress=False)
        cfg = load_config(
            None,
            [
                f"data.path={base / 'prep'}",
                f"data.tokenizer={tok}",
                "data.modalities=[text,image,audio]",
                "data.seq_length=1024",
                "data.num_workers=2",
                "data.media_backend=auto",
                "data.packing_buffer_size=4",
                "data.shuffle_buffer_size=4",
                f"model.llm.vocab_size={tokenizer.vocab_size}",
                "model.speech_codebook_size=64",
            ],
        )
        loaders = OmniLoaders(cfg.data, tokenizer)
        t = time.perf_counter()
        rows = {m: [loaders.next(m) for _ in range(2)] for m in cfg.data.modalities}
        dt = time.perf_counter() - t
        n = sum(int(b["tokens"].numel()) for bs in rows.values() for b in bs)
        out = {
            "rows": sum(map(len, rows.values())),
            "tokens": n,
            "seconds": dt,
            "workers_defer": loaders.defer_decoding,
        }
        out["deferred"] = _deferred_vs_worker(ctx, cfg, tokenizer)
        if isinstance(out["deferred"], str):
            return "FAIL: deferred decode: " + out["deferred"]
        return out
    except Exception as e:
        return f"FAIL: {type(e).__name__}: {str(e)[:300]}"


def _deferred_vs_worker(ctx: Ctx, cfg, tokenizer):
    """Images/videos decoded in this (training) process -- DALI mixed on the GPU with
    ``dali_gpu``; the CPU backend in the dry run -- vs decoded by the CPU backend in the loader
    workers: same rows and grids, pixels within the dali_decode tolerance (mean 3.0 px)."""
    import dataclasses

    from megatron_omni.data.loaders import OmniLoaders
    from megatron_omni.data.media.deferred import make_training_decoder

    name = "dali_gpu" if ctx.cuda else "deferred"
    res = {"media_backend": name}
    for m in ("image", "video", "interleaved"):
        mcfg = dataclasses.replace(cfg.data, modalities=[m])
        ref = OmniLoaders(dataclasses.replace(mcfg, media_backend="cpu"), tokenizer)
        dfr = OmniLoaders(dataclasses.replace(mcfg, media_backend=name), tokenizer)
        dec = make_training_decoder(name, ctx.device)
        res["decoder"] = dec.describe()
        worst, t = 0.0, time.perf_counter()
        for _ in range(2):
            r = ref.next(m)
            dec.submit(dfr.next(m))
            d = dec.get()
            for k in ("tokens", "loss_mask", "vision_grid_thw"):
                if not ctx.torch.equal(r[k], d[k]):
                    return f"{m}: {k} differs"
            for k in ("image_pixel_values", "video_pixel_values", "vision_patches"):
                a, b = r[k], d[k].cpu()
                if a.shape != b.shape:
                    return f"{m}: {k} shape {tuple(b.shape)} != {tuple(a.shape)}"
                if a.numel():
                    worst = max(worst, float((a - b).abs().mean()) * 255 * 0.2758)
        dec.close()
        res[m] = {"mean_px_diff": worst, "seconds": time.perf_counter() - t}
        if worst > 3.0:
            return f"{m}: mean pixel difference {worst:.2f} > 3.0"
    return res


STAGES = {
    "probe": stage_probe,
    "nccl": stage_nccl,
    "llm_te_vs_local": stage_llm_te_vs_local,
    "thd_packed": stage_thd_packed,
    "vit_te_vs_local": stage_vit_te_vs_local,
    "omni_trainer": stage_omni_trainer,
    "fp8_vs_bf16": stage_fp8_vs_bf16,
    "llm_throughput": stage_llm_throughput,
    "dali_decode": stage_dali_decode,
}


def run(stages, dry_run: bool, budget: float, out_path: Path) -> dict:
    import torch

    torch.set_num_threads(min(4, os.cpu_count() or 1)) if dry_run else None
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Ctx(dry_run, budget, workdir)
    report = {
        "stages": {},
        "meta": {
            "dry_run": ctx.dry,
            "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "device": torch.cuda.get_device_name(0) if ctx.cuda else "cpu",
        },
    }
    for name in stages:
        t = time.perf_counter()
        if t - ctx.t0 > budget:
            res = {"status": "SKIP", "reason": f"time budget of {budget:.0f} s spent"}
        else:
            try:
                res = STAGES[name](ctx)
            except Skip as e:
                res = {"status": "SKIP", "reason": str(e)}
            except Exception as e:
                res = {
                    "status": "FAIL",
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-3000:],
                }
        res["seconds"] = round(time.perf_counter() - t, 2)
        report["stages"][name] = res
        print(
            f"  {name:<17} {res['status']:<5} {res['seconds']:7.1f} s  {_summary(res)}", flush=True
        )
    report["meta"]["seconds"] = round(time.perf_counter() - ctx.t0, 1)
    out_path.write_text(json.dumps(report, indent=1, default=str))
    with contextlib.suppress(Exception):
        from megatron_omni.parallel import runtime

        runtime.destroy()
    return report


def _summary(res: dict) -> str:
    if res["status"] == "FAIL":
        return res.get("error", "") or str(res.get("failed", ""))[:100]
    if "reason" in res:
        return res["reason"][:110]
    keys = [k for k in res if k not in ("status", "seconds", "versions", "curves")]
    return ", ".join(f"{k}={res[k]}" for k in keys[:3])[:110]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=WHEELS, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out",
        default=os.environ.get("GPU_CHECK_OUT", "gpu_check_report.json"),
        help="JSON report path (make gpu-check GPU_CHECK_OUT=FILE)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run every stage on the CPU with tiny shapes (the test suite does)",
    )
    p.add_argument(
        "--stages", default=",".join(STAGES), help="comma-separated subset of: " + ",".join(STAGES)
    )
    p.add_argument(
        "--budget",
        type=float,
        default=450.0,
        help="seconds; stages that would start later are SKIP (default 450)",
    )
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; known: {list(STAGES)}")
    print(f"gpu_check ({'dry run, CPU' if args.dry_run else 'GPU'}) -> {args.out}")
    print(f"  {'stage':<17} {'status':<5} {'time':>9}  figures")
    report = run(stages, args.dry_run, args.budget, Path(args.out))
    counts = {
        s: sum(r["status"] == s for r in report["stages"].values())
        for s in ("PASS", "FAIL", "SKIP")
    }
    print(
        f"gpu_check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP "
        f"in {report['meta']['seconds']} s; report {args.out}"
    )
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
