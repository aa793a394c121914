"""Entry point: ``python -m megatron_omni.train --config FILE [key.sub=value ...]``.

Launched once per process by torchrun or srun (it reads their environment). Parses and
validates the config (before any process group starts), builds everything, trains one stage.

    torchrun --nproc-per-node 2 -m megatron_omni.train --config examples/stages/tiny/pt3.yaml
    python -m megatron_omni.train --config ... --calibrate-step-balance weights.json
    python -m megatron_omni.train --config ... --print-config      # validate and show, no run

Process log: Python logging, one line per record with time, rank and level (rank 0 at
``--log-level``, INFO by default; the other ranks at ``--other-ranks-log-level``, WARNING), e.g.
``2026-12-03 14:02:11 [rank 0] INFO megatron_omni.training.checkpoint: saved checkpoint ...``.
Every field of the config: ``python -m megatron_omni.config --explain``.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m megatron_omni.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. parallel.tensor_model_parallel_size=2")
    p.add_argument("--calibrate-step-balance", metavar="OUT.json",
                   help="train each modality alone until its loss plateaus and write the step "
                        "balance weights there (PT-3 reads them via stage.step_balance_file)")
    p.add_argument("--print-config", action="store_true",
                   help="validate the config, print it as YAML and exit")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="Python log level of rank 0 (default INFO)")
    p.add_argument("--other-ranks-log-level", default="WARNING", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level of every other rank (default WARNING: one copy of the INFO "
                        "lines, warnings from every rank)")
    p.add_argument("--megatron-log-level", default="WARNING", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="least level shown from megatron-core's own loggers (default WARNING; "
                        "INFO adds its DDP bucket and optimizer set-up listings)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .training.logging import setup_logging

    setup_logging(level=args.log_level, other_ranks_level=args.other_ranks_log_level,
                  megatron_level=args.megatron_log_level)
    from .config import ConfigError, load_config, to_dict

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0

    from .parallel.cpu_compat import import_megatron_fast

    import_megatron_fast()
    from .training import signals

    # Before the (long) build and checkpoint load, so a preemption signal then is not fatal:
    # the first step boundary saves and exits with REQUEUE_EXIT_CODE.
    signals.install_signal_handlers()
    from .training.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.setup()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.calibrate_step_balance:
        trainer.calibrate_step_balance(args.calibrate_step_balance)
        return 0
    summary = trainer.train()
    if summary.stopped_by_signal:
        return signals.REQUEUE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
