#!/usr/bin/env python
"""Same as ``omni-plan`` (megatron_omni.cli.plan); needs the package importable
(``pip install -e .``, as ``make venv`` does, or ``PYTHONPATH=.``)."""

from megatron_omni.cli.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
