"""megatron_omni.inference"""
