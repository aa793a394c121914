"""The tiny CPU demo of the whole M2-omni recipe (what ``make demo`` runs).

1. writes the synthetic omni dataset (images, videos, audio, speech answers, image-generation
   prompts, interleaved, text, a held-out split, some broken files) and trains a tiny tokenizer;
2. preprocesses it into Megatron-Energon shards (broken samples skipped and counted);
3. PT-3-like stage on 2 gloo ranks with tensor parallelism (TP=2): step-balance calibration
   (each modality alone until its loss plateaus), then joint training with the step-balance
   weights;
4. IT-3-like stage from the PT-3 checkpoint with dynamic adaptive balance;
5. AT alignment stage from the IT-3 checkpoint: LoRA adapters only (about 5% of the LLM), DPO on
   preference pairs of every modality (the right colour / direction / pitch / image / sum vs a
   wrong one) + 0.3 x SFT on the instruction groups, mixed 1 : 1; reward accuracy and margin on
   held-out pairs before and after;
6. prints a summary: per-modality loss at the start and end of each stage, the balance weights,
   where the checkpoints, TensorBoard logs and loss plots (``omni-plot``:
   ``<out>/runs/<stage>/losses.png``) are. Exits non-zero if a modality's loss did not fall in
   PT-3 / IT-3, or if the held-out reward margin did not rise in AT;
7. scores the held-out split with ``omni-generate --eval`` for the IT-3 and the AT checkpoints
   and prints their answers side by side.

Running it again reuses the data and resumes each stage from its newest checkpoint (a finished
stage is reported, not retrained); ``--fresh`` deletes earlier runs first.

    python tools/demo.py [--out demo_out] [--fresh] [--pt3-steps 100] [--it3-steps 80]
                         [--at-steps 30]

(``omni-demo`` / ``python -m megatron_omni.cli.demo`` are the same.) It needs a checkout of the
repository (the stage recipes of examples/stages/tiny): run it from the repository root, or
from anywhere with an editable install (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _repo() -> Path:
    """The repository checkout: the one this package lives in (editable install, PYTHONPATH,
    ``python -m`` from the root), else the working directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "examples" / "stages" / "tiny").is_dir() else Path.cwd()


REPO = _repo()
SPEECH_CODES = 64  # the synthetic speech answers use codes 0..63 (model.speech_codebook_size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "demo_out"), help="output folder (demo_out)")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs (data is kept)")
    p.add_argument("--nproc", type=int, default=2, help="local ranks (default 2)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--samples", type=int, default=48, help="synthetic samples per modality")
    p.add_argument("--pt3-steps", type=int, default=100, help="PT-3 optimizer steps")
    p.add_argument("--it3-steps", type=int, default=80, help="IT-3 optimizer steps")
    p.add_argument("--at-steps", type=int, default=30, help="AT (DPO + LoRA) optimizer steps")
    return p.parse_args(argv)


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)




def prepare_data(out: Path, samples: int) -> tuple[Path, Path]:
    """Synthetic raw data -> tokenizer -> Energon shards (skipped when already complete)."""
    from megatron_omni.data.preprocess import preprocess
    from megatron_omni.data.synthetic import corpus_texts, make_synthetic_dataset
    from megatron_omni.data.tokenizer import train_tiny_tokenizer

    raw, prepared, tok = out / "raw", out / "prepared", out / "tokenizer.json"
    report_file = prepared / "preprocess_report.json"
    if report_file.exists() and tok.exists() and (prepared / "preference").is_dir():
        say(f"reusing prepared data in {prepared}")
        return prepared, tok
    shutil.rmtree(prepared, ignore_errors=True)
    t = time.time()
    make_synthetic_dataset(raw, num_per_modality=samples, seed=0, broken=True,
                           num_val_per_modality=8, preference=True)
    train_tiny_tokenizer(corpus_texts(raw), 400, tok)
    say(f"synthetic dataset + tokenizer in {time.time() - t:.1f}s -> {raw}")
    t = time.time()
    from megatron_omni.data.tokenizer import load_tokenizer

    report = preprocess(raw, prepared, load_tokenizer(tok, speech_codebook_size=SPEECH_CODES),
                        workers=2, progress=False)
    skipped = {k: v for k, v in report.skipped.items() if v}
    say(f"preprocessed in {time.time() - t:.1f}s: {report.written} samples written, "
        f"skipped {skipped}")
    return prepared, tok


def launch(args, config: Path, overrides: list[str], extra: list[str] = ()) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           "--master-port", str(_free_port()), "-m", "megatron_omni.train",
           "--config", str(config), *extra, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    return subprocess.call(cmd, cwd=REPO, env=env)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    runs = out / "runs"
    if args.fresh:
        shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prepared, tok = prepare_data(out, args.samples)
    from megatron_omni.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(tok, speech_codebook_size=SPEECH_CODES).vocab_size
    common = [f"data.path={prepared}", f"data.tokenizer={tok}", f"model.llm.vocab_size={vocab}",
              f"parallel.tensor_model_parallel_size={args.tp}",
              f"parallel.pipeline_model_parallel_size={args.pp}"]
    stages = REPO / "examples" / "stages" / "tiny"
    if not stages.is_dir():
        say(f"error: {stages} not found: run the demo from the repository root")
        return 2
    balance_file = runs / "step_balance.json"
    pt3 = common + [f"training.save={runs / 'pt3'}", f"training.train_iters={args.pt3_steps}",
                    f"stage.step_balance_file={balance_file}"]
    if not balance_file.exists():
        say("PT-3 step-balance calibration: each modality alone until its loss plateaus")
        if launch(args, stages / "pt3.yaml", pt3 + ["stage.balance=none"],
                  ["--calibrate-step-balance", str(balance_file)]):
            return 1
    say(f"PT-3 joint training with step balance "
        f"{json.loads(balance_file.read_text())['weights']}")
    if launch(args, stages / "pt3.yaml", pt3):
        return 1
    it3 = common + [f"training.save={runs / 'it3'}", f"training.train_iters={args.it3_steps}",
                    f"stage.init_from={runs / 'pt3'}"]
    say("IT-3 omni instruction stage with dynamic adaptive balance (from the PT-3 checkpoint)")
    if launch(args, stages / "it3.yaml", it3):
        return 1
    at = common + [f"training.save={runs / 'at'}", f"training.train_iters={args.at_steps}",
                   f"stage.init_from={runs / 'it3'}"]
    say("AT alignment: LoRA adapters only, DPO on preference pairs + 0.3 x SFT (from IT-3)")
    if launch(args, stages / "at.yaml", at):
        return 1
    rc = summarize(runs, time.time() - t0)
    say("what the tiny model learned: held-out split, teacher-forced loss and greedy answers, "
        "IT-3 next to AT")
    compare_answers(runs)
    return rc


def compare_answers(runs: Path, samples: int = 4) -> None:
    """``omni-generate --eval`` of the IT-3 and AT checkpoints, printed side by side."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    res = {}
    for stage in ("it3", "at"):
        out = runs / f"eval_{stage}.json"
        subprocess.call([sys.executable, "-m", "megatron_omni.cli.generate", "--checkpoint",
                         str(runs / stage), "--eval", "--eval-samples", str(samples), "--json",
                         str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        res[stage] = json.loads(out.read_text())["eval"] if out.exists() else {}
    say(f"{'modality':<12} {'IT-3 loss':>9} {'AT loss':>8} {'IT-3 acc':>9} {'AT acc':>7}")
    for m, r in res.get("it3", {}).items():
        a = res.get("at", {}).get(m, {})

        def f(x, w):
            return f"{x:{w}.3f}" if isinstance(x, (int, float)) else f"{'n/a':>{w}}"

        say(f"{m:<12} {f(r.get('loss'), 9)} {f(a.get('loss'), 8)} {f(r.get('accuracy'), 9)} "
            f"{f(a.get('accuracy'), 7)}")
        for ex_it, ex_at in zip(r.get("examples", []), a.get("examples", [])):
            say(f"   {ex_it['key']}: reference {ex_it['reference']!r}  IT-3 "
                f"{ex_it['answer']!r}  AT {ex_at['answer']!r}")


def plot_stage(run: Path) -> str:
    """``omni-plot`` of one stage: ``<run>/losses.png`` (its path, or why there is none)."""
    from megatron_omni.cli.plot import plot_run

    try:
        return str(plot_run(run))
    except (ImportError, OSError, ValueError) as e:
        return f"not drawn ({type(e).__name__}: {e})"


def summarize(runs: Path, seconds: float) -> int:
    ok = True
    say("=" * 78)
    say(f"summary ({seconds / 60:.1f} min)")
    for stage in ("pt3", "it3", "at"):
        f = runs / stage / "summary.json"
        if not f.exists():
            say(f"{stage}: no summary found")
            ok = False
            continue
        s = json.loads(f.read_text())
        say(f"{stage}: steps {s['first_step']}..{s['last_step']}  checkpoint {s['checkpoint']}")
        say(f"{stage}: tensorboard --logdir {s['tensorboard']}")
        say(f"{stage}: loss plot {plot_stage(runs / stage)}")
        for m in sorted(s["start_losses"]):
            a, b = s["start_losses"][m], s["end_losses"].get(m, float("nan"))
            fell = b < a
            if stage != "at":  # AT: the SFT term is 0.3 x and only LoRA trains; judged below
                ok &= fell or not s["trained_here"]
            say(f"   {m:<12} loss {a:7.4f} -> {b:7.4f}  {'fell' if fell else 'DID NOT FALL'}")
        say("   balance weights: " + ", ".join(f"{k} {v:.3f}" for k, v in s["weights"].items()))
        ev = s.get("preference_eval") or {}
        if stage == "at" and ev.get("start") and ev.get("end"):
            st, en = ev["start"], ev["end"]
            rose = en["dpo/reward_margin"] > st["dpo/reward_margin"]
            ok &= rose or not s["trained_here"]
            say(f"   held-out pairs: reward accuracy {st['dpo/accuracy']:.3f} -> "
                f"{en['dpo/accuracy']:.3f}, reward margin {st['dpo/reward_margin']:+.4f} -> "
                f"{en['dpo/reward_margin']:+.4f} ({'rose' if rose else 'DID NOT RISE'}), "
                f"DPO loss {st['dpo/loss']:.4f} -> {en['dpo/loss']:.4f}")
    if not ok:
        say("a modality's loss did not fall (PT-3 / IT-3) or the AT reward margin did not rise")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
