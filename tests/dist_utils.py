"""Launch multi-process (gloo) test workers and collect their results.

Process start-up dominates multi-process tests on 2 cores, so each worker script runs many
checks in one launch and rank 0 writes a JSON of results that the pytest test asserts on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, world_size: int, args: list[str] = (), timeout: int = 600,
                env_extra: dict | None = None) -> dict:
    """Run ``tests/workers/<script>`` on ``world_size`` ranks; return the JSON result the
    workers wrote (by convention rank 0, or the last rank where losses live)."""
    port = free_port()
    out = Path(tempfile.mkdtemp(prefix="omni_workers_")) / "result.json"
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
        env.pop("SLURM_PROCID", None)
        env.update(env_extra or {})
        log = open(out.parent / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "workers" / script), str(out), *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log))
    failed = []
    for rank, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append((rank, rc))
    if failed:
        logs = "\n".join(
            f"--- rank {r} (rc={rc}) ---\n" + (out.parent / f"rank{r}.log").read_text()[-6000:]
            for r, rc in failed)
        raise AssertionError(f"workers failed: {failed}\n{logs}")
    return json.loads(out.read_text())


def tiny_run_overrides(data: dict, save, modalities: str, *extra, vision: bool = True,
                       buffers: tuple[int, int] = (4, 4)) -> list[str]:
    """Config overrides of a tiny omni training run on a prepared synthetic dataset
    (``data``: ``vocab``, ``prepared``, ``tok``): 2 LLM layers, one-block ViT (or none), 2-block
    SAN-M, 1024-token rows, CPU decoding, a log line every step, checkpoints to ``save``;
    ``extra`` (lr, warm-up, steps, layout, ...) is appended."""
    model = [f"model.llm.vocab_size={data['vocab']}", "model.speech_codebook_size=64",
             "model.llm.num_layers=2", "model.llm.make_vocab_size_divisible_by=64"]
    model += (["model.vision.depth=1", "model.vision.hidden_size=32", "model.vision.num_heads=2"]
              if vision else ["model.vision.enabled=false"])
    model += ["model.audio.hidden_size=32", "model.audio.num_heads=2",
              "model.audio.ffn_hidden_size=64", "model.audio.num_blocks=2"]
    return model + [
        f"data.path={data['prepared']}", f"data.tokenizer={data['tok']}",
        f"data.modalities={modalities}", "data.seq_length=1024", "data.media_backend=cpu",
        f"data.packing_buffer_size={buffers[0]}", f"data.shuffle_buffer_size={buffers[1]}",
        "training.log_interval=1", f"training.save={save}", *extra]


def finish_worker(out_path, results) -> None:
    """Worker side of :func:`run_workers`: rank 0 writes ``results`` as the JSON result, then
    the process groups are torn down."""
    import torch

    from megatron_omni.parallel import runtime

    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    runtime.destroy()
