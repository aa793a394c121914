"""The command-line tools, one module per console script (``pyproject.toml`` [project.scripts]):

=====================  ==========================================  ===========================
console script         module                                      also runs as
=====================  ==========================================  ===========================
omni-train             megatron_omni.train                         python -m megatron_omni.train
omni-preprocess        megatron_omni.cli.preprocess_data           tools/preprocess_data.py
omni-convert           megatron_omni.cli.convert_checkpoint        tools/convert_checkpoint.py
omni-convert-data      megatron_omni.data.converters.cli           tools/convert_dataset.py
omni-generate          megatron_omni.cli.generate                  tools/generate.py
omni-plan              megatron_omni.cli.plan                      tools/plan.py
omni-demo              megatron_omni.cli.demo                      tools/demo.py (make demo)
omni-merge-parts       megatron_omni.cli.merge_parts               slurm/merge_parts.py
omni-gpu-check         megatron_omni.cli.gpu_check                 make gpu-check
omni-synthetic-data    megatron_omni.cli.make_synthetic_dataset    tools/make_synthetic_dataset.py
omni-plot              megatron_omni.cli.plot                      python -m megatron_omni.cli.plot
=====================  ==========================================  ===========================

Every module has ``main(argv=None) -> int`` (the exit code) and runs with ``python -m``, which
needs no installation when started from the repository root.
"""
