#!/usr/bin/env python
"""Same as ``omni-demo`` (megatron_omni.cli.demo); needs the package importable
(``pip install -e .``, as ``make venv`` does, or ``PYTHONPATH=.``)."""

from megatron_omni.cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
