"""megatron_omni.convert"""
