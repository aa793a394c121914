"""The tests' name for megatron_omni/testing/pref_batch.py (packed preference rows)."""

from megatron_omni.testing.pref_batch import pref_row, random_pairs

__all__ = ["pref_row", "random_pairs"]
