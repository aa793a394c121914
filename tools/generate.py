#!/usr/bin/env python
"""Same as ``omni-generate`` (megatron_omni.cli.generate); needs the package importable
(``pip install -e .``, as ``make venv`` does, or ``PYTHONPATH=.``)."""

from megatron_omni.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
