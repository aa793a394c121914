"""Convert checkpoints between Hugging Face / FunASR / the M2-omni release and megatron-omni.

Console script ``omni-convert`` (also ``python tools/convert_checkpoint.py`` or
``python -m megatron_omni.cli.convert_checkpoint``). Subcommands (``... SUBCOMMAND --help`` for all
options):

  import   Hugging Face Llama-3 / Qwen2-VL vision tower / FunASR SAN-M (any combination), or the
           M2-omni release -> a megatron-omni distributed checkpoint at --tp/--pp, ready for
           ``stage.init_from``. Launches TP*PP local gloo processes itself, or runs as one rank
           when started under torchrun.
  export   megatron-omni checkpoint (any TP/PP; LoRA deltas merged) -> the M2-omni release
           layout (--format release) or the LLM alone as a transformers Llama (--format llama).
  verify   logits of our LLM vs transformers' LlamaForCausalLM on random tokens; exit 1 above
           --tolerance. Needs transformers: pip install 'megatron-omni[convert]'.

Examples::

  python tools/convert_checkpoint.py import --llama Meta-Llama-3.1-8B --qwen2vl Qwen2-VL-7B \\
      --funasr paraformer-zh --tp 2 --pp 2 --out ckpt/m2omni_init --config examples/...yaml
  python tools/convert_checkpoint.py export ckpt/run --format release --out m2omni_release
  python tools/convert_checkpoint.py export ckpt/run --format llama --out m2omni_llm
  python tools/convert_checkpoint.py verify ckpt/run --hf m2omni_llm

Exit codes: 0 success, 1 verify above tolerance, 2 refused input (bad/unsafe/truncated
checkpoint, config mismatch, existing output without --force), other: crash.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXIT_REFUSED = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
        epilog="Memory stays bounded: tensors are read slice by slice and written shard by "
               "shard. Only safetensors and torch.load(weights_only=True) files are read. "
               "Outputs are written to a hidden .NAME.partial directory and renamed at the end.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{import,export,verify}")

    imp = sub.add_parser(
        "import", help="Hugging Face / FunASR / release -> megatron-omni checkpoint",
        description="Build a megatron-omni distributed checkpoint (step 0) from Hugging Face "
                    "checkpoints. --llama, --qwen2vl and --funasr combine into one starting "
                    "checkpoint (projectors freshly initialised from --seed); --release imports "
                    "the authors' full M2-omni release. The model config comes from the "
                    "sources' configs; --config and KEY=VALUE overrides supply the rest (they "
                    "must agree with the sources). Train from it with "
                    "stage.init_from=OUT (the model section is in OUT/step_00000000/config.yaml).")
    imp.add_argument("--out", required=True, type=Path, help="output checkpoint root")
    imp.add_argument("--llama", type=Path, help="Llama-3 directory (config.json + safetensors)")
    imp.add_argument("--qwen2vl", type=Path,
                     help="Qwen2-VL directory; its vision tower (visual.* / model.visual.*)")
    imp.add_argument("--funasr", type=Path,
                     help="FunASR Paraformer model.pt/.safetensors, or its directory (then "
                          "config.yaml's encoder_conf gives heads and FSMN shift); encoder.*")
    imp.add_argument("--release", type=Path, help="M2-omni release directory (model_type "
                                                  "bailing2); not combinable with the others")
    imp.add_argument("--config", type=Path, help="run config YAML for the fields the sources do "
                                                 "not determine")
    imp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="config overrides, e.g. model.projector.vision_depth=2")
    imp.add_argument("--tp", type=int, help="tensor-parallel size of the checkpoint (default: "
                                            "the config's, 1)")
    imp.add_argument("--pp", type=int, help="pipeline-parallel size (default: the config's, 1)")
    imp.add_argument("--seed", type=int, default=1234,
                     help="seed of the fresh projectors (and of parts under --init-missing)")
    imp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16",
                                                         "float16"],
                     help="parameter dtype of the checkpoint (auto: the LLM source's; the SAN-M "
                          "encoder always stays float32)")
    imp.add_argument("--no-extend-vocab", dest="extend_vocab", action="store_false",
                     help="the Llama vocabulary already holds the 29 M2-omni special tokens and "
                          "the speech codes (default: append them, rows = mean of the old rows)")
    imp.add_argument("--init-missing", action="store_true",
                     help="allow enabled parts without a source (random initialisation)")
    imp.add_argument("--force", action="store_true", help="replace an existing --out")
    imp.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar")
    imp.add_argument("--master-port", type=int, help="port of the local process group "
                                                     "(default: a free one)")

    exp = sub.add_parser(
        "export", help="megatron-omni checkpoint -> release layout or transformers Llama",
        description="Export a megatron-omni checkpoint saved at any TP/PP, one layer at a time. "
                    "--format release writes the M2-omni layout (config.json model_type "
                    "bailing2 + sharded safetensors + model.safetensors.index.json); --format "
                    "llama writes the LLM alone as a transformers LlamaForCausalLM (exact for "
                    "text: M-RoPE with t=h=w is 1-D RoPE; see the README.md it writes). LoRA "
                    "deltas (*lora_A*/*lora_B*) are merged as W + scale * B @ A.")
    exp.add_argument("checkpoint", type=Path, help="checkpoint root or step_XXXXXXXX directory")
    exp.add_argument("--out", required=True, type=Path, help="output directory")
    exp.add_argument("--format", default="release", choices=["release", "llama"])
    exp.add_argument("--max-shard-size", default="5GB",
                     help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    exp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16",
                                                         "float16"],
                     help="cast every tensor (auto: keep the stored dtypes)")
    exp.add_argument("--lora-scale", type=float,
                     help="LoRA scale alpha/rank (default: from the saved config)")
    exp.add_argument("--force", action="store_true", help="replace an existing --out")
    exp.add_argument("--no-progress", dest="progress", action="store_false")

    ver = sub.add_parser(
        "verify", help="compare our LLM's logits with transformers' LlamaForCausalLM",
        description="Run our megatron LLM (TP=PP=1, fp32, loaded from the checkpoint) and "
                    "transformers' LlamaForCausalLM (--hf, or a temporary LLM export) on the "
                    "same random tokens; print the max and mean absolute logit difference; exit "
                    "1 when the max exceeds --tolerance. Needs memory for both models.")
    ver.add_argument("checkpoint", type=Path, help="checkpoint root or step directory")
    ver.add_argument("--hf", type=Path, help="transformers Llama directory (default: export the "
                                             "checkpoint's LLM to a temporary directory)")
    ver.add_argument("--tolerance", type=float, default=1e-4)
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--seq-len", type=int, default=32)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--lora-scale", type=float)
    return p


# --- import: local launcher ----------------------------------------------------------------------

_SELF = [sys.executable, "-m", "megatron_omni.cli.convert_checkpoint"]
"""How the local ranks start: this module (importable wherever this process imported it: the
environment, PYTHONPATH and working directory are inherited)."""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_local(argv: list[str], world: int, port: int, out: Path) -> int:
    """Run this command (``_SELF``) on ``world`` local ranks (torchrun-style environment). Rank 0
    prints to the console; the others log to files shown if they fail. Any failure stops all
    ranks and removes the partial output."""
    from megatron_omni.convert.checkpoint_io import discard_output

    logdir = Path(tempfile.mkdtemp(prefix="omni_convert_logs_"))
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env.pop("SLURM_PROCID", None)
        if rank == 0:
            procs.append((subprocess.Popen([*_SELF, *argv], env=env), None))
        else:
            log = open(logdir / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen([*_SELF, *argv], env=env,
                                           stdout=log, stderr=subprocess.STDOUT), log))
    failed = None
    try:
        while True:
            codes = [p.poll() for p, _ in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        failed = (-1, 130)
    if failed is not None:
        for p, _ in procs:
            if p.poll() is None:
                p.terminate()
        for p, _ in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    for _, log in procs:
        if log is not None:
            log.close()
    if failed is None:
        return 0
    discard_output(out)
    rank, code = failed
    if rank > 0:
        text = (logdir / f"rank{rank}.log").read_text()[-4000:]
        print(f"--- rank {rank} failed (exit {code}); its log ends with:\n{text}", file=sys.stderr)
    return code if code in (EXIT_REFUSED, 130) else (code or 1)


def _import(args, argv: list[str]) -> int:
    from megatron_omni.convert.importer import ImportRequest, build_plan, run_import_rank

    req = ImportRequest(out=args.out, llama=args.llama, qwen2vl=args.qwen2vl,
                        funasr=args.funasr, release=args.release, config=args.config,
                        overrides=list(args.overrides), tp=args.tp, pp=args.pp, seed=args.seed,
                        dtype=args.dtype, extend_vocab=args.extend_vocab,
                        init_missing=args.init_missing, force=args.force)
    in_job = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not in_job:
        plan = build_plan(req)  # refuse bad input before starting any process
        world = (plan.cfg.parallel.tensor_model_parallel_size *
                 plan.cfg.parallel.pipeline_model_parallel_size)
        plan.close()
        if world > 1:
            par = plan.cfg.parallel
            print(f"import: launching {world} local ranks (TP={par.tensor_model_parallel_size}, "
                  f"PP={par.pipeline_model_parallel_size})", flush=True)
            return _launch_local(argv, world, args.master_port or _free_port(), args.out)
        from megatron_omni.parallel.runtime import DistEnv

        env = DistEnv(0, 1, 0, "127.0.0.1", args.master_port or _free_port(), "single")
    else:
        env = None
    summary = run_import_rank(req, progress=args.progress, env=env)
    if summary:
        print(f"import: wrote {summary['step_dir']} (TP={summary['tp']}, PP={summary['pp']}, "
              f"{summary['dtype']}; rank 0 loaded {summary['loaded']} tensors, "
              f"fresh projector tensors {summary['projector_init']}"
              f"{', random parts: ' + ', '.join(summary['fresh']) if summary['fresh'] else ''})."
              f"\nTrain from it with stage.init_from={summary['out']} and the model section of "
              f"{summary['step_dir']}/config.yaml.", flush=True)
    return 0


def _export(args) -> int:
    import torch

    from megatron_omni.convert.checkpoint_io import parse_size
    from megatron_omni.convert.exporter import export_checkpoint

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    s = export_checkpoint(args.checkpoint, args.out, args.format, force=args.force,
                          max_shard_bytes=parse_size(args.max_shard_size), dtype=dtype,
                          lora_scale=args.lora_scale, progress=args.progress)
    print(f"export: wrote {s['tensors']} tensors ({s['bytes'] / 1e6:.1f} MB) in {s['shards']} "
          f"shard(s) to {s['out']} ({s['format']} layout"
          f"{', %d LoRA deltas merged' % s['lora_merged'] if s['lora_merged'] else ''})",
          flush=True)
    return 0


def _verify(args) -> int:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("error: verify compares with transformers' LlamaForCausalLM, and transformers is "
              "not installed: pip install 'megatron-omni[convert]' (or pip install "
              "transformers)", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    from megatron_omni.convert.exporter import verify

    r = verify(args.checkpoint, args.hf, tolerance=args.tolerance, batch=args.batch,
               seq_len=args.seq_len, seed=args.seed, lora_scale=args.lora_scale)
    verdict = "OK" if r["ok"] else "FAIL"
    print(f"verify: max |logit diff| = {r['max']:.3e}, mean = {r['mean']:.3e} over {r['tokens']} "
          f"tokens (tolerance {r['tolerance']:.1e}): {verdict}", flush=True)
    return 0 if r["ok"] else 1


def _quiet_library_warnings() -> None:
    """Hide megatron-core's start-up notices (no Apex/TE on CPU, deprecations) so the tool's own
    messages stay readable."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _quiet_library_warnings()
    from megatron_omni.parallel.cpu_compat import import_megatron_fast

    import_megatron_fast()
    from megatron_omni.config import ConfigError
    from megatron_omni.models.weight_maps.core import ConversionError

    try:
        if args.command == "import":
            return _import(args, argv)
        if args.command == "export":
            return _export(args)
        return _verify(args)
    except (ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
