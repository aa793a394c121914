"""megatron_omni.training"""
