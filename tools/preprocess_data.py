#!/usr/bin/env python
"""Same as ``omni-preprocess`` (megatron_omni.cli.preprocess_data); needs the package importable
(``pip install -e .``, as ``make venv`` does, or ``PYTHONPATH=.``)."""

from megatron_omni.cli.preprocess_data import main

if __name__ == "__main__":
    raise SystemExit(main())
