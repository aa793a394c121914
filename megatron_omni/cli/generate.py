"""Generate with an M2-omni checkpoint, or score its held-out data (--eval).

Loads a megatron-omni checkpoint saved at ANY TP/PP layout and runs it at tensor parallelism N
(N = number of launched processes) and pipeline parallelism 1: the checkpoint is resharded to
that layout on load. Pipeline-parallel generation is not supported. Runs on CPU (gloo) or GPU
(NCCL). The run config (model sizes, tokenizer path, data path) comes from the checkpoint.

Generation: the user text plus image / video / audio files are put in the training chat template
(system prompt, user turn with the media placeholders, assistant header), the encoders run once on
the prompt, then tokens are decoded greedily (default) or sampled (--temperature > 0, with
--top-k / --top-p, seeded by --seed), with a KV cache (megatron-core StaticInferenceContext;
--no-cache recomputes the full sequence every step). Decoding stops at <|eot_id|> / end of text or
--max-new-tokens. Printed: the answer text, every <gen_image> caption (an image-generation prompt)
and every <gen_audio> span as a list of speech codes.

--eval: per modality of a prepared dataset's held-out "val" split, the teacher-forced mean token
loss on the trained (assistant) tokens and the exact-match accuracy of greedy answers against the
reference answers.

Examples:
  python tools/generate.py --checkpoint demo_out/runs/it3 --prompt "What shape is this?" \\
      --image demo_out/raw/images/000001.png
  python tools/generate.py --checkpoint demo_out/runs/it3 --audio demo_out/raw/audios/000002.wav \\
      --prompt "Describe the sound." --temperature 0.8 --top-p 0.9 --seed 7
  torchrun --nproc-per-node 2 tools/generate.py --checkpoint demo_out/runs/it3 --prompt "Hi"
  python tools/generate.py --checkpoint demo_out/runs/it3 --eval --eval-samples 8

(``omni-generate`` and ``python -m megatron_omni.cli.generate`` are the same command.) Exit codes:
0 done; 2 refused input (a config error, a missing or incomplete checkpoint, a missing or
undecodable media file, bad options), printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
"""Exit code for input the tool refuses (config, checkpoint, tokenizer, media, options)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="omni-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="checkpoint root (its newest complete step) or a step_XXXXXXXX folder")
    g.add_argument("--config", default=None,
                   help="training config YAML, only for a checkpoint saved without its config")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer file (default: data.tokenizer of the saved config)")
    g.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (default and only allowed value: the number of "
                        "launched processes)")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.transformer_impl=local (repeatable)")

    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", default="", help="user text; may place media with <image>, "
                   "<video>, <audio> (else the media come first)")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    g.add_argument("--audio", action="append", default=[], help="audio file (repeatable)")
    g.add_argument("--system-prompt", default=None,
                   help="system prompt (default: the one the data were prepared with; '' = none)")
    g.add_argument("--data", default=None,
                   help="prepared dataset whose image/video/template settings to use (default: "
                        "data.path of the saved config when it exists); with --eval, the data")
    g.add_argument("--media-backend", default="cpu", choices=("cpu", "auto", "dali"),
                   help="media decoding backend (default cpu)")

    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most generated tokens (64)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k best (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = all)")
    g.add_argument("--seed", type=int, default=1234, help="sampling seed (1234)")
    g.add_argument("--no-cache", action="store_true",
                   help="no KV cache: recompute the whole sequence at every step")
    g.add_argument("--json", default=None, help="also write the result as JSON to this file")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true",
                   help="score the held-out val split per modality instead of generating")
    g.add_argument("--modalities", default=None,
                   help="comma-separated modalities to score (default: all prepared)")
    g.add_argument("--eval-samples", type=int, default=None,
                   help="samples per modality (default: the whole val split)")
    return p.parse_args(argv)


def _init_distributed(tp: int | None):
    """torch.distributed + megatron-core groups at (TP, PP=1); reuses an initialised state."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_omni.config.schema import ConfigError, ParallelConfig
    from megatron_omni.parallel import runtime

    if torch.distributed.is_initialized() and ps.model_parallel_is_initialized():
        world = torch.distributed.get_world_size()
        have = ps.get_tensor_model_parallel_world_size()
        if (tp or world) != have or ps.get_pipeline_model_parallel_world_size() != 1:
            raise ConfigError(f"already initialised at TP={have}, "
                              f"PP={ps.get_pipeline_model_parallel_world_size()}")
        return have
    env = runtime.dist_env_from_environ()
    if env.launcher == "single":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = runtime.DistEnv(0, 1, 0, "127.0.0.1", port, "single")
    tp = tp or env.world_size
    if tp != env.world_size:
        raise ConfigError(f"--tp {tp} but {env.world_size} processes were launched; generation "
                          f"runs one model at TP = the number of processes (launch "
                          f"torchrun --nproc-per-node {tp})")
    runtime.initialize(ParallelConfig(tensor_model_parallel_size=tp), env=env)
    return tp


def check_inputs(args) -> None:
    """Refuse, before any process group or model is built, input that cannot work: a missing
    checkpoint / config / tokenizer / data folder / media file, bad sampling options."""
    from megatron_omni.config.schema import ConfigError
    from megatron_omni.inference.generate import SamplingParams

    if not Path(args.checkpoint).exists():
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such checkpoint directory")
    for flag in ("config", "tokenizer"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"--{flag} {value}: no such file")
    if args.data is not None and not Path(args.data).is_dir():
        raise ConfigError(f"--data {args.data}: no such prepared dataset directory")
    for kind in ("image", "video", "audio"):
        for f in getattr(args, kind):
            if not Path(f).is_file():
                raise ConfigError(f"--{kind} {f}: no such file")
    try:
        SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"bad sampling option: {e}") from None


def main(argv=None) -> int:
    """The command line: :func:`run`, with exit code 2 and a one-line message for refused
    input (see the module docstring)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    args = parse_args(argv)
    from megatron_omni.parallel.cpu_compat import import_megatron_fast

    import_megatron_fast()  # before anything imports megatron-core (CPU: no torch.compile)
    from megatron_omni.config.schema import ConfigError
    from megatron_omni.data.media import MediaError
    from megatron_omni.data.tokenizer import TokenizerError

    try:
        check_inputs(args)
    except ConfigError as e:
        print(f"omni-generate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from megatron_omni.parallel import runtime
    from megatron_omni.training.checkpoint import CheckpointError

    try:
        run(args)
    except (ConfigError, CheckpointError, MediaError, TokenizerError, FileNotFoundError) as e:
        print(f"omni-generate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        runtime.destroy()
    return 0


def run(argv=None, printer=print) -> dict:
    """Generate (or ``--eval``) as the command line does; returns what ``--json`` writes.
    ``argv``: the command-line arguments, or the namespace of :func:`parse_args`. Errors
    propagate (:func:`main` turns refused input into exit code 2)."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    import torch

    from megatron_omni.parallel.cpu_compat import import_megatron_fast

    import_megatron_fast()
    from megatron_omni.config.schema import ConfigError
    from megatron_omni.data.media import MediaProcessor, select_backend
    from megatron_omni.data.templates import TemplateConfig
    from megatron_omni.data.tokenizer import load_tokenizer
    from megatron_omni.inference import generate as G

    tp = _init_distributed(args.tp)
    rank0 = torch.distributed.get_rank() == 0
    say = printer if rank0 else (lambda *a, **k: None)
    cfg = G.generation_config(args.checkpoint, tp, args.override, config=args.config)
    tok_path = args.tokenizer or cfg.data.tokenizer
    if not tok_path:
        raise ConfigError("no tokenizer: pass --tokenizer (the saved config has no "
                          "data.tokenizer)")
    tok = load_tokenizer(tok_path, speech_codebook_size=cfg.model.speech_codebook_size)
    if tok.vocab_size != cfg.model.llm.vocab_size:
        raise ConfigError(f"tokenizer {tok_path} has {tok.vocab_size} ids (with special tokens "
                          f"and speech codes) but the model {cfg.model.llm.vocab_size}")
    model = G.load_generation_model(args.checkpoint, cfg)
    say(f"loaded {args.checkpoint} at TP={tp}, PP=1 on "
        f"{'GPU' if torch.cuda.is_available() else 'CPU'}")

    data = args.data or cfg.data.path
    if args.eval:
        if not data or not Path(data).is_dir():
            raise ConfigError(f"--eval needs a prepared dataset: --data (got {data!r})")
        import dataclasses

        dcfg = dataclasses.replace(cfg.data, path=str(data), media_backend=args.media_backend)
        mods = args.modalities.split(",") if args.modalities else None
        results = G.evaluate(model, tok, dcfg, modalities=mods, max_samples=args.eval_samples,
                             max_new_tokens=args.max_new_tokens)
        say(G.format_eval(results))
        for r in results.values():
            for ex in r.examples:
                say(f"  {r.modality} {ex['key']}: reference {ex['reference']!r} -> "
                    f"answer {ex['answer']!r}")
        out = {"eval": {m: r.as_dict() for m, r in results.items()}}
    else:
        image_s = video_s = None
        template = TemplateConfig()
        if data and Path(data).is_dir():
            try:
                image_s, video_s, template = G.media_settings_from_prepared(data)
            except FileNotFoundError:
                pass
        if args.system_prompt is not None:
            template = TemplateConfig(system_prompt=args.system_prompt,
                                      audio_tokens_per_clip=template.audio_tokens_per_clip)
        kw = {k: v for k, v in (("image", image_s), ("video", video_s)) if v is not None}
        processor = MediaProcessor(select_backend(args.media_backend),
                                   audio_tokens=cfg.model.audio.tokens_per_clip, **kw)
        prompt = G.build_chat_prompt(tok, args.prompt, images=args.image, videos=args.video,
                                     audios=args.audio, processor=processor, template=template,
                                     spatial_merge_size=cfg.model.vision.spatial_merge_size)
        params = G.SamplingParams(max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed)
        gen = G.OmniGenerator.for_tokenizer(model, tok, use_cache=not args.no_cache)
        res = gen.generate(prompt, params)
        ans = G.parse_answer(res.answer_ids, tok)
        say(f"prompt: {len(prompt)} tokens ({len(args.image)} image(s), {len(args.video)} "
            f"video(s), {len(args.audio)} audio clip(s)); "
            f"{'greedy' if params.greedy else 'sampled'}, "
            f"{'KV cache' if not args.no_cache else 'no cache'}")
        say(f"answer ({len(res.token_ids)} tokens, stop: {res.stop_reason}):")
        say(ans.text)
        for c in ans.gen_image_captions:
            say(f"gen_image caption: {c}")
        for codes in ans.speech_codes:
            say(f"gen_audio speech codes ({len(codes)}): {codes}")
        if ans.unclosed:
            say(f"(unclosed at the end: {', '.join(ans.unclosed)})")
        out = {"prompt_tokens": len(prompt), "token_ids": res.token_ids,
               "stop_reason": res.stop_reason, "text": ans.text,
               "gen_image_captions": ans.gen_image_captions,
               "speech_codes": ans.speech_codes, "unclosed": ans.unclosed}
    if args.json and rank0:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
