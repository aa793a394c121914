"""Single-process LLM checks: packing isolation, M-RoPE vs 1-D RoPE, HF Llama parity, adapter."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_omni.config import load_config
from megatron_omni.models.attention import packed_seq_params
from megatron_omni.models.llm import (
    build_llm,
    llama3_scaled_inv_freq,
    llm_transformer_config,
    load_full_llm_state,
)
from megatron_omni.models.specs import llm_block_spec
from megatron_omni.models.weight_maps.llm import hf_to_megatron, llm_config_from_hf, megatron_to_hf


def tiny_cfg(*extra):
    return load_config(None, ["model.vision.enabled=false", "model.audio.enabled=false", *extra])


def hf_llama(seed=3, vocab=512, rope_type="llama3"):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": rope_type, "rope_theta": 500000.0}
    if rope_type == "llama3":
        rope.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=192,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=131072, tie_word_embeddings=False,
                      rope_parameters=rope)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def test_packed_row_equals_samples_alone(single_rank):
    model_parallel_cuda_manual_seed(5)
    model = build_llm(tiny_cfg()).eval()
    g = torch.Generator().manual_seed(0)
    lens = [9, 14, 9]
    samples = [torch.randint(0, 500, (1, n), generator=g) for n in lens]
    targets = [torch.randint(0, 500, (1, n), generator=g) for n in lens]
    row, lab = torch.cat(samples, 1), torch.cat(targets, 1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 9, 23, 32], dtype=torch.int32)
    with torch.no_grad():
        packed = model(row, pos, labels=lab, packed_seq_params=packed_seq_params(cu))
        alone = torch.cat([model(s, torch.arange(s.shape[1])[None], labels=t)
                           for s, t in zip(samples, targets)], 1)
        # Without the segment boundaries the later samples do see the earlier ones.
        crossing = model(row, pos, labels=lab)
    assert (packed - alone).abs().max() < 1e-5
    assert (crossing[:, 9:] - alone[:, 9:]).abs().max() > 1e-3


def test_packed_row_rejects_short_cu_seqlens(single_rank):
    model = build_llm(tiny_cfg())
    ids = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="cu_seqlens ends at 12"):
        model(ids, torch.arange(16)[None],
              packed_seq_params=packed_seq_params(torch.tensor([0, 12], dtype=torch.int32)))


def test_mrope_with_equal_indices_equals_1d_rope(single_rank):
    """Our M-RoPE (3 equal rows) with the optional llama3 scaling vs megatron-core's own 1-D
    RoPE with its llama3 scaling."""
    cfg = tiny_cfg("model.llm.rope_scaling=true")
    model_parallel_cuda_manual_seed(6)
    ours = build_llm(cfg).eval()
    config = llm_transformer_config(cfg)
    ref = GPTModel(config, llm_block_spec(config, "local"), vocab_size=512,
                   max_sequence_length=4096, position_embedding_type="rope",
                   rotary_base=int(cfg.model.llm.rotary_base), rope_scaling=True,
                   rope_scaling_factor=cfg.model.llm.rope_scaling_factor).eval()
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 512, (2, 40))
    pos = torch.arange(40).expand(2, 40)
    with torch.no_grad():
        a = ours(ids, pos.unsqueeze(0).expand(3, -1, -1))
        b = ref(ids, pos, attention_mask=None)
        # Unequal rows really change the result (the sections are used).
        c = ours(ids, torch.stack([pos, pos * 2, pos * 3]))
    assert (a - b).abs().max() < 1e-5
    assert (a - c).abs().max() > 1e-3


def test_llama3_scaling_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = hf_llama()
    inv_hf, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    ours = llama3_scaled_inv_freq(base, 8.0, 1.0, 4.0, 8192)
    assert torch.allclose(ours, inv_hf.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, base)


def test_default_llm_is_unscaled_mrope_equal_to_hf_default_rope(single_rank):
    """Issue #9: the omni LLM as configured by default (no llama3 scaling) equals a transformers
    Llama with rope type "default" -- what the authors' release runs under M-RoPE -- on text,
    with the 3 M-RoPE rows equal; the same weights with scaling on do not."""
    hf = hf_llama(rope_type="default")
    with torch.no_grad():  # sharper attention, so a change of rotary frequencies shows
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    assert not tiny_cfg().model.llm.rope_scaling
    assert not load_config("examples/stages/9b/it3.yaml").model.llm.rope_scaling
    assert not load_config("examples/stages/72b/it3.yaml").model.llm.rope_scaling
    ids = torch.randint(0, 512, (2, 48))
    pos = torch.arange(48).expand(2, 48)
    results = {}
    for scaled in (False, True):
        cfg = tiny_cfg(f"model.llm.norm_epsilon={hf.config.rms_norm_eps}",
                       *(["model.llm.rope_scaling=true"] if scaled else []))
        model = build_llm(cfg).eval()
        load_full_llm_state(model, hf_to_megatron(hf.state_dict(), cfg.model.llm, 512))
        with torch.no_grad():
            results[scaled] = model(ids, pos.unsqueeze(0).expand(3, -1, -1))
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
    assert (results[False] - ref).abs().max() < 1e-5
    assert (results[True] - ref).abs().max() > 1e-3


def test_hf_llama_parity_tp1(single_rank):
    hf = hf_llama()
    cfg = tiny_cfg()
    cfg.model.llm = llm_config_from_hf(hf.config.to_dict())
    model = build_llm(cfg).eval()
    load_full_llm_state(model, hf_to_megatron(hf.state_dict(), cfg.model.llm, 512))
    ids = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        ours = model(ids, torch.arange(33).expand(2, 33))
        ref = hf(ids).logits
    assert (ours - ref).abs().max() < 1e-4


def test_adapter_round_trip_and_errors():
    hf = hf_llama(vocab=500)
    llm = llm_config_from_hf(hf.config.to_dict())
    assert llm.mrope_section == [2, 3, 3] and llm.num_query_groups == 2 and llm.rope_scaling
    mg = hf_to_megatron(hf.state_dict(), llm, 512)
    assert mg["embedding.word_embeddings.weight"].shape[0] == 512  # padded
    back = megatron_to_hf(mg, llm)
    sd = hf.state_dict()
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    broken = dict(sd)
    broken["model.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected keys"):
        hf_to_megatron(broken, llm, 512)
    del broken["model.layers.0.extra.weight"], broken["model.norm.weight"]
    with pytest.raises(KeyError, match="model.norm.weight"):
        hf_to_megatron(broken, llm, 512)


def test_llama_sizes_build_valid_configs():
    for path, layers, hidden in [("examples/model/llama3_8b.yaml", 32, 4096),
                                 ("examples/model/llama3_70b.yaml", 80, 8192)]:
        cfg = load_config(path)
        assert cfg.model.llm.num_layers == layers and cfg.model.llm.hidden_size == hidden
        assert cfg.model.llm.mrope_section == [16, 24, 24]
        assert cfg.model.llm.head_dim == 128
