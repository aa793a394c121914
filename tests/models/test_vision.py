"""Single-process ViT checks: parity with transformers' Qwen2-VL vision tower (forward and
gradients) on mixed images + video in one call, per-item/per-frame attention isolation, rotary
positions and segments, the state-dict adapter, TP sharding rules, pipeline-independence of the
ViT config, FLOP count, example YAML."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_omni.config import load_config
from megatron_omni.config.schema import VisionConfig
from megatron_omni.data.media.vision import patchify
from megatron_omni.models.vision import (
    VisionEncoder,
    _vision_config,
    vision_cu_seqlens,
    vision_flops,
    vision_rotary_positions,
    vision_transformer_config,
)
from megatron_omni.models.weight_maps.sharding import from_te_layout, partition_dim, to_te_layout
from megatron_omni.models.weight_maps.vision import (
    expected_hf_vision_shapes,
    hf_to_vision,
    shard_vision_state_dict,
    unshard_vision_state_dict,
    vision_config_from_hf,
    vision_to_hf,
)

REPO = Path(__file__).resolve().parents[2]
# Items of one call: images 28x28, 56x84, 112x56 and a 4-frame 56x56 video (2 temporal slices).
SIZES = [(1, 28, 28), (1, 56, 84), (1, 112, 56), (4, 56, 56)]


def hf_tower(seed=0, attn="sdpa"):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    cfg = Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4, hidden_size=64,
                              in_chans=3, spatial_patch_size=14, temporal_patch_size=2,
                              spatial_merge_size=2)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = Qwen2VisionTransformerPretrainedModel(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits norms: randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def vision_cfg(hf):
    return vision_config_from_hf(hf.config.to_dict())


def media_batch(seed=0):
    """Patches of SIZES through the data pipeline's patchify (the layout the ViT must accept)."""
    rng = np.random.default_rng(seed)
    patches, grids = [], []
    for frames, h, w in SIZES:
        x = rng.standard_normal((frames, 3, h, w)).astype(np.float32)
        p, grid = patchify(x)
        patches.append(torch.from_numpy(p))
        grids.append(grid)
    return torch.cat(patches), torch.tensor(grids, dtype=torch.long)


def item_ranges(grid, merge=4):
    """[start, end) of each item's merged features."""
    sizes = (grid.prod(-1) // merge).tolist()
    ends = np.cumsum(sizes).tolist()
    return list(zip([0] + ends[:-1], ends))


@pytest.fixture(scope="module")
def pair(single_rank):
    hf = hf_tower()
    v = vision_cfg(hf)
    ours = VisionEncoder(v, 64, transformer_impl="local").eval()
    ours.load_full_state_dict(hf_to_vision(hf.state_dict(), v))
    return hf, ours, v


def test_grid_is_mixed_images_and_video():
    _, grid = media_batch()
    assert grid.tolist() == [[1, 2, 2], [1, 4, 6], [1, 8, 4], [2, 4, 4]]


def test_matches_transformers_on_mixed_batch(pair):
    hf, ours, _ = pair
    x, grid = media_batch()
    with torch.no_grad():
        ref = hf(x, grid_thw=grid).pooler_output
        out = ours(x, grid)
    assert out.shape == (x.shape[0] // 4, 64) == ref.shape
    assert ref.abs().max() > 0.1  # a real signal, not all zeros
    assert (out - ref).abs().max().item() < 1e-4


def test_gradients_match_transformers(pair):
    """Input and weight gradients of a scalar loss agree with HF (weights mapped by the adapter)."""
    hf, ours, v = pair
    x, grid = media_batch(seed=1)
    target = torch.randn(x.shape[0] // 4, 64, generator=torch.Generator().manual_seed(2))
    grads = {}
    for name, model in (("hf", hf), ("ours", ours)):
        model.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        out = hf(inp, grid_thw=grid).pooler_output if name == "hf" else ours(inp, grid)
        ((out - target) ** 2).mean().backward()
        grads[name] = (inp.grad, {k: p.grad for k, p in model.named_parameters()})
    def rel(a, b):  # max abs error relative to the reference's largest entry
        return ((a - b).abs().max() / b.abs().max()).item()

    assert rel(grads["ours"][0], grads["hf"][0]) < 1e-5
    mapped = vision_to_hf(grads["ours"][1], v)
    assert set(mapped) == set(grads["hf"][1])
    worst = max(rel(mapped[k], grads["hf"][1][k]) for k in mapped)
    assert worst < 1e-5, worst
    assert min(g.abs().max().item() for g in mapped.values()) > 0  # every weight got gradient


def test_attention_never_crosses_items_or_frames(pair):
    _, ours, _ = pair
    x, grid = media_batch()
    ranges = item_ranges(grid)
    patch_starts = np.cumsum([0] + grid.prod(-1).tolist()).tolist()
    with torch.no_grad():
        base = ours(x, grid)
        # Perturb image 2 (56x84): every other item is bit-identical, image 2 changes.
        y = x.clone()
        y[patch_starts[1]:patch_starts[2]] += 1.0
        pert = ours(y, grid)
        for i, (s, e) in enumerate(ranges):
            if i == 1:
                assert (pert[s:e] - base[s:e]).abs().max() > 1e-3
            else:
                assert torch.equal(pert[s:e], base[s:e]), f"item {i} changed"
        # Perturb the video's first temporal slice: its second slice is its own segment.
        t, h, w = grid[3].tolist()
        y = x.clone()
        y[patch_starts[3]:patch_starts[3] + h * w] += 1.0
        pert = ours(y, grid)
    s, e = ranges[3]
    half = (e - s) // t
    assert (pert[s:s + half] - base[s:s + half]).abs().max() > 1e-3
    assert torch.equal(pert[s + half:e], base[s + half:e])
    assert torch.equal(pert[:s], base[:s])


def test_positions_and_segments_match_transformers():
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    _, grid = media_batch()
    grid = torch.cat([grid, torch.tensor([[3, 6, 2]])])
    assert torch.equal(vision_rotary_positions(grid, 2), get_vision_position_ids(grid, 2))
    assert torch.equal(vision_cu_seqlens(grid), get_vision_cu_seqlens(grid))
    # 2x2-merge-contiguous: every 4 consecutive patches are one 2x2 neighbourhood.
    pos = vision_rotary_positions(torch.tensor([[1, 4, 6]]), 2)
    assert pos[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


def test_forward_rejects_bad_inputs(pair):
    _, ours, _ = pair
    x, grid = media_batch()
    with pytest.raises(ValueError, match="covers"):
        ours(x[:-4], grid)
    with pytest.raises(ValueError, match="multiples of the spatial merge"):
        ours(torch.zeros(3, x.shape[1]), torch.tensor([[1, 1, 3]]))
    with pytest.raises(ValueError, match="pixel_patches must be"):
        ours(x[:, :100], grid)


# --- adapter ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "visual.", "vision_model."])
def test_adapter_round_trip_hf_ours_hf(prefix):
    hf = hf_tower(seed=4)
    v = vision_cfg(hf)
    sd = {prefix + k: t for k, t in hf.state_dict().items()}
    if prefix:  # keys outside the prefix belong to other parts and are ignored
        sd["language_model.model.norm.weight"] = torch.ones(3)
    ours = hf_to_vision(sd, v, prefix=prefix)
    back = vision_to_hf(ours, v, prefix=prefix)
    expected = {k: t for k, t in sd.items() if k.startswith(prefix)}
    assert set(back) == set(expected)
    for k in expected:
        assert back[k].dtype == expected[k].dtype and torch.equal(back[k], expected[k]), k


@pytest.mark.parametrize("prefix", ["", "visual.", "vision_model."])
def test_adapter_round_trip_ours_hf_ours(pair, prefix):
    _, model, v = pair
    ours = {k: t for k, t in model.state_dict().items() if not k.endswith("_extra_state")}
    back = hf_to_vision(vision_to_hf(model.state_dict(), v, prefix=prefix), v, prefix=prefix)
    assert set(back) == set(ours)
    for k in ours:
        assert torch.equal(back[k], ours[k]), k


def test_adapter_qkv_is_head_major():
    hf = hf_tower(seed=5)
    v = vision_cfg(hf)
    w = hf.state_dict()["blocks.0.attn.qkv.weight"]
    b = hf.state_dict()["blocks.0.attn.qkv.bias"]
    ours = hf_to_vision(hf.state_dict(), v)
    qkv_w = ours["transformer.layers.0.self_attention.linear_qkv.weight"]
    qkv_b = ours["transformer.layers.0.self_attention.linear_qkv.bias"]
    d, width, heads = 16, 32, 2
    for h in range(heads):
        for j in range(3):  # q, k, v of head h
            rows = slice(h * 3 * d + j * d, h * 3 * d + (j + 1) * d)
            hf_rows = slice(j * width + h * d, j * width + (h + 1) * d)
            assert torch.equal(qkv_w[rows], w[hf_rows])
            assert torch.equal(qkv_b[rows], b[hf_rows])


def test_adapter_errors_list_bad_keys():
    hf = hf_tower(seed=6)
    v = vision_cfg(hf)
    sd = dict(hf.state_dict())
    bad = dict(sd, **{"blocks.0.attn.qkv.lora_A": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown 1 key\(s\): blocks.0.attn.qkv.lora_A"):
        hf_to_vision(bad, v)
    bad = {k: t for k, t in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): blocks.1.mlp.fc2.bias"):
        hf_to_vision(bad, v)
    bad = dict(sd, **{"merger.mlp.0.weight": torch.zeros(128, 64)})
    with pytest.raises(ValueError, match=r"wrong shape in .*merger.mlp.0.weight"):
        hf_to_vision(bad, v)
    with pytest.raises(ValueError, match="merger.mlp.2"):  # merger width checked when known
        hf_to_vision(sd, v, out_hidden=48)
    with pytest.raises(ValueError, match=r"missing 12 key\(s\): blocks.2.attn.proj.bias"):
        hf_to_vision(sd, VisionConfig(depth=3, merger_hidden_size=64))
    with pytest.raises(ValueError, match="no keys start with 'vision_model.'"):
        hf_to_vision(sd, v, prefix="vision_model.")
    ours = hf_to_vision(sd, v)
    with pytest.raises(ValueError, match=r"unknown 1 key\(s\): transformer.final_layernorm.weight"):
        vision_to_hf(dict(ours, **{"transformer.final_layernorm.weight": torch.ones(32)}), v)
    assert set(expected_hf_vision_shapes(v)) == set(sd)


def test_te_layout_names_round_trip(pair):
    _, model, _ = pair
    sd = {k: t for k, t in model.state_dict().items() if not k.endswith("_extra_state")}
    te = to_te_layout(sd)
    assert "transformer.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "transformer.layers.0.mlp.linear_fc1.layer_norm_bias" in te
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in te)
    assert "merger.ln_q.weight" in te  # the merger's norm is ours, not a TE fused one
    assert from_te_layout(te) == sd


# --- tensor-parallel sharding rules -------------------------------------------------------------

def test_sharding_rules_for_vit_and_merger(pair):
    _, model, _ = pair
    sd = {k: t for k, t in model.state_dict().items() if not k.endswith("_extra_state")}
    lay = "transformer.layers.0."
    assert partition_dim(lay + "self_attention.linear_qkv.weight") == 0
    assert partition_dim(lay + "self_attention.linear_qkv.bias") == 0
    assert partition_dim(lay + "mlp.linear_fc1.bias") == 0
    assert partition_dim(lay + "self_attention.linear_proj.weight") == 1
    assert partition_dim(lay + "mlp.linear_fc2.weight") == 1
    assert partition_dim("merger.linear_fc1.weight") == 0
    assert partition_dim("merger.linear_fc1.bias") == 0
    assert partition_dim("merger.linear_fc2.weight") == 1
    for replicated in (lay + "self_attention.linear_proj.bias", lay + "mlp.linear_fc2.bias",
                       "merger.linear_fc2.bias", "merger.ln_q.weight", "patch_embed.weight",
                       lay + "input_layernorm.weight"):
        assert partition_dim(replicated) is None, replicated
    shards = [shard_vision_state_dict(sd, r, 2) for r in range(2)]
    fc1 = sd[lay + "mlp.linear_fc1.weight"]
    assert torch.equal(shards[1][lay + "mlp.linear_fc1.weight"], fc1[fc1.shape[0] // 2:])  # plain
    assert torch.equal(shards[0]["merger.linear_fc2.bias"], sd["merger.linear_fc2.bias"])
    assert shards[0][lay + "self_attention.linear_qkv.weight"].shape == (48, 32)  # 1 whole head
    back = unshard_vision_state_dict(shards)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# --- config: TP/SP/PP of the ViT ----------------------------------------------------------------

def test_vit_config_never_pipelined_or_sequence_parallel():
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    cfg = load_config(None, ["model.vision.depth=4", "parallel.tensor_model_parallel_size=2",
                             "parallel.pipeline_model_parallel_size=2",
                             "parallel.sequence_parallel=true", "model.llm.num_layers=4"])
    tc = vision_transformer_config(cfg)
    assert tc.tensor_model_parallel_size == 2
    assert tc.pipeline_model_parallel_size == 1 and tc.virtual_pipeline_model_parallel_size is None
    assert not tc.sequence_parallel and tc.context_parallel_size == 1
    assert tc.ffn_hidden_size == 128 and tc.kv_channels == 16 and not tc.gated_linear_unit
    assert tc.add_bias_linear and tc.add_qkv_bias and tc.layernorm_epsilon == 1e-6
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(tc.activation_func(x), x * torch.sigmoid(1.702 * x))
    for pp_rank in (0, 1):  # every stage would build all layers, numbered from 1
        assert get_num_layers_to_build(tc, pp_rank=pp_rank) == 4
        assert get_transformer_layer_offset(tc, pp_rank=pp_rank) == 0
    # The pitfall this guards against: a ViT config that inherits the LLM's PP=2.
    naive = _vision_config(VisionConfig(depth=4), pipeline_model_parallel_size=2)
    assert get_num_layers_to_build(naive, pp_rank=1) == 2
    assert get_transformer_layer_offset(naive, pp_rank=1) == 2
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=1"):
        VisionEncoder(VisionConfig(depth=4), 64, config=naive, transformer_impl="local")


def test_example_yaml_real_size():
    cfg = load_config(REPO / "examples/model/qwen2vl_vision.yaml")
    v = cfg.model.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.mlp_ratio) == (32, 1280, 16, 4.0)
    assert v.merger_hidden_size == 3584
    tc = vision_transformer_config(cfg)
    assert (tc.num_layers, tc.ffn_hidden_size, tc.kv_channels) == (32, 5120, 80)
    n_params = sum(math.prod(s) for s in expected_hf_vision_shapes(v).values())
    assert 660e6 < n_params < 690e6  # "~675M" (docs/recipe.md section 1)
    d = VisionConfig()
    assert (d.depth, d.hidden_size, d.num_heads) == (2, 32, 2)  # tiny defaults


# --- FLOPs --------------------------------------------------------------------------------------

def test_vision_flops_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    hf = hf_tower(seed=7, attn="eager")  # eager attention: matmuls the counter sees
    v = vision_cfg(hf)
    x, grid = media_batch()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        hf(x, grid_thw=grid)
    assert vision_flops(grid, v) == counter.get_total_flops()
    assert vision_flops(grid, v, out_hidden=64) == vision_flops(grid.tolist(), v)
    big = load_config(REPO / "examples/model/qwen2vl_vision.yaml")
    one_image = vision_flops([[1, 36, 36]], big)  # 324 LLM tokens
    assert 1.0e12 < one_image < 2.0e12
