#!/usr/bin/env python
"""Same as ``omni-gpu-check`` (megatron_omni.cli.gpu_check); needs the package importable
(``pip install -e .``, as ``make venv`` does, or ``PYTHONPATH=.``)."""

from megatron_omni.cli.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
