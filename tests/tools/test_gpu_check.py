"""omni-gpu-check (megatron_omni/cli/gpu_check.py): the CPU dry run exercises every stage; on a
CPU nothing is PASS but the version probe, nothing FAILs, and the report has the documented shape.

Both runs go the way ``make gpu-check`` goes on a GPU node where the package is not installed:
``python -m megatron_omni.cli.gpu_check`` from the repository root, without PYTHONPATH."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_omni.cli import gpu_check

REPO = Path(__file__).resolve().parents[2]
GPU_CHECK = [sys.executable, "-m", "megatron_omni.cli.gpu_check"]
UNINSTALLED = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.slow
def test_dry_run_exercises_every_stage(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([*GPU_CHECK, "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=REPO, env=UNINSTALLED)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    assert report["meta"]["dry_run"] is True
    assert all(s["status"] in ("PASS", "FAIL", "SKIP") for s in stages.values())
    assert [n for n, s in stages.items() if s["status"] == "FAIL"] == []
    # On the CPU only the version probe may pass; everything else is SKIP, never PASS.
    assert [n for n, s in stages.items() if s["status"] == "PASS"] == ["probe"]
    exercised = {n for n, s in stages.items() if s.get("exercised")}
    assert exercised == set(gpu_check.STAGES) - {"probe"}
    assert "pins_match" in stages["probe"] and stages["probe"]["versions"]["torch"]
    t = stages["omni_trainer"]
    assert t["placed_on_device"] and t["resume_distopt"]["max_abs_gap"] < 1e-6
    assert stages["dali_decode"]["png"]["mean_abs_diff"] == 0.0
    assert isinstance(stages["dali_decode"]["loaders"], dict)
    for line in ("probe", "omni_trainer", "gpu_check:"):
        assert line in proc.stdout


def test_pins_and_help():
    assert gpu_check.pin_ok("0.16.1", gpu_check.PINS["megatron-core"])
    assert not gpu_check.pin_ok("0.17.0", gpu_check.PINS["megatron-core"])
    te = gpu_check.PINS["transformer-engine"]
    assert gpu_check.pin_ok("2.9.0+abc", te) and gpu_check.pin_ok("2.11.1", te)
    assert not gpu_check.pin_ok("2.12.0", te) and not gpu_check.pin_ok("2.20.0", te)
    assert not gpu_check.pin_ok(None, te)
    proc = subprocess.run([*GPU_CHECK, "--help"], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env=UNINSTALLED)
    assert proc.returncode == 0 and "megatron-core==0.16.1" in proc.stdout
    assert "nvidia-dali" in proc.stdout and "GPU_CHECK_OUT" in proc.stdout
    makefile = (REPO / "Makefile").read_text()
    assert "-m megatron_omni.cli.gpu_check" in makefile
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert gpu_check.BASE_IMAGE in dockerfile


@pytest.mark.parametrize("vision,audio", [(True, True), (False, False)])
def test_gpu_sized_config_is_valid(vision, audio):
    """The GPU run's wider LLM (head dim 64) must pass config validation on any machine; the
    dry run above only builds the CPU-sized one."""
    cfg = gpu_check.tiny_cfg(gpu=True, vision=vision, audio=audio)
    llm = cfg.model.llm
    assert llm.hidden_size == 256 and 2 * sum(llm.mrope_section) == llm.hidden_size // 4
    # The FP8 stage's shape (its bf16 leg; fp8 itself needs Transformer Engine to validate).
    big = gpu_check.tiny_cfg("training.bf16=true", *gpu_check.FP8_SHAPE, gpu=True,
                             vision=False, audio=False)
    assert big.model.llm.hidden_size == 1536
