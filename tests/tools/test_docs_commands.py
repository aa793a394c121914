"""Every shell command in README.md and docs/*.md works when pasted after ``make demo``.

The test builds a small ``demo_out`` the way ``omni-demo`` does (its data preparation, then a
PT-3 run of 1 step instead of calibration + 100 steps), in a scratch directory laid out like the
repository root (``examples``/``tools`` linked), and runs each command from the ``bash`` blocks
there, in document order, as written except:

* ``python`` / ``torchrun`` are this interpreter (``-m torch.distributed.run``);
* a training command (``-m megatron_omni.train`` without ``--help``) gets
  ``training.train_iters=1 training.lr_warmup_iters=0`` appended: one step, not the recipe's 50;
* ``ckpt/run`` (the docs' name for "a training run") is a link to the run the README's training
  command just wrote (``demo_out/runs/it3``).

Not run, and listed so that a new command is never skipped silently: ``make demo`` (what this
test reproduces in small) and ``make test`` (the suite itself), and commands that need weights
downloaded from a hub (``--llama``/``--qwen2vl``/``--funasr``/``--release`` sources, ``...``
placeholders) or a public dataset (``omni-convert-data`` and the commands that read its
output), and ``make gpu-check`` (it needs a GPU node; its CPU dry run is
``tests/tools/test_gpu_check.py``).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

NOT_RUN = {
    "make demo": "reproduced in small by this test",
    "make test": "the test suite itself",
}
NEEDS_GPU = re.compile(r"^make gpu-check\b")
NEEDS_DOWNLOADS = re.compile(r"--(llama|qwen2vl|funasr|release)\b|\.\.\.")


def doc_commands() -> list[tuple[str, str]]:
    """(file, command) of every bash block line, continuations joined, comments dropped."""
    out = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                cmd = re.sub(r"\s+#.*$", "", line).strip()
                if cmd and not cmd.startswith("#"):
                    out.append((doc.name, cmd))
        # Indented (4-space) command lines outside fenced blocks.
        outside = re.sub(r"```.*?```", "", text, flags=re.S)
        outside = re.sub(r"\\\n\s+", " ", outside)
        for m in re.finditer(r"^    ((?:python|torchrun|omni-convert-data|make)\b.*)$", outside,
                             flags=re.M):
            out.append((doc.name, re.sub(r"\s+#.*$", "", m.group(1)).strip()))
    return out


EXTERNAL_DATA = re.compile(r"^omni-convert-data\b")


def classify(cmds: list[tuple[str, str]]) -> list[str]:
    """Per command: "run", "not_run" (NOT_RUN), "gpu" (needs a GPU node), "downloads" (weights
    from a hub, a public dataset to convert, or the output of such a command)."""
    kinds, external = [], set()
    for _, cmd in cmds:
        argv = shlex.split(cmd)
        uses_external = any(a in external or any(a.startswith(e + "/") for e in external)
                            for a in argv)
        if cmd in NOT_RUN:
            kinds.append("not_run")
        elif NEEDS_GPU.search(cmd):
            kinds.append("gpu")
        elif NEEDS_DOWNLOADS.search(cmd) or EXTERNAL_DATA.search(cmd) or uses_external:
            kinds.append("downloads")
            if "--out" in argv:
                external.add(argv[argv.index("--out") + 1])
        else:
            kinds.append("run")
    return kinds


def _argv(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    if argv[0] == "python":
        argv[0:1] = [sys.executable]
    elif argv[0] == "torchrun":
        argv[0:1] = [sys.executable, "-m", "torch.distributed.run"]
    if "megatron_omni.train" in argv and "--help" not in argv:
        argv += ["training.train_iters=1", "training.lr_warmup_iters=0"]  # one step
    return argv


def test_readme_and_docs_commands_work_after_demo(tmp_path):
    from megatron_omni.cli.demo import SPEECH_CODES, prepare_data
    from megatron_omni.data.tokenizer import load_tokenizer

    work = tmp_path / "repo"
    work.mkdir()
    for name in ("examples", "tools", "megatron_omni"):
        (work / name).symlink_to(REPO / name)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        prepared, tok = prepare_data(Path("demo_out"), samples=8)
    finally:
        os.chdir(cwd)
    assert load_tokenizer(work / tok, speech_codebook_size=SPEECH_CODES).vocab_size == 499
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1",
               PYTHONPATH=str(REPO))

    def run(argv, what):
        r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n" \
                                  f"{r.stderr[-3000:]}"
        return r

    # The PT-3 checkpoint the IT-3 recipe starts from (demo: calibration + 100 steps).
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "-m", "megatron_omni.train", "--config", "examples/stages/tiny/pt3.yaml",
         "stage.balance=none", "training.train_iters=1", "training.lr_warmup_iters=0"],
        "PT-3 (1 step)")
    (work / "ckpt").mkdir()
    (work / "ckpt" / "run").symlink_to(work / "demo_out" / "runs" / "it3")

    ran, skipped = [], []
    cmds = doc_commands()
    for (doc, cmd), kind in zip(cmds, classify(cmds)):
        if kind != "run":
            skipped.append((doc, cmd, kind))
            continue
        run(_argv(cmd), f"{doc}: {cmd}")
        ran.append(cmd)
    assert any("megatron_omni.train --config examples/stages/tiny/it3.yaml" in c for c in ran)
    assert (work / "demo_out" / "runs" / "it3" / "step_00000001" / "complete.json").is_file()
    assert any(" export " in c for c in ran) and any(" verify " in c for c in ran)
    assert {c for _, c, k in skipped if k == "not_run"} == set(NOT_RUN)
