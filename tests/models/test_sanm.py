"""SAN-M encoder against a functional re-statement of FunASR's equations, the checkpoint adapter,
and the 256-token audio output.

The reference below reads the weights out of a plain dict (FunASR key names) and writes every step
out by hand in float64: LayerNorm from mean/variance, the FSMN convolution as a sum of shifted
copies, the attention softmax with -inf on padded keys, FunASR's sinusoidal table from its
definition. Module (fp32) vs reference (fp64): max abs error < 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_omni.models.audio import (
    AudioTokenizerHead,
    SANMConfig,
    SANMEncoder,
    num_audio_tokens,
    pad_audio_tokens,
    stack_audio_frames,
)
from megatron_omni.models.audio_features import (
    batch_waveforms_to_features,
    num_fbank_frames,
    num_lfr_frames,
)
from megatron_omni.models.weight_maps.audio import (
    expected_sanm_shapes,
    infer_sanm_config,
    sanm_from_funasr,
    sanm_from_release,
    sanm_to_funasr,
    sanm_to_release,
)

TOL = 1e-5




# ---------------------------------------------------------------------------- reference


def ref_layer_norm(x, weight, bias, eps=1e-12):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_linear(x, p, name):
    return x @ p[name + ".weight"].T + p[name + ".bias"]


def ref_positions(t, depth):
    """FunASR: positions 1..T, inv timescale exp(-i ln(1e4) / (depth/2 - 1)), [sin | cos]."""
    half = depth // 2
    table = torch.zeros(t, depth, dtype=torch.float64)
    for pos in range(1, t + 1):
        for i in range(half):
            angle = pos * math.exp(-i * math.log(10000.0) / (half - 1))
            table[pos - 1, i] = math.sin(angle)
            table[pos - 1, half + i] = math.cos(angle)
    return table


def ref_block(x, p, prefix, lengths, heads, kernel, shift, residual, quirk=False):
    bsz, t, _ = x.shape
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(x.dtype)[..., None]  # [B, T, 1]
    y = ref_layer_norm(x, p[prefix + "norm1.weight"], p[prefix + "norm1.bias"])
    qkv = ref_linear(y, p, prefix + "self_attn.linear_q_k_v")
    d = qkv.shape[-1] // 3
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]

    # FSMN: out[t] = sum_tau w[:, tau] * v_masked[t + tau - left] (zero outside [0, T)).
    v_masked = v * mask
    w = p[prefix + "self_attn.fsmn_block.weight"][:, 0, :]  # [d, K]
    left = (kernel - 1) // 2 + shift
    conv = torch.zeros_like(v_masked)
    for tau in range(kernel):
        off = tau - left
        for tt in range(t):
            src = tt + off
            if 0 <= src < t:
                conv[:, tt] += w[:, tau] * v_masked[:, src]
    memory = (conv + v_masked) * mask

    dk = d // heads
    context = torch.zeros(bsz, t, d, dtype=x.dtype)
    for b in range(bsz):
        valid = torch.arange(t) < lengths[b]
        for h in range(heads):
            sl = slice(h * dk, (h + 1) * dk)
            scores = (q[b, :, sl] / math.sqrt(dk)) @ k[b, :, sl].T  # [T, T]
            if quirk:  # the M2-omni release: masked scores set to 2**-126, zeroed after softmax
                scores = torch.where(valid[None, :], scores, torch.full_like(scores, 2.0**-126))
                probs = torch.softmax(scores, -1) * valid[None, :]
            else:
                scores = torch.where(valid[None, :], scores, torch.full_like(scores, -math.inf))
                probs = torch.softmax(scores, -1)
            context[b, :, sl] = probs @ v[b, :, sl]
    attn = ref_linear(context, p, prefix + "self_attn.linear_out") + memory
    x = x + attn if residual else attn
    z = ref_layer_norm(x, p[prefix + "norm2.weight"], p[prefix + "norm2.bias"])
    ffn = ref_linear(
        torch.relu(ref_linear(z, p, prefix + "feed_forward.w_1")), p, prefix + "feed_forward.w_2"
    )
    return x + ffn


def ref_encoder(features, lengths, p, cfg, quirk=False):
    x = features.double() * math.sqrt(cfg.output_size) + ref_positions(
        features.shape[1], cfg.input_size
    )
    p = {k: v.double() for k, v in p.items()}
    args = (lengths, cfg.attention_heads, cfg.kernel_size, cfg.sanm_shift)
    x = ref_block(x, p, "encoders0.0.", *args, residual=False, quirk=quirk)
    for i in range(cfg.num_blocks - 1):
        x = ref_block(x, p, f"encoders.{i}.", *args, residual=True, quirk=quirk)
    return ref_layer_norm(x, p["after_norm.weight"], p["after_norm.bias"])


def randomized(cfg, seed=0):
    """A module whose every parameter (LayerNorms and FSMN kernels included) is random."""
    torch.manual_seed(seed)
    model = SANMEncoder(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (
                name.endswith("norm1.weight")
                or name.endswith("norm2.weight")
                or name == "after_norm.weight"
            ):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif "fsmn_block" in name:
                param.copy_(0.3 * torch.randn_like(param))
    return model.eval()


def padded_batch(cfg, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    feats = torch.randn(len(lengths), t, cfg.input_size, generator=g)
    for i, n in enumerate(lengths):
        feats[i, n:] = 7.0  # padding content must not matter
    return feats, torch.tensor(lengths)


# ---------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("shift", [0, 2])
def test_encoder_matches_functional_reference(shift):
    cfg = SANMConfig.tiny(kernel_size=5 if shift else 11, sanm_shift=shift)
    model = randomized(cfg)
    feats, lengths = padded_batch(cfg, [13, 9, 4])
    out, out_lengths = model(feats, lengths)
    ref = ref_encoder(feats, lengths, dict(model.state_dict()), cfg)
    assert out.dtype == torch.float32 and torch.equal(out_lengths, lengths)
    for b, n in enumerate(lengths.tolist()):
        err = (out[b, :n].double() - ref[b, :n]).abs().max().item()
        assert err < TOL, (b, err)
        assert torch.all(out[b, n:] == 0)


def test_padded_batch_equals_each_clip_alone():
    cfg = SANMConfig.tiny()
    model = randomized(cfg, seed=3)
    feats, lengths = padded_batch(cfg, [12, 5, 1, 8], seed=4)
    out, _ = model(feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone, _ = model(feats[b : b + 1, :n])
        torch.testing.assert_close(out[b, :n], alone[0], atol=TOL, rtol=0)


def test_release_mask_quirk_matches_reference_and_only_matters_with_padding():
    cfg = SANMConfig.tiny(release_mask_quirk=True)
    model = randomized(cfg, seed=5)
    feats, lengths = padded_batch(cfg, [10, 6], seed=6)
    out, _ = model(feats, lengths)
    ref = ref_encoder(feats, lengths, dict(model.state_dict()), cfg, quirk=True)
    assert (out[1, :6].double() - ref[1, :6]).abs().max() < TOL
    assert (out[0].double() - ref[0]).abs().max() < TOL
    clean = SANMEncoder(SANMConfig.tiny()).eval()
    clean.load_state_dict(model.state_dict())
    clean_out, _ = clean(feats, lengths)
    torch.testing.assert_close(out[0], clean_out[0], atol=TOL, rtol=0)  # no padding: same
    assert (out[1, :6] - clean_out[1, :6]).abs().max() > 1e-3  # padding: the bug shows


def test_fp32_under_bf16_autocast():
    cfg = SANMConfig.tiny()
    model = randomized(cfg, seed=7)
    feats, lengths = padded_batch(cfg, [9, 7], seed=8)
    plain, _ = model(feats, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = model(feats, lengths)
        from_bf16, _ = model(feats.bfloat16(), lengths)
    assert auto.dtype == torch.float32 and from_bf16.dtype == torch.float32
    torch.testing.assert_close(auto, plain, atol=1e-6, rtol=0)
    expected, _ = model(feats.bfloat16().float(), lengths)
    torch.testing.assert_close(from_bf16, expected, atol=1e-6, rtol=0)


def test_bad_encoder_input():
    model = SANMEncoder(SANMConfig.tiny())
    with pytest.raises(ValueError, match="560"):
        model(torch.zeros(1, 4, 80))
    with pytest.raises(ValueError, match="length"):
        model(torch.zeros(2, 4, 560), torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="length"):
        model(torch.zeros(2, 4, 560), torch.tensor([5, 2]))
    with pytest.raises(TypeError, match="float32"):
        model.to(torch.bfloat16)(torch.zeros(1, 4, 560))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        SANMConfig(output_size=510)
    with pytest.raises(ValueError, match="sanm_shift"):
        SANMConfig(kernel_size=11, sanm_shift=6)
    with pytest.raises(ValueError, match="even"):
        SANMConfig(input_size=559)


def test_full_size_layout_matches_the_release():
    """Paraformer-large: 50 blocks, names and shapes as docs/recipe.md section 6 (meta device)."""
    shapes = expected_sanm_shapes(SANMConfig())
    assert shapes["encoders0.0.self_attn.linear_q_k_v.weight"] == (1536, 560)
    assert shapes["encoders0.0.norm1.weight"] == (560,)
    assert shapes["encoders.48.self_attn.fsmn_block.weight"] == (512, 1, 11)
    assert shapes["encoders.48.feed_forward.w_1.weight"] == (2048, 512)
    assert shapes["after_norm.bias"] == (512,)
    assert "encoders.49.norm1.weight" not in shapes
    assert len(shapes) == 50 * 13 + 2
    with torch.device("meta"):
        model = SANMEncoder(SANMConfig())
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {
        1e-12
    }  # FunASR's


# ---------------------------------------------------------------------------- adapter


BLOCK_PARAMS = {  # FunASR names -> shape as a function of (d_in, d, ffn, kernel), written out here
    "self_attn.linear_q_k_v.weight": lambda i, d, f, k: (3 * d, i),
    "self_attn.linear_q_k_v.bias": lambda i, d, f, k: (3 * d,),
    "self_attn.fsmn_block.weight": lambda i, d, f, k: (d, 1, k),
    "self_attn.linear_out.weight": lambda i, d, f, k: (d, d),
    "self_attn.linear_out.bias": lambda i, d, f, k: (d,),
    "feed_forward.w_1.weight": lambda i, d, f, k: (f, d),
    "feed_forward.w_1.bias": lambda i, d, f, k: (f,),
    "feed_forward.w_2.weight": lambda i, d, f, k: (d, f),
    "feed_forward.w_2.bias": lambda i, d, f, k: (d,),
    "norm1.weight": lambda i, d, f, k: (i,),
    "norm1.bias": lambda i, d, f, k: (i,),
    "norm2.weight": lambda i, d, f, k: (d,),
    "norm2.bias": lambda i, d, f, k: (d,),
}


def funasr_checkpoint(cfg, prefix="encoder.", seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    blocks = [("encoders0.0.", cfg.input_size)]
    blocks += [(f"encoders.{i}.", cfg.output_size) for i in range(cfg.num_blocks - 1)]
    for block, d_in in blocks:
        for name, shape in BLOCK_PARAMS.items():
            size = shape(d_in, cfg.output_size, cfg.linear_units, cfg.kernel_size)
            sd[prefix + block + name] = torch.randn(size, generator=g)
    for name in ("after_norm.weight", "after_norm.bias"):
        sd[prefix + name] = torch.randn(cfg.output_size, generator=g)
    return sd


def test_adapter_round_trip_funasr():
    cfg = SANMConfig.tiny()
    ckpt = funasr_checkpoint(cfg)
    ckpt["decoder.decoders.0.norm1.weight"] = torch.ones(3)  # other Paraformer parts are ignored
    ckpt["predictor.cif_output.bias"] = torch.ones(1)
    model = SANMEncoder(cfg)
    model.load_state_dict(sanm_from_funasr(ckpt, cfg), strict=True)
    fsmn = ckpt["encoder.encoders.1.self_attn.fsmn_block.weight"]
    assert torch.equal(model.encoders[1].self_attn.fsmn_block.weight, fsmn)
    assert torch.equal(model.encoders0[0].norm1.bias, ckpt["encoder.encoders0.0.norm1.bias"])
    back = sanm_to_funasr(model.state_dict(), cfg)
    encoder_keys = {k for k in ckpt if k.startswith("encoder.")}
    assert set(back) == encoder_keys
    for key in encoder_keys:
        assert torch.equal(back[key], ckpt[key]), key


def test_adapter_round_trip_release_and_inferred_config():
    cfg = SANMConfig.tiny(num_blocks=4, kernel_size=7)
    ckpt = funasr_checkpoint(cfg, prefix="audio_model.encoder.", seed=2)
    ckpt["language_model.model.norm.weight"] = torch.ones(8)
    inferred = infer_sanm_config(ckpt, prefix="audio_model.encoder.", attention_heads=2)
    got = (
        inferred.input_size,
        inferred.output_size,
        inferred.linear_units,
        inferred.num_blocks,
        inferred.kernel_size,
    )
    assert got == (560, 64, 128, 4, 7)
    ours = sanm_from_release(ckpt)  # config read off the checkpoint
    model = SANMEncoder(inferred)
    model.load_state_dict(ours, strict=True)
    back = sanm_to_release(model.state_dict())
    assert set(back) == {k for k in ckpt if k.startswith("audio_model.encoder.")}
    assert all(torch.equal(back[k], ckpt[k]) for k in back)


def test_adapter_errors_list_the_keys():
    cfg = SANMConfig.tiny()
    ckpt = funasr_checkpoint(cfg)
    unknown = dict(ckpt)
    unknown["encoder.encoders.0.self_attn.linear_k.weight"] = torch.zeros(64, 64)
    with pytest.raises(
        ValueError, match=r"unknown 1 key\(s\): encoders\.0\.self_attn\.linear_k\.weight"
    ):
        sanm_from_funasr(unknown, cfg)
    missing = dict(ckpt)
    del missing["encoder.after_norm.bias"], missing["encoder.encoders.1.norm2.weight"]
    with pytest.raises(
        ValueError, match=r"missing 2 key\(s\): after_norm\.bias, encoders\.1\.norm2\.weight"
    ):
        sanm_from_funasr(missing, cfg)
    wrong = dict(ckpt)
    wrong["encoder.encoders.0.self_attn.fsmn_block.weight"] = torch.zeros(64, 1, 9)
    with pytest.raises(ValueError, match="wrong shape.*fsmn_block"):
        sanm_from_funasr(wrong, cfg)
    with pytest.raises(ValueError, match="no keys start with"):
        sanm_from_release(ckpt)
    ours = sanm_from_funasr(ckpt, cfg)
    ours["encoders.7.norm1.weight"] = torch.ones(64)
    with pytest.raises(ValueError, match="unknown"):
        sanm_to_funasr(ours, cfg)


# ---------------------------------------------------------------------------- audio tokens


def test_stack_audio_frames_concatenates_triples_and_drops_the_tail():
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(3, 10, 4, generator=g)
    tokens, token_lengths = stack_audio_frames(hidden, torch.tensor([10, 5, 2]))
    assert tokens.shape == (3, 3, 12)
    assert token_lengths.tolist() == [3, 1, 0]
    for b, n_tok in enumerate(token_lengths.tolist()):
        for j in range(n_tok):
            expected = torch.cat([hidden[b, 3 * j], hidden[b, 3 * j + 1], hidden[b, 3 * j + 2]])
            assert torch.equal(tokens[b, j], expected)
        assert torch.all(tokens[b, n_tok:] == 0)
    assert [num_audio_tokens(n) for n in (10, 5, 2)] == [3, 1, 0]


def test_pad_audio_tokens_short_and_long_clips():
    g = torch.Generator().manual_seed(10)
    h = 16
    short, long = torch.randn(5, h, generator=g), torch.randn(300, h, generator=g)
    pad = torch.randn(h, generator=g)
    out = pad_audio_tokens([short, long], pad)
    assert out.shape == (2, 256, h)
    assert torch.equal(out[0, :5], short)
    assert all(torch.equal(out[0, r], pad) for r in range(5, 256))
    assert torch.equal(out[1], long[:256])
    # the same clips as one padded tensor + lengths
    padded = torch.zeros(2, 300, h)
    padded[0, :5], padded[1] = short, long
    assert torch.equal(pad_audio_tokens(padded, pad, lengths=[5, 300]), out)
    # release behaviour: L2-normalise every row after padding, pad rows included
    normed = pad_audio_tokens([short, long], pad, l2_normalize=True)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(2, 256))
    torch.testing.assert_close(normed[0, 100], pad / pad.norm())
    with pytest.raises(ValueError, match="pad_embedding"):
        pad_audio_tokens([short], torch.zeros(h + 1))


def test_waveforms_to_256_llm_tokens():
    """Waveform -> features -> tiny SAN-M -> 3-frame tokens -> projector -> 256 rows per clip."""
    cfg = SANMConfig.tiny()
    model = randomized(cfg, seed=11)
    g = torch.Generator().manual_seed(12)
    waves = [0.1 * torch.randn(16000, generator=g), 0.1 * torch.randn(47 * 16000, generator=g)]
    feats, lengths = batch_waveforms_to_features(waves, 16000)
    expected_frames = [num_lfr_frames(num_fbank_frames(w.numel())) for w in waves]
    assert lengths.tolist() == expected_frames == [17, 783]
    with torch.no_grad():
        hidden, lengths = model(feats, lengths)
        tokens, token_lengths = AudioTokenizerHead()(hidden, lengths)
        assert tokens.shape == (2, 256, 3 * cfg.output_size)
        assert token_lengths.tolist() == [5, 256]  # 17 // 3 real tokens; 783 // 3 = 261, capped
        projector = torch.nn.Linear(3 * cfg.output_size, 32)
        projected = projector(tokens)
        pad = torch.randn(32, generator=g)
        out = pad_audio_tokens(projected, pad, lengths=token_lengths)
    assert out.shape == (2, 256, 32)
    torch.testing.assert_close(out[0, :5], projected[0, :5])
    assert torch.equal(out[0, 5:], pad.expand(251, 32))
    torch.testing.assert_close(out[1], projected[1])
