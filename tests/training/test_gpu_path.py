"""Defects that would stop a first GPU run, shown on the CPU (issue: GPU path).

* Device class (collectives on CPU tensors under NCCL, ``cu_seqlens`` left on the host, the
  ``searchsorted`` on a host tensor, plain torch modules never moved): a CPU-only machine hides
  a forgotten ``.to(device)`` because everything is on the CPU anyway. The harness here tells the
  runtime its device is something other than where tensors are made - the runtime declares
  ``meta`` while loaders build on the CPU, or declares the CPU while ``torch.set_default_device``
  makes tensors on ``meta`` - and checks every tensor handed to a collective and every model
  input against the declared device.
* Dtype class (fp32 projectors fed bf16 ViT features): ``training.bf16`` now really runs bf16 on
  the CPU, so the tiny omni model trained in bf16 here meets what a GPU run meets.

What a CPU cannot show - NCCL itself, TE's THD attention reading device int32 ``cu_seqlens``,
CUDA-initialised forked workers - is covered by ``tools/gpu_check.py`` (stages ``nccl``,
``llm_te_vs_local``, ``thd_packed``, ``omni_trainer``, ``dali_decode``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from omni_batch import MemoryData, omni_batch, tiny_omni_cfg

from megatron_omni.parallel.device import comm_device, declared_device, off_device

# --- the collective / model-input harness ---------------------------------------------------------

@contextlib.contextmanager
def collective_harness(monkeypatch, world: int = 2):
    """Pretend DP = PP = world = ``world`` ranks that hold identical values: every all_reduce is
    recorded (op, device, dtype) and computed as that (SUM multiplies, MAX keeps). The runtime
    declares the CPU while tensors made without an explicit device land on ``meta``."""
    from megatron.core import parallel_state as ps

    calls = []

    def fake_all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        calls.append((str(op), t.device))
        if t.device != comm_device(group):
            raise AssertionError(f"collective got a tensor on {t.device}, the runtime's "
                                 f"communication device is {comm_device(group)}")
        if op == torch.distributed.ReduceOp.SUM:
            t.mul_(world)

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(ps, "get_data_parallel_world_size", lambda *a, **k: world)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda *a, **k: world)
    with declared_device("cpu"):
        torch.set_default_device("meta")
        try:
            yield calls
        finally:
            torch.set_default_device(None)


def test_step_collectives_use_the_communication_device(single_rank, monkeypatch):
    from megatron.core import parallel_state as ps

    from megatron_omni.models.omni import special_token_ids
    from megatron_omni.training.step import _reduce_report, global_token_counts

    cfg = tiny_omni_cfg()
    special = special_token_ids(cfg)
    b = omni_batch(cfg, seed=1)
    groups = {"image": [b], "text": [b, b]}
    monkeypatch.setattr(ps, "is_pipeline_last_stage", lambda *a, **k: True)
    with collective_harness(monkeypatch) as calls:
        counts = global_token_counts(groups, special)
        store = [{"name": "image", "sum_text": torch.tensor(3.0, device="cpu"),
                  "sum_ga": torch.tensor(0.5, device="cpu")},
                 {"name": "text", "sum_text": torch.tensor(5.0, device="cpu"),
                  "sum_ga": torch.tensor(1.0, device="cpu")}]
        res = _reduce_report(store, groups, counts, {"image": 1.0, "text": 1.0}, 1.0)
    # token counts (1 collective), report sums over DP and PP (2), NaN flag over the world (1)
    assert len(calls) == 4 and all(d == torch.device("cpu") for _, d in calls)
    from megatron_omni.training.step import _masks

    local = float(_masks(b, special)[0].sum())
    assert local > 0 and counts["image"] == 2 * local and counts["text"] == 2 * 2 * local
    # sums x2 (DP) x2 (PP) over counts x2 (DP)
    assert res.losses["image"] == pytest.approx(3.0 * 4 / counts["image"])
    assert res.losses["text"] == pytest.approx(5.0 * 4 / counts["text"])
    assert res.finite


def test_checkpoint_and_balance_collectives_use_the_same_rule(single_rank, monkeypatch):
    from megatron_omni.training import signals
    from megatron_omni.training.balance import all_reduce_mean_losses

    with collective_harness(monkeypatch) as calls:
        assert signals.should_save_and_exit() is False
        assert all_reduce_mean_losses({"text": 2.0, "audio": 4.0}) == {"text": 2.0, "audio": 4.0}
    assert len(calls) == 2 and all(d == torch.device("cpu") for _, d in calls)


def test_every_model_input_is_on_the_runtime_device():
    """The loader builds a batch on the CPU; the runtime declares ``meta``: every tensor the
    model receives, ``cu_seqlens`` (as int32) included, must be on ``meta``."""
    from megatron_omni.training.step import model_inputs
    from megatron_omni.training.trainer import HOST_SIDE_INPUTS, to_model_batch

    cfg = tiny_omni_cfg()
    b = omni_batch(cfg, seed=2)
    with declared_device("meta") as dev:
        mb = to_model_batch(b)
        args, kwargs = model_inputs(mb)
    seen = []
    for name, v in list(enumerate(args)) + list(kwargs.items()):
        if name in HOST_SIDE_INPUTS or v is None or isinstance(v, (str, list)) and not v:
            continue
        if isinstance(v, torch.Tensor):
            seen.append((name, v.device))
        elif isinstance(v, list) and isinstance(v[0], torch.Tensor):
            seen += [(name, w.device) for w in v]
    psp = kwargs["packed_seq_params"]
    seen += [("cu_seqlens_q", psp.cu_seqlens_q.device), ("cu_seqlens_kv", psp.cu_seqlens_kv.device)]
    wrong = [(n, d) for n, d in seen if d != dev]
    assert not wrong, f"model inputs not on the runtime device {dev}: {wrong}"
    assert psp.cu_seqlens_q.dtype == torch.int32
    cu = b["cu_seqlens"]
    assert psp.max_seqlen_q == int((cu[1:] - cu[:-1]).max())
    assert {0, 1, "labels", "audio_waveforms", "vision_patches"} <= {n for n, _ in seen}


def test_sample_lookup_searches_on_the_device_of_cu_seqlens():
    from megatron_omni.models.omni import OmniModel

    cu = torch.tensor([0, 4, 9, 12], dtype=torch.int32, device="cpu")
    torch.set_default_device("meta")  # a tensor made without a device lands elsewhere
    try:
        assert OmniModel._sample_of(5, cu, ["a", "b", "c"]) == "sample b (position 5)"
    finally:
        torch.set_default_device(None)


def test_whole_model_lands_on_the_runtime_device(single_rank):
    """megatron-core modules follow ``use_cpu_initialization``; the plain torch ones (ViT patch
    embedding and merger norm, projectors, SAN-M, torch norms) must be moved explicitly."""
    from megatron_omni.models.omni import OmniModel

    cfg = tiny_omni_cfg()
    with declared_device("meta") as dev:
        model = OmniModel(cfg)
    assert off_device(model, dev) == []


# --- bf16 on the CPU -----------------------------------------------------------------------------

def test_bf16_training_runs_bf16_on_cpu(single_rank, tmp_path):
    """training.bf16 on the CPU: bf16 megatron modules, ViT and projectors (SAN-M stays fp32),
    bf16 ViT features reach the projector, the model trains, and the distributed optimizer
    checkpoints the mixed fp32/bf16 parameters (megatron-core needs one dtype per param group;
    ``training/optimizer.py`` splits them)."""
    from megatron_omni.training.trainer import Trainer

    cfg = tiny_omni_cfg("data.modalities=[audio,image]", "training.bf16=true",
                        "training.use_distributed_optimizer=true",
                        "training.train_iters=4", "training.lr=2e-3",
                        "training.lr_warmup_iters=0", "training.log_interval=100",
                        f"training.save={tmp_path / 'ckpt'}")
    t = Trainer(cfg, data=MemoryData(cfg), printer=lambda s: None)
    t.setup()
    m = t.chunks[0]
    assert m.llm.decoder.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    assert m.vision_model.patch_embed.weight.dtype == torch.bfloat16
    assert m.linear_proj[0].weight.dtype == torch.bfloat16
    assert m.linear_proj_audio[0].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in m.audio_model.parameters())
    s = t.train()
    assert s.steps_done == 4 and s.nan_steps == 0 and s.checkpoint.endswith("4")
    for k in ("image", "audio"):
        assert s.first_losses[k] == s.first_losses[k]  # finite
        assert s.last_losses[k] < s.first_losses[k]


# --- overlap_grad_reduce with micro-batches that skip an encoder ----------------------------------

@pytest.mark.slow
def test_overlap_grad_reduce_with_groups_that_skip_an_encoder():
    """Two gloo ranks, modality groups [audio, image]: the last micro-batch of every step is an
    image row that never touches the audio encoder. megatron-core's overlapped reduction launches
    a bucket only when every parameter reported a gradient in the last micro-batch; without the
    zero-weight contribution step 2 dies in the bucket bookkeeping. With it, the overlapped runs
    (with and without the distributed optimizer) follow the plain run's losses."""
    from dist_utils import run_workers

    res = run_workers("overlap_run.py", 2)
    assert res["overlap"]["overlap"] and not res["plain"]["overlap"]
    plain = res["plain"]["history"]
    assert len(plain) == 3
    for name in ("overlap", "overlap_distopt"):
        hist = res[name]["history"]
        assert len(hist) == 3
        for a, b in zip(plain, hist):
            assert a.keys() == b.keys() and {"audio", "image"} <= a.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (name, a, b)
    assert plain[-1]["audio"] < plain[0]["audio"]


# --- load_full_llm_state under the Transformer Engine spec ---------------------------------------

def test_full_llm_state_is_renamed_for_the_te_spec(single_rank, monkeypatch):
    """A TE-spec chunk receives TE names: the fused norms as megatron-core itself maps them (the
    local spec's ``sharded_state_dict_keys_map``). TE cannot be built on a CPU; the real TE load
    runs in tools/gpu_check.py (stage llm_te_vs_local)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_omni.models import llm as llm_mod

    cfg = tiny_omni_cfg(vision=False, audio=False)
    chunk = llm_mod.build_llm(cfg)
    full = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    got = {}
    monkeypatch.setattr(llm_mod, "load_local_state",
                        lambda module, local, strict=True, **kw: got.update(local))
    chunk.transformer_impl = "transformer_engine"
    llm_mod.load_full_llm_state(chunk, full)
    keymap = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    expect = set()
    for k in full:
        for src, dst in keymap.items():
            if f".{src}" in k and ".layers." in k:
                k = k.replace(f".{src}", f".{dst}")
        expect.add(k)
    assert set(got) == expect
    assert any(k.endswith("self_attention.linear_qkv.layer_norm_weight") for k in got)
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in got)


def test_bf16_with_trainable_fp32_sanm_needs_the_distributed_optimizer():
    from megatron_omni.config import ConfigError
    from megatron_omni.config.validate import validate

    with pytest.raises(ConfigError, match="use_distributed_optimizer=true"):
        validate(tiny_omni_cfg("training.bf16=true"))
    validate(tiny_omni_cfg("training.bf16=true", "stage.train_audio=false"))


def test_context_parallelism_is_refused_until_rows_are_sliced():
    from megatron_omni.config import ConfigError
    from megatron_omni.config.validate import validate

    with pytest.raises(ConfigError, match="parallel.context_parallel_size=2 is not supported"):
        validate(tiny_omni_cfg("parallel.context_parallel_size=2",
                               "model.transformer_impl=transformer_engine"), world_size=2)
    # The planner models megatron-core's CP layouts (published rows) without training them.
    cfg = tiny_omni_cfg("model.transformer_impl=transformer_engine")
    cfg.parallel.context_parallel_size = 2
    validate(cfg, world_size=2, training=False)
    with pytest.raises(ConfigError, match="parallel.context_parallel_size=2 is not supported"):
        validate(cfg, world_size=2)


# --- DALI in forked loader workers ---------------------------------------------------------------

def test_loader_side_media_backend_never_opens_a_gpu_pipeline(monkeypatch):
    """On a GPU machine (CUDA reported available), the loader-side backend is still DALI on CPU
    operators (or the CPU backend): a forked Energon worker must not initialise CUDA. The real
    fork-after-CUDA case needs a GPU: tools/gpu_check.py, stage ``dali_decode`` (OmniLoaders
    with workers)."""
    pytest.importorskip("nvidia.dali")
    from megatron_omni.data.loaders import loader_media_backend
    from megatron_omni.data.media import dali

    monkeypatch.setattr(dali, "cuda_available", lambda: True)
    for name in ("auto", "dali"):
        b = loader_media_backend(name)
        assert b.name == "dali" and b.device == "cpu" and b.device_id is None
    assert loader_media_backend("cpu").name == "cpu"


# --- packed attention without Transformer Engine -------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_flex_thd_attention_equals_the_exact_per_segment_path(monkeypatch, causal):
    """The GPU path without TE (one flex-attention call over the packed row with a segment block
    mask) gives the per-segment SDPA results; here flex runs unfused and forward-only (torch has
    no flex backward on the CPU). The compiled kernel and its gradients on CUDA are compared in
    tools/gpu_check.py (stage thd_packed)."""
    import warnings

    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_omni.models.attention import VarlenSDPAttention, packed_seq_params

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                            num_query_groups=2, attention_dropout=0.0,
                            use_cpu_initialization=True)
    attn = VarlenSDPAttention(cfg, 1, AttnMaskType.causal if causal else AttnMaskType.no_mask)
    g = torch.Generator().manual_seed(0)
    t, cu = 37, torch.tensor([0, 9, 10, 30, 37], dtype=torch.int32)
    q = torch.randn(t, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(t, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(t, 2, 8, generator=g, dtype=torch.float64)
    outs = {}
    for path in ("loop", "flex"):
        monkeypatch.setenv("OMNI_THD_ATTENTION", path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs[path] = attn(q, k, v, None, packed_seq_params=packed_seq_params(cu))
    torch.testing.assert_close(outs["flex"], outs["loop"], rtol=1e-9, atol=1e-9)
