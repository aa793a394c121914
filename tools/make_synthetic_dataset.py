#!/usr/bin/env python
"""Same as ``omni-synthetic-data`` (megatron_omni.cli.make_synthetic_dataset); needs the
package importable (``pip install -e .``, as ``make venv`` does, or ``PYTHONPATH=.``)."""

from megatron_omni.cli.make_synthetic_dataset import main

if __name__ == "__main__":
    raise SystemExit(main())
