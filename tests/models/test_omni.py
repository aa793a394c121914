"""Omni model (single process): splicing, isolation of packed samples, losses by token kind,
freezing."""

import pytest
import torch
import torch.nn.functional as F
from omni_batch import omni_batch, tiny_omni_cfg

from megatron_omni.models.attention import packed_seq_params
from megatron_omni.models.omni import (
    OmniModel,
    SpliceError,
    load_full_omni_state,
    set_trainable,
    special_token_ids,
    token_kinds,
)


def run(model, b, **kw):
    args = dict(labels=b["labels"], packed_seq_params=packed_seq_params(b["cu_seqlens"]),
                vision_patches=b["vision_patches"], vision_grid_thw=b["vision_grid_thw"],
                audio_waveforms=b["audio_waveforms"], sample_names=b["sample_names"])
    args.update(kw)
    return model(b["tokens"], b["position_ids"], **args)


@pytest.fixture(scope="module")
def model(single_rank):
    torch.manual_seed(0)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(3)
    return OmniModel(tiny_omni_cfg()).eval()


def sample_alone(b, i):
    """Sample i of a packed batch as its own batch (with only its own media)."""
    from megatron_omni.models.rope_index import get_packed_rope_index

    cu = b["cu_seqlens"].tolist()
    a, e = cu[i], cu[i + 1]
    cfg = tiny_omni_cfg()
    sp = special_token_ids(cfg)
    tokens = b["tokens"][:, a:e]
    grids = b["vision_grid_thw"]
    # Media items in order of appearance: count those before sample i.
    vis_before = sum(1 for j in range(i) for _ in range(_n_blocks(b, j, (sp.image_start,
                                                                          sp.video_start))))
    vis_here = _n_blocks(b, i, (sp.image_start, sp.video_start))
    aud_before = sum(_n_blocks(b, j, (sp.audio_start,)) for j in range(i))
    aud_here = _n_blocks(b, i, (sp.audio_start,))
    my_grids = grids[vis_before:vis_before + vis_here] if grids is not None else None
    patches = None
    if my_grids is not None and len(my_grids):
        start = int(grids[:vis_before].prod(-1).sum()) if vis_before else 0
        patches = b["vision_patches"][start:start + int(my_grids.prod(-1).sum())]
    images = [tuple(g) for g, t in zip(my_grids.tolist(), _kinds(b, i, sp))
              if t == "image"] if my_grids is not None else []
    videos = [tuple(g) for g, t in zip(my_grids.tolist(), _kinds(b, i, sp))
              if t == "video"] if my_grids is not None else []
    cu1 = torch.tensor([0, e - a], dtype=torch.int32)
    pos = get_packed_rope_index(tokens[0], cu1, image_grid_thw=images or None,
                                video_grid_thw=videos or None, token_ids=sp)
    return dict(tokens=tokens, labels=b["labels"][:, a:e], loss_mask=b["loss_mask"][:, a:e],
                position_ids=pos[:, None], cu_seqlens=cu1,
                vision_patches=patches,
                vision_grid_thw=my_grids if my_grids is not None and len(my_grids) else None,
                audio_waveforms=(b["audio_waveforms"][aud_before:aud_before + aud_here]
                                 if aud_here else None),
                sample_names=[b["sample_names"][i]])


def _n_blocks(b, i, starts):
    cu = b["cu_seqlens"].tolist()
    seg = b["tokens"][0, cu[i]:cu[i + 1]]
    return int(sum((seg == s).sum() for s in starts))


def _kinds(b, i, sp):
    cu = b["cu_seqlens"].tolist()
    seg = b["tokens"][0, cu[i]:cu[i + 1]].tolist()
    return ["image" if t == sp.image_start else "video" for t in seg
            if t in (sp.image_start, sp.video_start)]


def test_packed_omni_row_equals_samples_alone(model):
    cfg = tiny_omni_cfg()
    b = omni_batch(cfg, seed=4)
    with torch.no_grad():
        packed = run(model, b)
        for i, name in enumerate(b["sample_names"]):
            if name == "pad":
                continue
            alone = sample_alone(b, i)
            out = run(model, alone)
            cu = b["cu_seqlens"].tolist()
            diff = (packed[:, cu[i]:cu[i + 1]] - out).abs().max().item()
            assert diff < 1e-5, (name, diff)


def test_media_changes_the_loss(model):
    """Encoders really feed the LLM: other pixels / other audio give other losses."""
    cfg = tiny_omni_cfg()
    b = omni_batch(cfg, seed=5)
    with torch.no_grad():
        base = run(model, b)
        pix = run(model, b, vision_patches=b["vision_patches"] + 1.0)
        aud = run(model, b, audio_waveforms=[w.flip(0) for w in b["audio_waveforms"]])
    assert (base - pix).abs().max() > 1e-4
    assert (base - aud).abs().max() > 1e-4


def test_audio_rows_are_padded_with_end_of_audio(model):
    cfg = tiny_omni_cfg()
    b = omni_batch(cfg, seed=6)
    sp = special_token_ids(cfg)
    with torch.no_grad():
        emb = model.embed(b["tokens"], b["vision_patches"], b["vision_grid_thw"],
                          b["audio_waveforms"])[:, 0]
        eoa = model.llm.embedding.word_embeddings(torch.tensor([[sp.end_of_audio]]))[0, 0]
    audio_pos = (b["tokens"][0] == sp.audio_patch).nonzero().flatten()
    assert audio_pos.numel() == 2 * 256
    # clip 0: 0.5 s -> 8 LFR frames -> 2 real tokens; the remaining 254 rows are the pad row
    first = emb[audio_pos[:256]]
    pad = F.normalize(eoa, dim=-1)
    assert torch.allclose(first[2:], pad.expand(254, -1), atol=1e-6)
    assert not torch.allclose(first[0], pad, atol=1e-3)
    assert torch.allclose(first.norm(dim=-1), torch.ones(256), atol=1e-5)


def test_splice_mismatch_names_the_sample(model):
    cfg = tiny_omni_cfg()
    b = omni_batch(cfg, seed=7)
    sp = special_token_ids(cfg)
    tokens = b["tokens"].clone()
    pos = (tokens[0] == sp.audio_patch).nonzero().flatten()[-1]
    tokens[0, pos] = 5  # one audio patch token too few in sample audio1
    with pytest.raises(SpliceError, match=r"sample audio1 .*255 patch tokens but 256"):
        run(model, dict(b, tokens=tokens))
    tokens = b["tokens"].clone()
    vpos = (tokens[0] == sp.video_patch).nonzero().flatten()[0]
    tokens[0, vpos] = 5
    with pytest.raises(SpliceError, match=r"sample video0 .*11 patch tokens but 12"):
        run(model, dict(b, tokens=tokens))
    with pytest.raises(SpliceError, match="no audio inputs"):
        run(model, b, audio_waveforms=None)
    with pytest.raises(SpliceError, match="no vision inputs"):
        run(model, b, vision_patches=None, vision_grid_thw=None)


def test_token_kinds_worked_example():
    cfg = tiny_omni_cfg()
    sp = special_token_ids(cfg)
    s = sp.speech_offset
    labels = torch.tensor([[5, 6, sp.gen_image_start, 7, 8, sp.gen_image_end, 9,
                            sp.gen_audio_start, s + 1, s + 2, sp.gen_audio_end, 10, s + 4]])
    k = token_kinds(labels, sp)
    assert k["gen_image"][0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert k["gen_audio"][0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1]
    assert k["text"][0].tolist() == [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]


def test_frozen_parts_get_no_gradients(single_rank):
    cfg = tiny_omni_cfg()
    model = OmniModel(cfg)
    counts = set_trainable(model, vision=False, audio=False, projectors=True, llm=False)
    assert counts["projectors"] > 0 and counts["llm"] == counts["vision"] == counts["audio"] == 0
    b = omni_batch(cfg, seed=8)
    out = run(model, b)
    (out * b["loss_mask"]).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith(("linear_proj.", "linear_proj_audio.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_full_state_round_trip_loads_all_weights(single_rank):
    cfg = tiny_omni_cfg()
    a, b2 = OmniModel(cfg), OmniModel(cfg)
    load_full_omni_state(b2, a.state_dict())
    sa, sb = a.state_dict(), b2.state_dict()
    assert list(sa) == list(sb)
    checked = 0
    for name, t in sa.items():
        if isinstance(t, torch.Tensor):  # megatron's local linears keep None _extra_state
            assert torch.equal(t, sb[name]), name
            checked += 1
    assert checked > 50


def test_cmvn_file_from_config_normalises_audio_features(single_rank, tmp_path):
    vec = " ".join(["-1.5"] * 560)
    scale = " ".join(["0.25"] * 560)
    path = tmp_path / "am.mvn"
    path.write_text("<Nnet>\n<Splice> 560 560\n[ 0 ]\n"
                    f"<AddShift> 560 560\n<LearnRateCoef> 0 [ {vec} ]\n"
                    f"<Rescale> 560 560\n<LearnRateCoef> 0 [ {scale} ]\n</Nnet>\n")
    cfg = tiny_omni_cfg(f"model.audio.cmvn_file={path}", vision=False)
    torch.manual_seed(0)
    with_cmvn = OmniModel(cfg)
    plain = OmniModel(tiny_omni_cfg(vision=False))
    plain.load_state_dict(with_cmvn.state_dict())
    assert with_cmvn.cmvn is not None and plain.cmvn is None
    assert torch.allclose(with_cmvn.cmvn.inv_stddev, torch.full((560,), 0.25))
    waves = [torch.randn(8000) * 0.1]
    with torch.no_grad():
        a, b = with_cmvn.audio_features(waves), plain.audio_features(waves)
    assert (a - b).abs().max() > 1e-3
