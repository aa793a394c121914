#!/usr/bin/env python
"""``omni-convert-data``: public dataset layouts -> our JSONL (megatron_omni/data/converters)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_omni.data.converters.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
