#!/usr/bin/env python
"""Same as ``omni-convert-data`` (megatron_omni.data.converters.cli); needs the package importable
(``pip install -e .``, as ``make venv`` does, or ``PYTHONPATH=.``)."""

from megatron_omni.data.converters.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
