#!/usr/bin/env python
"""Same as ``omni-merge-parts`` (megatron_omni.cli.merge_parts, the code in
megatron_omni/data/merge.py); needs the package importable (``pip install -e .`` or
``PYTHONPATH=.``)."""

from megatron_omni.cli.merge_parts import main

if __name__ == "__main__":
    raise SystemExit(main())
