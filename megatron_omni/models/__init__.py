"""megatron_omni.models"""
