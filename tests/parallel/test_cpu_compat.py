"""One test per megatron-core CPU shim (megatron_omni/parallel/cpu_compat.py)."""

import pytest
import torch

from megatron_omni.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are CPU-only")


@pytest.fixture(scope="module", autouse=True)
def shims():
    assert cpu_compat.apply_cpu_shims()


def test_gated_on_cuda(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    monkeypatch.setattr(cpu_compat, "cuda_available", lambda: True)
    assert cpu_compat.apply_cpu_shims() is False


def test_current_device_and_synchronize():
    from megatron.core.utils import GlobalMemoryBuffer

    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()
    buf = GlobalMemoryBuffer().get_tensor((4, 3), torch.float32, "test")
    assert buf.device.type == "cpu" and buf.shape == (4, 3)


def test_rng_tracker_states_are_distinct_and_replayable():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("a", 1001)
    tracker.add("b", 2002)
    torch.manual_seed(0)
    outside = torch.get_rng_state()
    with tracker.fork("a"):
        a1 = torch.randn(4)
    with tracker.fork("b"):
        b1 = torch.randn(4)
    with tracker.fork("a"):
        a2 = torch.randn(4)  # continues stream "a", does not restart it
    assert torch.equal(torch.get_rng_state(), outside)  # the default stream is untouched
    assert not torch.equal(a1, b1) and not torch.equal(a1, a2)
    torch.manual_seed(1001)
    expect = torch.randn(8)
    assert torch.equal(torch.cat([a1, a2]), expect)


def test_recompute_replays_dropout():
    """CheckpointFunction restores the tracked RNG so recomputed dropout equals the forward's."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(force_reset=True)
    mrandom.get_cuda_rng_tracker().add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, 77)
    w = torch.randn(16, 16, requires_grad=True)

    def fn(x, w):
        with mrandom.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x @ w, p=0.5, training=True)

    x = torch.randn(8, 16)
    tracker = mrandom.get_cuda_rng_tracker()
    saved = {k: v.clone() for k, v in tracker.get_states().items()}
    plain = fn(x, w)
    plain.sum().backward()
    g_plain = w.grad.clone()
    w.grad = None
    tracker.set_states({k: v.clone() for k, v in saved.items()})
    ckpt = tensor_parallel.checkpoint(fn, False, x, w)
    torch.randn(100)  # the default stream moves on between forward and backward
    with tracker.fork():
        torch.randn(100)  # and so does the tracked one: recompute must restore its own copy
    ckpt.sum().backward()
    assert torch.equal(plain, ckpt)
    assert (plain == 0).any()  # dropout really dropped something
    assert torch.equal(g_plain, w.grad)


def test_cuda_literals_become_cpu_in_patched_modules():
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu"
    assert clip_grads.torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert schedules.torch.float32 is torch.float32  # everything else is torch itself
    assert torch.zeros(1).device.type == "cpu"


def test_grad_norm_and_clip_run_on_cpu(single_rank):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    expect = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    norm = get_grad_norm_fp32(grads)
    assert abs(norm - expect) < 1e-4
    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    assert abs(torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item() - 1.0) < 1e-4


def test_tensor_cuda_is_identity():
    t = torch.ones(2)
    assert t.cuda() is t


def test_type_names_only_inside_block():
    t = torch.ones(2)
    with cpu_compat.report_cuda_tensor_types():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64
    assert t.type() == "torch.FloatTensor"


def test_distributed_optimizer_builds_and_steps_like_adam(single_rank):
    """DistributedOptimizer's param-type check passes on CPU and its step equals torch Adam."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               use_cpu_initialization=True)

    class Tiny(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    module = Tiny()
    ref = torch.nn.Linear(8, 8)
    ref.load_state_dict(module.lin.state_dict())
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), module)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.1, bf16=False,
                                                 use_distributed_optimizer=True,
                                                 clip_grad=0.0), [ddp])
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.01)
    x = torch.randn(4, 8)
    for _ in range(2):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(x).pow(2).sum().backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
        ref_opt.zero_grad()
        ref(x).pow(2).sum().backward()
        ref_opt.step()
    assert torch.allclose(module.lin.weight, ref.weight, atol=1e-6)


def test_bf16_optimizer_wraps_cpu_bf16_params(single_rank):
    """Float16OptimizerWithFloat16Params (bf16 without the distributed optimizer) accepts CPU bf16
    parameters, keeps fp32 main copies and writes the update back in bf16."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, bf16=True,
                               params_dtype=torch.bfloat16, use_cpu_initialization=True)

    class Tiny(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.lin = torch.nn.Linear(8, 8, dtype=torch.bfloat16)

        def forward(self, x):
            return self.lin(x)

    module = Tiny()
    before = module.lin.weight.detach().clone()
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), module)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.1, bf16=True,
                                                 params_dtype=torch.bfloat16), [ddp])
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ddp(torch.randn(4, 8, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok and module.lin.weight.dtype == torch.bfloat16
    assert not torch.equal(module.lin.weight, before)
