"""megatron_omni.data"""
