"""Plan a training layout: per-GPU memory by pipeline stage, estimated step time, throughput.

Examples:

    # the published Megatron-Core anchor: Llama-3-70B, FP8, 64 H100
    python tools/plan.py --model llama3-70b --tp 4 --pp 8 --vpp 5 --gpus 64 --precision fp8 \\
        --global-batch 128
    # M2-omni 72B with image rows (8 images of 448x448 per packed row) and the breakdown as JSON
    python tools/plan.py --model 72b --tp 8 --pp 4 --images 8 --json
    # the smallest number of H100s that fits, best layouts first
    python tools/plan.py --model 72b --suggest
    # best layouts on exactly 128 GPUs
    python tools/plan.py --model 72b --suggest --gpus 128
    # your own run config with overrides
    python tools/plan.py --config run.yaml parallel.first_stage_num_layers=8 --pp 8

Layout flags that are not given come from the config (parallel.*, training.*, data.*). How the
numbers are computed, and every assumed constant, is documented in megatron_omni/plan/
(package docstring, hardware.py, schedule.py); the FLOP formulas in
megatron_omni/training/flops.py. It is an estimate: real peaks differ by a few
GiB (allocator, kernels' workspaces), so leave headroom.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_omni.config.schema import ConfigError
from megatron_omni.plan import (
    COMPUTE_EFFICIENCY,
    DEFAULT_GLOBAL_BATCH,
    FIXED_OVERHEAD_GIB,
    GPUS,
    PRESETS,
    TP_EXPOSED_FRACTION,
    Layout,
    Workload,
    calibration_table,
    check_recipe,
    format_calibration,
    format_plan,
    format_suggestions,
    image_grid,
    load_model_config,
    plan,
    suggest,
)
from megatron_omni.training.flops import audio_encoder_frames


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{k}: {v[2]}" for k, v in PRESETS.items())
    p = argparse.ArgumentParser(
        prog="plan.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--model", choices=sorted(PRESETS), help=f"model preset ({presets})")
    src.add_argument("--config", metavar="FILE", help="a run config YAML instead of a preset")
    src.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="config overrides, e.g. model.llm.num_layers=40 stage.train_llm=false")

    lay = p.add_argument_group("layout (default: the config's values)")
    lay.add_argument("--tp", type=int, help="tensor-parallel size")
    lay.add_argument("--pp", type=int, help="pipeline-parallel size")
    lay.add_argument("--vpp", type=int, help="virtual pipeline chunks per stage (interleaved 1F1B)")
    lay.add_argument("--cp", type=int, help="context-parallel size")
    lay.add_argument("--dp", type=int, help="data-parallel size (default 1, or from --gpus)")
    lay.add_argument("--gpus", type=int,
                     help="total GPUs (DP = GPUs / (TP*PP*CP)); with --suggest: search this count")
    lay.add_argument("--first-stage-layers", type=int, metavar="N",
                     help="LLM layers on the first stage, which also carries the encoders")
    lay.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                     help="sequence parallelism (default: on when TP > 1)")

    run = p.add_argument_group("batch and numerics")
    run.add_argument("--seq-length", type=int, help="tokens per packed row (default: config)")
    run.add_argument("--micro-batch-size", "--mbs", type=int, help="rows per micro-batch")
    run.add_argument("--global-batch", type=int,
                     help=f"rows per optimizer step, all DP ranks (default about "
                          f"{DEFAULT_GLOBAL_BATCH})")
    run.add_argument("--precision", choices=["bf16", "fp8", "fp32"],
                     help="bf16 (default on GPUs), fp8 (TE GEMMs) or fp32 (CPU mode)")
    run.add_argument("--recompute", choices=["none", "selective", "full"],
                     help="activation recomputation (default: the config's)")
    run.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction,
                     default=None, help="shard optimizer states over DP (default: on for GPUs)")
    run.add_argument("--gpu", choices=sorted(GPUS), default="h100",
                     help="device (default h100 = H100 SXM 80GB); 'cpu' = fp32 host mode")
    run.add_argument("--gpu-memory-gib", type=float, help="override the device memory")
    run.add_argument("--impl", choices=["te", "local"],
                     help="layer implementation profile (default te on GPUs, local on cpu)")
    run.add_argument("--mfu", type=float,
                     help=f"compute efficiency of the layers' math, communication excluded "
                          f"(default {COMPUTE_EFFICIENCY})")
    run.add_argument("--tp-exposed", type=float, metavar="F",
                     help="share of TP collectives not hidden by TE's overlap (default "
                          f"{TP_EXPOSED_FRACTION})")
    run.add_argument("--no-flash-attention", action="store_true",
                     help="count the s^2 attention scores (unfused attention)")

    wl = p.add_argument_group("what a packed row holds (default: text only)")
    wl.add_argument("--samples-per-row", type=int, default=1,
                    help="packed samples per row (attention cost is per sample)")
    wl.add_argument("--images", type=int, default=0, help="images per row")
    wl.add_argument("--image-size", type=_size, default=(448, 448), metavar="HxW",
                    help="image size in pixels (default 448x448 = 256 LLM tokens)")
    wl.add_argument("--videos", type=int, default=0, help="videos per row")
    wl.add_argument("--video-frames", type=int, default=16, help="frames per video (default 16)")
    wl.add_argument("--video-size", type=_size, default=(336, 336), metavar="HxW",
                    help="video frame size (default 336x336)")
    wl.add_argument("--audio-clips", type=int, default=0, help="audio clips per row")
    wl.add_argument("--audio-seconds", type=float, default=30.0, help="seconds per clip")

    out = p.add_argument_group("output")
    out.add_argument("--suggest", action="store_true",
                     help="search TP (1,2,4,8), PP, VPP, first-stage size and recompute; print the "
                          "smallest-GPU-count layouts that fit, fastest first")
    out.add_argument("--top", type=int, default=5, help="layouts --suggest prints (default 5)")
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")
    out.add_argument("--check-recipe", action="store_true",
                     help="with --config and --gpus: plan the recipe over its data mix (rows per "
                          "modality group, encoders on the first stage) and compare it with the "
                          "best layouts found (memory: the heaviest rows under 90%%)")
    out.add_argument("--data", metavar="DIR",
                     help="with --check-recipe: take the mix from a prepared dataset's stored "
                          "per-sample counts (tools/preprocess_data.py output) instead of the "
                          "stated defaults")
    out.add_argument("--calibration", action="store_true",
                     help="print the planner vs every published Megatron-Core H100 row and exit")
    p.epilog = (f"Constants: fixed overhead {FIXED_OVERHEAD_GIB} GiB per GPU, compute efficiency "
                f"{COMPUTE_EFFICIENCY}; see megatron_omni/plan/hardware.py.")
    return p


def _merge_mix(mix):
    out: dict = {}
    for w, label in mix:
        out[label] = out.get(label, 0.0) + w
    return [(w, k) for k, w in out.items()]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.calibration:
        print(format_calibration(calibration_table(args.tp_exposed)))
        return 0
    if (args.model is None) == (args.config is None):
        parser.error("give one of --model or --config")
    try:
        cfg = load_model_config(args.model, args.config, args.overrides)
        on_cpu = args.gpu == "cpu"
        par, tr, data = cfg.parallel, cfg.training, cfg.data
        precision = args.precision or ("fp32" if on_cpu else ("fp8" if tr.fp8 else "bf16"))
        tp = args.tp or par.tensor_model_parallel_size
        pp = args.pp or par.pipeline_model_parallel_size
        cp = args.cp or par.context_parallel_size
        vpp = args.vpp if args.vpp is not None else par.virtual_pipeline_model_parallel_size
        mbs = args.micro_batch_size or data.micro_batch_size
        seq = args.seq_length or data.seq_length
        recompute = args.recompute or tr.recompute_granularity
        dist_opt = args.distributed_optimizer
        if dist_opt is None:
            dist_opt = tr.use_distributed_optimizer or not on_cpu
        sp = args.sequence_parallel
        if sp is None and on_cpu:
            sp = par.sequence_parallel
        first = args.first_stage_layers if args.first_stage_layers is not None \
            else par.first_stage_num_layers

        v = cfg.model.vision
        grids = [image_grid(*args.image_size, 1, v.patch_size, v.spatial_merge_size,
                            v.temporal_patch_size)] * args.images
        grids += [image_grid(*args.video_size, args.video_frames, v.patch_size,
                             v.spatial_merge_size, v.temporal_patch_size)] * args.videos
        frames = [audio_encoder_frames(args.audio_seconds)] * args.audio_clips
        workload = Workload(seq, args.samples_per_row, tuple(grids), tuple(frames))
        name = args.model or Path(args.config).name

        if args.check_recipe:
            if args.gpus is None:
                raise ConfigError("--check-recipe needs --gpus")
            own, best = check_recipe(cfg, args.gpus, args.data, args.top, args.gpu)
            top = max([own] + best, key=lambda p: (p.fits, p.tokens_per_s_per_gpu))
            print(f"{name} on {args.gpus} x {GPUS[args.gpu].name}; row mix: "
                  + ", ".join(f"{lab} {w:.0%}" for w, lab in _merge_mix(own.mix)))
            print(format_plan(own))
            print(f"\nbest layouts over the same mix (the recipe: "
                  f"{own.tokens_per_s_per_gpu / top.tokens_per_s_per_gpu:.1%} of the best):")
            print(format_suggestions(best))
            return 0

        if args.suggest:
            gb = args.global_batch or DEFAULT_GLOBAL_BATCH
            plans = suggest(cfg, workload, args.gpu, precision, mbs, gb, cp, args.gpus, args.top,
                            assumed_mfu=args.mfu, model_name=name,
                            memory_gib=args.gpu_memory_gib)
            if args.json:
                print(json.dumps([p.as_dict() for p in plans], indent=2))
            else:
                print(f"{name} on {GPUS[args.gpu].name}, {precision}, seq {seq}, micro batch "
                      f"{mbs}, global batch {gb}; row: {workload.describe()}")
                print(format_suggestions(plans))
                if plans:
                    print("\nbest layout in detail:\n")
                    print(format_plan(plans[0]))
            return 0 if plans else 1

        if args.gpus is not None:
            if args.gpus % (tp * pp * cp):
                raise ConfigError(f"--gpus {args.gpus} is not a multiple of TP*PP*CP = "
                                  f"{tp * pp * cp}")
            dp = args.gpus // (tp * pp * cp)
            if args.dp is not None and args.dp != dp:
                raise ConfigError(f"--dp {args.dp} disagrees with --gpus {args.gpus}")
        else:
            dp = args.dp or 1
        layout = Layout(tp, pp, vpp, cp, dp, mbs, args.global_batch, sp, first, recompute,
                        dist_opt)
        result = plan(cfg, layout, workload, args.gpu, precision, args.impl, args.mfu,
                      not args.no_flash_attention, name, memory_gib=args.gpu_memory_gib,
                      tp_exposed=args.tp_exposed)
    except ConfigError as e:
        print(f"plan.py: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(format_plan(result))
    if result.fits is False:
        print(f"plan.py: WARNING: this layout does not fit in {result.gpu.name} memory",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
