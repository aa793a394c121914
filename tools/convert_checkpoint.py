#!/usr/bin/env python
"""Same as ``omni-convert`` (megatron_omni.cli.convert_checkpoint); needs the package importable
(``pip install -e .``, as ``make venv`` does, or ``PYTHONPATH=.``)."""

from megatron_omni.cli.convert_checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())
