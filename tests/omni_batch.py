"""The tests' name for megatron_omni/testing/omni_batch.py (a small packed omni batch)."""

from megatron_omni.testing.omni_batch import TINY_OMNI, MemoryData, omni_batch, tiny_omni_cfg

__all__ = ["TINY_OMNI", "MemoryData", "omni_batch", "tiny_omni_cfg"]
