"""megatron_omni.parallel"""
