"""The ViT under TP=2 (LLM sequence-parallel on, ViT not) and under PP=2 / virtual PP equals the
TP=PP=1 reference in features, input gradient and (sharded) weight gradients (2 gloo ranks)."""

import pytest
from dist_utils import run_workers

DEPTH = 4


@pytest.fixture(scope="module")
def results():
    return run_workers("vision_parallel.py", 2)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_vpp2"])
def test_layout_matches_reference(results, layout):
    r = results[layout]
    assert r["params_compared"] == results["ref_params"], r
    assert r["features"] < 1e-5, r
    # Gradients: max abs error relative to the largest reference entry.
    assert r["input_grad"] < 1e-5 * r["input_grad_scale"], r
    assert r["param_grad"] < 1e-5 * r["grad_scale"], r
    assert r["grad_scale"] > 1e-3 and r["input_grad_scale"] > 1e-6, r  # not trivially zero
    assert not r["sequence_parallel"], r


@pytest.mark.slow
def test_tp2_really_shards(results):
    r = results["tp2"]
    assert r["qkv_rows"] == [r["expected_qkv_rows"]] * 2 == [48, 48]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2", "pp2_vpp2"])
def test_pipeline_never_splits_the_vit(results, layout):
    r = results[layout]
    assert r["num_layers"] == [DEPTH, DEPTH], r
    assert r["layer_numbers"] == [list(range(1, DEPTH + 1))] * 2, r
    assert r["qkv_rows"] == [96, 96]
    assert results["pp2_first_stage"]  # rank 0 is the first stage, where the ViT lives
    assert results["pp2_vit_pp_size"] == 1
    # Without the guard, megatron-core would have split it: 2 layers per stage.
    assert results["pp2_naive_layers"] == [DEPTH // 2, DEPTH // 2]
