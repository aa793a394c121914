"""tools/convert_checkpoint.py: import / export / verify, streaming maps, refusals.

The slow round trip builds tiny random transformers models (Llama with llama3 rope scaling and
GQA, sharded safetensors; a Qwen2-VL; a FunASR SAN-M state dict), imports them together at
TP=2 x PP=2 (the tool launches 4 gloo ranks; the llama3 scaling is dropped, as for M2-omni),
exports the result and checks every tensor against the originals. Fast tests run in this
process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from dist_utils import REPO
from safetensors.torch import save_file

from megatron_omni.convert.checkpoint_io import (
    ShardedSafetensorsWriter,
    TensorSource,
    load_safetensors_dir,
    parse_size,
    partial_dir,
)
from megatron_omni.models.weight_maps import audio as sanm_map
from megatron_omni.models.weight_maps.core import (
    ConversionError,
    export_tensors,
    full_from_plans,
    read_local,
)
from megatron_omni.models.weight_maps.llm import links as llama_links
from megatron_omni.models.weight_maps.vision import links as vision_links
from megatron_omni.training.lora import lora_pairs, merge_lora

TOOL = REPO / "tools" / "convert_checkpoint.py"


def tool_main(*argv) -> int:
    """Run the CLI in this process (same code path as the command line, minus the launch)."""
    from megatron_omni.cli.convert_checkpoint import main

    return main([str(a) for a in argv])


def run_cli(*argv, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(TOOL), *map(str, argv)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# --- tiny sources --------------------------------------------------------------------------------

def make_llama(d: Path, vocab: int = 100, seed: int = 3, shard: str = "60KB"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=131072, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                       "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(d, max_shard_size=shard)  # several shards + index
    return model


def make_qwen2vl(d: Path, seed: int = 4):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=48, mlp_ratio=4,
                           in_chans=3),
        text_config=dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, vocab_size=100,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(d)
    return model


def make_funasr(d: Path, seed: int = 5) -> dict:
    import yaml

    from megatron_omni.models.audio import SANMConfig, SANMEncoder
    from megatron_omni.models.weight_maps.audio import sanm_to_funasr

    torch.manual_seed(seed)
    c = SANMConfig(input_size=560, output_size=32, attention_heads=2, linear_units=64,
                   num_blocks=3, kernel_size=11)
    enc = SANMEncoder(c)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = sanm_to_funasr(enc.state_dict(), c)
    sd["decoder.embed.0.weight"] = torch.randn(10, 4)  # not ours: ignored
    sd["ctc.ctc_lo.weight"] = torch.randn(10, 32)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(sd, d / "model.pt")
    (d / "config.yaml").write_text(yaml.safe_dump({"encoder": "SANMEncoder", "encoder_conf": {
        "output_size": 32, "attention_heads": 2, "linear_units": 64, "num_blocks": 3,
        "kernel_size": 11, "sanm_shfit": 0}}))
    return sd


def fake_llama_dir(d: Path, vocab: int = 40, rope_scaling: Optional[dict] = None) -> dict:
    """A small Llama directory written without transformers (random tensors of the right
    shapes): for the refusal tests."""
    from megatron_omni.config import LLMConfig
    from megatron_omni.models.weight_maps.llm import megatron_to_hf

    llm = LLMConfig(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
                    num_query_groups=1, vocab_size=vocab, mrope_section=[1, 1, 2])
    g = torch.Generator().manual_seed(0)
    h, f, d_ = 16, 32, 8
    mg = {"embedding.word_embeddings.weight": torch.randn(vocab, h, generator=g),
          "decoder.layers.0.input_layernorm.weight": torch.randn(h, generator=g),
          "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(4 * d_, h,
                                                                           generator=g),
          "decoder.layers.0.self_attention.linear_proj.weight": torch.randn(h, 2 * d_,
                                                                            generator=g),
          "decoder.layers.0.pre_mlp_layernorm.weight": torch.randn(h, generator=g),
          "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(2 * f, h, generator=g),
          "decoder.layers.0.mlp.linear_fc2.weight": torch.randn(h, f, generator=g),
          "decoder.final_layernorm.weight": torch.randn(h, generator=g),
          "output_layer.weight": torch.randn(vocab, h, generator=g)}
    sd = megatron_to_hf(mg, llm)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": h, "intermediate_size": f,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": rope_scaling}))
    save_file(sd, str(d / "model.safetensors"))
    return sd


class Payload:
    """A custom class inside a pickle: needs code to unpickle."""

    def __init__(self):
        self.x = 1


def _no_output(out: Path) -> bool:
    return not out.exists() and not partial_dir(out).exists()


# --- fast tests ----------------------------------------------------------------------------------

def test_help_lists_subcommands_and_options():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for word in ("import", "export", "verify"):
        assert word in r.stdout
    r = run_cli("import", "--help")
    assert r.returncode == 0
    for opt in ("--llama", "--qwen2vl", "--funasr", "--release", "--tp", "--pp", "--force",
                "--config", "KEY=VALUE", "--seed"):
        assert opt in r.stdout, opt
    r = run_cli("export", "--help")
    for opt in ("--format", "--max-shard-size", "--force", "--lora-scale"):
        assert opt in r.stdout, opt
    assert "--tolerance" in run_cli("verify", "--help").stdout


def _save(tmp_path, name, state):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return TensorSource.open(path)


def test_row_plans_from_disk_match_the_in_memory_maps_and_tp_slices(tmp_path):
    """The weight maps read slice by slice from safetensors files give exactly what the
    whole-dict helpers give in memory, every streamed TP slice equals sharding.py's split of the
    full tensor, and export_tensors inverts the import."""
    from megatron_omni.config import LLMConfig, VisionConfig
    from megatron_omni.models.audio import SANMConfig
    from megatron_omni.models.weight_maps.audio import expected_sanm_shapes, sanm_from_funasr
    from megatron_omni.models.weight_maps.llm import hf_to_megatron, megatron_to_hf
    from megatron_omni.models.weight_maps.sharding import shard_tensor
    from megatron_omni.models.weight_maps.vision import (
        expected_hf_vision_shapes,
        hf_to_vision,
        vision_to_hf,
    )

    g = torch.Generator().manual_seed(1)
    llm = LLMConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                    num_query_groups=2, vocab_size=60, mrope_section=[1, 1, 2])
    ref_mg = {k: torch.randn(v.shape, generator=g) for k, v in hf_to_megatron(
        {k: torch.zeros(s) for k, s in _llama_shapes(llm).items()}, llm, 64).items()}
    hf = megatron_to_hf(ref_mg, llm)
    src = _save(tmp_path, "llama", hf)
    links = llama_links(llm, ours="", hf="")
    full = full_from_plans(links, src, {"embedding.word_embeddings.weight": 64,
                                        "output_layer.weight": 64})
    ref = hf_to_megatron(hf, llm, 64)
    assert set(full) == set(ref)
    for k in ref:
        if "word_embeddings" in k or "output_layer" in k:
            assert torch.equal(full[k][:60], ref[k][:60]), k
            assert torch.equal(full[k][60:], torch.zeros(4, 32)), k
        else:
            assert torch.equal(full[k], ref[k]), k
        back = export_tensors(next(link for link in links if link.ours == k), full[k])
        for name, t in back.items():
            assert torch.equal(t, hf[name]), name
    gated = lambda n: True  # noqa: E731 - the LLM's MLPs are gated
    for tp in (2,):
        for r in range(tp):
            for link in links:
                want = shard_tensor(link.ours, full[link.ours], r, tp, gated_mlp=True)
                got = read_local(link, src, want.shape, r, tp, gated)
                assert torch.equal(got, want), (link.ours, r)

    vis = VisionConfig(depth=2, hidden_size=32, num_heads=2)
    hfv = {"visual." + k: torch.randn(s, generator=g)
           for k, s in expected_hf_vision_shapes(vis, 40).items()}
    srcv = _save(tmp_path, "vision", hfv)
    vlinks = vision_links(vis, ours="", hf="visual.")
    fullv = full_from_plans(vlinks, srcv)
    refv = hf_to_vision(hfv, vis, 40, prefix="visual.")
    assert set(fullv) == set(refv) and all(torch.equal(fullv[k], refv[k]) for k in refv)
    never = lambda n: False  # noqa: E731 - ViT MLPs are plain
    for r in range(2):
        for link in vlinks:
            want = shard_tensor(link.ours, fullv[link.ours], r, 2, gated_mlp=False)
            assert torch.equal(read_local(link, srcv, want.shape, r, 2, never), want), link.ours
    backv = vision_to_hf(fullv, vis, 40, prefix="visual.")
    for link in vlinks:
        for name, t in export_tensors(link, fullv[link.ours]).items():
            assert torch.equal(t, backv[name]), name

    sc = SANMConfig(input_size=20, output_size=8, attention_heads=2, linear_units=16,
                    num_blocks=2, kernel_size=3)
    hfa = {"encoder." + k: torch.randn(s, generator=g)
           for k, s in expected_sanm_shapes(sc).items()}
    srca = _save(tmp_path, "sanm", hfa)
    fulla = full_from_plans(sanm_map.links(sc), srca)
    refa = sanm_from_funasr(hfa, sc)
    assert set(fulla) == set(refa) and all(torch.equal(fulla[k], refa[k]) for k in refa)

    # A shape that does not fit the config is named.
    bad = dict(hf)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(24, 32)
    src_bad = _save(tmp_path, "bad", bad)
    qkv = next(link for link in links if link.ours.endswith("0.self_attention.linear_qkv.weight"))
    with pytest.raises(ConversionError, match="k_proj"):
        read_local(qkv, src_bad, (64, 32), 0, 1, gated)


def _llama_shapes(llm):
    h, f, d = llm.hidden_size, llm.ffn_hidden_size, llm.head_dim
    out = {"model.embed_tokens.weight": (llm.vocab_size, h), "model.norm.weight": (h,),
           "lm_head.weight": (llm.vocab_size, h)}
    for i in range(llm.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (llm.num_attention_heads * d, h),
                    p + "self_attn.k_proj.weight": (llm.num_query_groups * d, h),
                    p + "self_attn.v_proj.weight": (llm.num_query_groups * d, h),
                    p + "self_attn.o_proj.weight": (h, llm.num_attention_heads * d),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
    return out


def test_writer_streams_shards_with_index(tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(ConversionError):
        parse_size("lots")
    w = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=1000)
    tensors = {f"t{i}": torch.full((50,), float(i)) for i in range(12)}  # 200 B each
    tensors["big"] = torch.zeros(600)  # 2400 B > max: a shard of its own
    base = torch.arange(20.0)
    tensors["view"] = base[5:10]  # a view into a larger storage
    for k, v in tensors.items():
        w.add(k, v)
    index = w.close()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == len(set(index["weight_map"].values())) >= 4
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    back = load_safetensors_dir(tmp_path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ConversionError, match="twice"):
        w.add("t0", torch.zeros(1))


def test_import_refuses_truncated_safetensors(tmp_path, capsys):
    src = tmp_path / "llama"
    fake_llama_dir(src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    assert tool_main("import", "--llama", src, "--out", out) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "model.safetensors" in err
    assert _no_output(out)


def test_import_refuses_overlapping_safetensors_offsets(tmp_path, capsys):
    import struct

    src = tmp_path / "llama"
    fake_llama_dir(src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    keys = [k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] >
            v["data_offsets"][0]]
    a, b = sorted(keys, key=lambda k: header[k]["data_offsets"][0])[:2]
    ea, eb = header[a]["data_offsets"], header[b]["data_offsets"]
    header[b]["data_offsets"] = [ea[0], ea[0] + (eb[1] - eb[0])]  # b now shares a's bytes
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    assert len(new) == n
    f.write_bytes(data[:8] + new + data[8 + n:])
    out = tmp_path / "out"
    assert tool_main("import", "--llama", src, "--out", out) == 2
    err = capsys.readouterr().err
    assert "overlap" in err and "model.safetensors" in err and "Traceback" not in err
    assert _no_output(out)


def test_import_refuses_pickle_needing_code(tmp_path, capsys):
    src = tmp_path / "llama"
    sd = fake_llama_dir(src)
    (src / "model.safetensors").unlink()
    torch.save({**sd, "extra": Payload()}, src / "pytorch_model.bin")
    out = tmp_path / "out"
    assert tool_main("import", "--llama", src, "--out", out) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "Payload" in err and "pytorch_model.bin" in err
    assert _no_output(out)
    # The same data without the custom object is accepted up to the config check.
    evil = tmp_path / "funasr.bin"
    torch.save({"encoder.x": Payload()}, evil)
    assert tool_main("import", "--funasr", evil, "--out", out) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert _no_output(out)


def test_import_refuses_existing_output_and_config_conflicts(tmp_path, capsys):
    src = tmp_path / "llama"
    fake_llama_dir(src)
    out = tmp_path / "out"
    out.mkdir()
    assert tool_main("import", "--llama", src, "--out", out) == 2
    assert "--force" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    out2 = tmp_path / "out2"
    assert tool_main("import", "--llama", src, "--out", out2, "model.llm.hidden_size=32") == 2
    assert "model.llm.hidden_size" in capsys.readouterr().err
    assert _no_output(out2)
    # Enabling a part without a source needs --init-missing.
    assert tool_main("import", "--llama", src, "--out", out2, "model.vision.enabled=true") == 2
    assert "--init-missing" in capsys.readouterr().err
    assert _no_output(out2)


def test_lora_pairs_and_merge():
    names = ["a.linear_qkv.weight", "a.linear_qkv.lora_A.weight", "a.linear_qkv.lora_B.weight",
             "b.linear_fc1.weight", "b.linear_fc1.lora_A.default.weight",
             "b.linear_fc1.lora_B.default.weight", "c.weight"]
    pairs = lora_pairs(names)
    assert pairs == {"a.linear_qkv.weight": ("a.linear_qkv.lora_A.weight",
                                             "a.linear_qkv.lora_B.weight"),
                     "b.linear_fc1.weight": ("b.linear_fc1.lora_A.default.weight",
                                             "b.linear_fc1.lora_B.default.weight")}
    with pytest.raises(ConversionError, match="lora_B"):
        lora_pairs(["x.weight", "x.lora_A.weight"])
    w, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    assert torch.allclose(merge_lora(w, a, b, 0.5), w + 0.5 * b @ a)
    with pytest.raises(ConversionError):
        merge_lora(w, a, b.t(), 1.0)


# The authors' config.json format. Field names and nesting learned by reading their public source
# (GitHub alipay/Ant-Multi-Modal-Framework, prj/M2_omni/models; it cannot run here: it needs
# transformers 4.45 and funasr):
#   top level      configuration_m2omni.py, Bailing2Config.__init__: vision_config, audio_config,
#                  llm_config, use_vit_lora, use_llm_lora, mlp_depths (depth of BOTH projectors),
#                  select_layer, num_query_token_{image,video,audio},
#                  num_decoder_{image,audio}_token; the attributes it sets: vision_type, llm_type
#                  and the special-token ids of init_mm_special_tokens (its table minus 1 for
#                  llm_type llama3_1* / llama3_3*); frame_patch_token is read by
#                  modeling_m2omni.py (get_rope_index, prompt_wrap_video) from config.json.
#   audio_config   configuration_m2omni.py, Bailing2AudioConfig.__init__ (the audio_* fields).
#   vision_config  configuration_qwen2_vit.py, Qwen2VLVisionConfig.__init__.
#   llm_config     configuration_llama_3d.py, Llama3dConfig.__init__, + llm_type (Bailing2Config
#                  picks Llama3dConfig when it is "llama3_1_3d"); rope_scaling type "mrope",
#                  which Llama3dConfig turns into "default" (plain rotary frequencies).
# model_type values are the classes' own (what their to_dict writes). Left out: the generic
# PretrainedConfig keys save_pretrained adds (return_dict, output_hidden_states,
# transformers_version, ...), which every config class reads with defaults, and
# _attn_implementation (not serialised). Sizes are tiny; the vocabulary is Llama-3's 128256 + 29
# special tokens + 64 speech codes, so the ids are the release's real ones.
RELEASE_FIXTURE = Path(__file__).parent / "fixtures" / "m2omni_release_config.json"


def _same_tree(got, want, path="") -> list[str]:
    """Differences between two config trees: keys missing/extra at any level, unequal values."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}{k}: missing" for k in want if k not in got]
        out += [f"{path}{k}: not in the release format" for k in got if k not in want]
        for k in want.keys() & got.keys():
            out += _same_tree(got[k], want[k], f"{path}{k}.")
        return out
    return [] if got == want else [f"{path[:-1]}: {got!r} != {want!r}"]


def test_release_fixture_imports_and_exports_key_for_key(single_rank, tmp_path):
    """Issue #9: a config.json in the authors' format is read by `import --release` (with
    weights of its shapes) and `export --format release` writes it back key for key, our
    `megatron_omni` block aside; the audio projector depth comes from mlp_depths."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_omni.convert.release import (
        build_model_from_release,
        omni_config_from_release,
        omni_to_release_state,
    )
    from megatron_omni.models.omni import special_token_ids

    conf = json.loads(RELEASE_FIXTURE.read_text())
    cfg = omni_config_from_release(conf)
    m = cfg.model
    assert (m.projector.vision_depth, m.projector.audio_depth) == (2, 2)
    assert (m.audio.hidden_size, m.audio.num_heads, m.audio.ffn_hidden_size,
            m.audio.num_blocks, m.audio.frames_per_token) == (32, 2, 64, 2, 3)
    assert not m.llm.rope_scaling and m.llm.mrope_section == [2, 3, 3]
    sp = special_token_ids(cfg)
    assert (sp.base_vocab_size, sp.speech_codebook_size) == (128256, 64)
    assert sp.video_patch == conf["frame_patch_token"]

    model_parallel_cuda_manual_seed(11)
    model, mcfg = build_model_from_release(conf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = omni_to_release_state(model.state_dict(), mcfg)
    assert "linear_proj_audio.2.weight" in state
    rel = tmp_path / "release"
    rel.mkdir()
    w = ShardedSafetensorsWriter(rel, 10**9)
    for k in sorted(state):
        w.add(k, state[k])
    w.close()
    shutil.copy(RELEASE_FIXTURE, rel / "config.json")

    ck, out = tmp_path / "ck", tmp_path / "export"
    assert tool_main("import", "--release", rel, "--out", ck, "--no-progress") == 0
    assert tool_main("export", ck, "--out", out, "--no-progress") == 0
    exported = json.loads((out / "config.json").read_text())
    ours = exported.pop("megatron_omni")
    assert ours["base_vocab_size"] == 128256 and ours["format_version"] == 2
    assert _same_tree(exported, conf) == []
    back = load_safetensors_dir(out)
    assert set(back) == set(state)
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_release_config_reads_their_variants_and_refuses_bad_ids():
    """What their save_pretrained writes (rope type "default"), FunASR audio names (older files)
    and a config without mlp_depths read as the fixture; inconsistent ids and our old format are
    refused; an explicit llama3 rope type is the only way to get scaling."""
    import copy

    from megatron_omni.config import to_dict
    from megatron_omni.convert.release import omni_config_from_release, release_model_dict

    conf = json.loads(RELEASE_FIXTURE.read_text())
    want = to_dict(omni_config_from_release(conf).model)
    saved = copy.deepcopy(conf)
    saved["llm_config"]["rope_scaling"] = {"type": "default", "mrope_section": [2, 3, 3],
                                           "rope_type": "default"}
    saved["audio_config"] = {"input_size": 560, "output_size": 32, "attention_heads": 2,
                             "linear_units": 64, "num_blocks": 2, "kernel_size": 11,
                             "sanm_shfit": 0}
    # save_pretrained also writes PretrainedConfig's generic keys; they are ignored.
    saved.update(transformers_version="4.45.0", return_dict=True, _name_or_path="m2omni")
    saved["llm_config"].update(output_hidden_states=False, torch_dtype="float16")
    assert to_dict(omni_config_from_release(saved).model) == want
    # Without mlp_depths the tensor names give the depth (of both projectors).
    del saved["mlp_depths"]
    d = release_model_dict(saved, keys=["linear_proj_audio.0.weight", "linear_proj_audio.2.weight"])
    assert d["projector"] == {"vision_depth": 2, "audio_depth": 2}
    scaled = copy.deepcopy(conf)
    scaled["llm_config"]["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192}
    assert omni_config_from_release(scaled).model.llm.rope_scaling
    off_by_one = dict(conf, image_end_token=conf["image_end_token"] + 1)
    with pytest.raises(ConversionError, match="image_end_token = 128270"):
        release_model_dict(off_by_one)
    old = dict(conf, megatron_omni={"format_version": 1, "base_vocab_size": 128256})
    with pytest.raises(ConversionError, match="older megatron-omni"):
        release_model_dict(old)


def test_release_config_describes_the_model():
    from omni_batch import tiny_omni_cfg

    from megatron_omni.config import to_dict
    from megatron_omni.convert.release import omni_config_from_release, release_config
    from megatron_omni.models.omni import special_token_ids

    cfg = tiny_omni_cfg("model.projector.vision_depth=2", "model.projector.audio_depth=2",
                        "model.vision.merger_hidden_size=48", "model.audio.sanm_shift=1")
    conf = release_config(cfg)
    sp = special_token_ids(cfg)
    assert conf["model_type"] == "bailing2" and conf["mlp_depths"] == 2
    assert conf["num_query_token_audio"] == 256
    assert conf["llm_config"]["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert conf["audio_patch_token"] == sp.base_vocab_size + 22 == sp.audio_patch
    assert conf["frame_patch_token"] == sp.video_patch and "video_patch_token" not in conf
    ac = conf["audio_config"]
    assert all(k.startswith("audio_") for k in ac if k != "model_type")
    assert (ac["audio_output_size"], ac["audio_sanm_shfit"], ac["audio_compress"]) == (32, 1, 3)
    back = omni_config_from_release(json.loads(json.dumps(conf)))
    mine, theirs = to_dict(cfg.model), to_dict(back.model)
    assert back.model.llm.head_dim == cfg.model.llm.head_dim
    for d in (mine, theirs):
        d["llm"].pop("kv_channels")  # None (= hidden / heads) vs the explicit head_dim
    assert mine == theirs
    # A release without our block: the ids carry the base vocabulary.
    plain = {k: v for k, v in conf.items() if k != "megatron_omni"}
    again = omni_config_from_release(plain, ["model.llm.make_vocab_size_divisible_by=64"])
    assert again.model.speech_codebook_size == 32 and not again.model.llm.rope_scaling
    # What the release cannot express is refused.
    with pytest.raises(ConversionError, match="rope scaling"):
        release_config(tiny_omni_cfg("model.llm.rope_scaling=true"))
    with pytest.raises(ConversionError, match="mlp_depths"):
        release_config(tiny_omni_cfg("model.projector.vision_depth=2",
                                     "model.projector.audio_depth=1"))


def test_import_drops_llama3_scaling_unless_asked(tmp_path, caplog):
    """A Llama-3.1 directory with llama3 rope scaling imports as unscaled M-RoPE (with a
    warning) unless model.llm.rope_scaling=true asks to keep it."""
    from megatron_omni.convert.importer import ImportRequest, build_plan

    src = tmp_path / "llama31"
    fake_llama_dir(src, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192})
    with caplog.at_level("WARNING"):
        plan = build_plan(ImportRequest(out=tmp_path / "a", llama=src))
    assert not plan.cfg.model.llm.rope_scaling
    assert "model.llm.rope_scaling=true" in caplog.text
    plan.close()
    kept = build_plan(ImportRequest(out=tmp_path / "b", llama=src,
                                    overrides=["model.llm.rope_scaling=true",
                                               "model.llm.rope_scaling_factor=8.0"]))
    assert kept.cfg.model.llm.rope_scaling and kept.cfg.model.llm.rope_scaling_factor == 8.0
    kept.close()
    # Scaling asked for a source without it: the config disagrees with the checkpoint.
    plain = tmp_path / "llama3"
    fake_llama_dir(plain)
    with pytest.raises(Exception, match="rope_scaling"):
        build_plan(ImportRequest(out=tmp_path / "c", llama=plain,
                                 overrides=["model.llm.rope_scaling=true"]))


def test_release_export_refuses_a_scaled_checkpoint(single_rank, tmp_path, capsys):
    """--format release exits 2 with a clear message for a checkpoint trained with llama3
    scaling; --format llama writes the scaling it was trained with."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_omni.config import load_config
    from megatron_omni.models.omni import OmniModel
    from megatron_omni.training.checkpoint import save_checkpoint

    cfg = load_config(None, ["model.vision.enabled=false", "model.audio.enabled=false",
                             "model.transformer_impl=local", "model.speech_codebook_size=64",
                             "model.llm.rope_scaling=true"])
    model_parallel_cuda_manual_seed(3)
    ck = tmp_path / "scaled"
    save_checkpoint(ck, 1, [OmniModel(cfg)], cfg=cfg)
    out = tmp_path / "release"
    assert tool_main("export", ck, "--out", out, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "rope scaling" in err and "--format llama" in err and _no_output(out)
    hf = tmp_path / "llama"
    assert tool_main("export", ck, "--out", hf, "--format", "llama", "--no-progress") == 0
    assert json.loads((hf / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"


def test_release_import_export_round_trip(single_rank, tmp_path):
    """(d): a release directory -> import (TP=1, this process) -> export: identical tensors; the
    export loads into a model built from its config.json with strict key matching."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from omni_batch import tiny_omni_cfg

    from megatron_omni.convert.release import (
        build_model_from_release,
        load_release_into_model,
        omni_to_release_state,
        release_config,
    )
    from megatron_omni.models.omni import OmniModel

    cfg = tiny_omni_cfg("model.projector.vision_depth=2", "model.projector.audio_depth=2",
                        "model.transformer_impl=local")
    model_parallel_cuda_manual_seed(7)
    model = OmniModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = omni_to_release_state(model.state_dict(), cfg)
    rel = tmp_path / "release"
    rel.mkdir()
    w = ShardedSafetensorsWriter(rel, 10**9)
    for k in sorted(state):
        w.add(k, state[k])
    w.close()
    (rel / "config.json").write_text(json.dumps(release_config(cfg, torch.float32)))

    ck, out = tmp_path / "ck", tmp_path / "release2"
    assert tool_main("import", "--release", rel, "--out", ck, "--no-progress") == 0
    assert (ck / "step_00000000" / "complete.json").is_file()
    assert tool_main("export", ck, "--out", out, "--no-progress", "--max-shard-size",
                     "20KB") == 0
    back = load_safetensors_dir(out)
    assert set(back) == set(state)
    for k in state:
        assert torch.equal(back[k], state[k]), k
    assert len(json.loads((out / "model.safetensors.index.json").read_text())
               ["weight_map"].values()) == len(state)

    rebuilt, rcfg = build_model_from_release(out)
    load_release_into_model(rebuilt, back, rcfg)
    ours = dict(model.named_parameters())
    vocab = cfg.model.llm.vocab_size
    for name, p in rebuilt.named_parameters():
        if name in ("llm.embedding.word_embeddings.weight", "llm.output_layer.weight"):
            assert torch.equal(p[:vocab], ours[name][:vocab]), name  # padding rows are not
            assert not p[vocab:].any()                               # part of the release
        else:
            assert torch.equal(p, ours[name]), name
    # A missing key is caught by the strict load.
    broken = dict(back)
    del broken["linear_proj.2.bias"]
    with pytest.raises(ConversionError, match="linear_proj.2.bias"):
        load_release_into_model(rebuilt, broken, rcfg)
    # Export refuses to overwrite without --force, and replaces with it.
    assert tool_main("export", ck, "--out", out, "--no-progress") == 2
    assert tool_main("export", ck, "--out", out, "--no-progress", "--force") == 0


def test_lora_delta_is_merged_on_export(single_rank, tmp_path, capsys):
    """A checkpoint whose linear_qkv layers carry lora_A/lora_B (LoRA does not exist in the
    model code yet: added by hand here) exports W + scale * B @ A."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_omni.config import load_config
    from megatron_omni.models.omni import OmniModel
    from megatron_omni.models.weight_maps.core import split_group_qkv
    from megatron_omni.training.checkpoint import save_checkpoint

    cfg = load_config(None, ["model.vision.enabled=false", "model.audio.enabled=false",
                             "model.transformer_impl=local", "model.speech_codebook_size=64"])
    model_parallel_cuda_manual_seed(3)
    model = OmniModel(cfg)
    g = torch.Generator().manual_seed(0)
    for layer in model.llm.decoder.layers:
        qkv = layer.self_attention.linear_qkv
        qkv.lora_A = torch.nn.Linear(qkv.weight.shape[1], 2, bias=False)
        qkv.lora_B = torch.nn.Linear(2, qkv.weight.shape[0], bias=False)
        with torch.no_grad():
            qkv.lora_A.weight.copy_(torch.randn(qkv.lora_A.weight.shape, generator=g))
            qkv.lora_B.weight.copy_(torch.randn(qkv.lora_B.weight.shape, generator=g))
    ck = tmp_path / "lora_ck"
    save_checkpoint(ck, 1, [model], cfg=cfg)
    out = tmp_path / "llama"
    assert tool_main("export", ck, "--out", out, "--format", "llama", "--no-progress") == 2
    assert "--lora-scale" in capsys.readouterr().err and _no_output(out)
    assert tool_main("export", ck, "--out", out, "--format", "llama", "--no-progress",
                     "--lora-scale", "0.5") == 0
    back = load_safetensors_dir(out)
    llm = cfg.model.llm
    for i, layer in enumerate(model.llm.decoder.layers):
        qkv = layer.self_attention.linear_qkv
        merged = qkv.weight + 0.5 * qkv.lora_B.weight @ qkv.lora_A.weight
        q, k, v = split_group_qkv(merged.detach(), llm.num_attention_heads, llm.num_query_groups,
                             llm.head_dim)
        for name, t in (("q", q), ("k", k), ("v", v)):
            assert torch.allclose(back[f"model.layers.{i}.self_attn.{name}_proj.weight"], t,
                                  atol=1e-6), (i, name)
    assert "merged" in (out / "README.md").read_text()


def test_export_of_a_training_checkpoint_skips_optimizer_state(single_rank, tmp_path):
    """A checkpoint saved by training (DDP + distributed optimizer state) exports the model
    only, equal to the adapters' output."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_omni.config import load_config
    from megatron_omni.models.omni import OmniModel
    from megatron_omni.models.weight_maps.llm import megatron_to_hf
    from megatron_omni.training.checkpoint import save_checkpoint
    from megatron_omni.training.optimizer import build_optimizer, build_scheduler, wrap_ddp

    cfg = load_config(None, ["model.vision.enabled=false", "model.audio.enabled=false",
                             "model.transformer_impl=local", "model.speech_codebook_size=64",
                             "training.use_distributed_optimizer=true"])
    model_parallel_cuda_manual_seed(5)
    chunks = wrap_ddp(cfg, [OmniModel(cfg)])
    opt = build_optimizer(cfg, chunks)
    ck = tmp_path / "run"
    save_checkpoint(ck, 3, chunks, opt, build_scheduler(cfg, opt), {"iteration": 3}, cfg)
    out = tmp_path / "llama"
    assert tool_main("export", ck, "--out", out, "--format", "llama", "--no-progress") == 0
    inner = chunks[0].module
    ref = megatron_to_hf({k[4:]: v for k, v in inner.state_dict().items()
                          if k.startswith("llm.") and not k.endswith("_extra_state")},
                         cfg.model.llm)
    back = load_safetensors_dir(out)
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


# --- slow: TP=2 x PP=2 round trip ----------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    llama = make_llama(root / "llama")
    qwen = make_qwen2vl(root / "qwen2vl")
    funasr = make_funasr(root / "funasr")
    ck = root / "ckpt"
    r = run_cli("import", "--llama", root / "llama", "--qwen2vl", root / "qwen2vl",
                "--funasr", root / "funasr", "--tp", 2, "--pp", 2, "--out", ck,
                "--no-progress", "model.speech_codebook_size=16",
                "model.projector.vision_depth=2", "model.projector.audio_depth=2",
                "model.llm.make_vocab_size_divisible_by=64",
                timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rel, hf = root / "release", root / "llama_export"
    assert tool_main("export", ck, "--out", rel, "--format", "release", "--no-progress",
                     "--max-shard-size", "200KB") == 0
    assert tool_main("export", ck, "--out", hf, "--format", "llama", "--no-progress") == 0
    return dict(root=root, ck=ck, rel=rel, hf=hf, stdout=r.stdout, stderr=r.stderr,
                llama={k: v.detach().clone() for k, v in llama.state_dict().items()},
                qwen={k: v.detach().clone() for k, v in qwen.state_dict().items()},
                funasr=funasr)


@pytest.mark.slow
def test_import_writes_a_tp2_pp2_checkpoint(converted):
    import yaml

    step = converted["ck"] / "step_00000000"
    assert (step / "complete.json").is_file()
    assert (converted["ck"] / "latest").read_text().strip() == "step_00000000"
    saved = yaml.safe_load((step / "config.yaml").read_text())
    assert saved["parallel"]["tensor_model_parallel_size"] == 2
    assert saved["parallel"]["pipeline_model_parallel_size"] == 2
    llm = saved["model"]["llm"]
    assert (llm["vocab_size"], llm["num_query_groups"], llm["norm_epsilon"]) == (145, 2, 1e-6)
    # The source's llama3 scaling is dropped (M2-omni runs unscaled M-RoPE), with a warning.
    assert not llm["rope_scaling"] and saved["model"]["vision"]["merger_hidden_size"] == 48
    assert "model.llm.rope_scaling=true" in converted["stderr"]
    assert saved["model"]["audio"]["num_blocks"] == 3
    index = json.loads((step / "rank_state" / "index.json").read_text())
    assert len(index) == 4
    assert "stage.init_from" in converted["stdout"]
    assert not partial_dir(converted["ck"]).exists()


@pytest.mark.slow
def test_round_trip_llama_is_exact(converted):
    orig, back = converted["llama"], load_safetensors_dir(converted["hf"])
    assert set(back) == set(orig)
    for k, t in orig.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert back[k].shape == (145, 64)
            assert torch.equal(back[k][:100], t), k
            # New rows (29 special tokens + 16 speech codes) start as the mean of the old rows.
            mean = t.double().mean(0).float()
            assert torch.allclose(back[k][100:], mean.expand(45, -1), rtol=0, atol=1e-7), k
        else:
            assert torch.equal(back[k], t), k
    conf = json.loads((converted["hf"] / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["rope_scaling"] is None  # as imported
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (1, 2)
    readme = (converted["hf"] / "README.md").read_text()
    assert "t = h = w" in readme and "1-D RoPE" in readme


@pytest.mark.slow
def test_round_trip_vision_and_audio_are_exact(converted):
    rel = load_safetensors_dir(converted["rel"])
    qwen = {k[len("model.visual."):]: v for k, v in converted["qwen"].items()
            if k.startswith("model.visual.")}
    vis = {k[len("vision_model."):]: v for k, v in rel.items() if k.startswith("vision_model.")}
    assert set(vis) == set(qwen)
    for k in qwen:
        assert torch.equal(vis[k], qwen[k]), k
    enc = {k[len("encoder."):]: v for k, v in converted["funasr"].items()
           if k.startswith("encoder.")}
    aud = {k[len("audio_model.encoder."):]: v for k, v in rel.items()
           if k.startswith("audio_model.encoder.")}
    assert set(aud) == set(enc)
    for k in enc:
        assert torch.equal(aud[k], enc[k]), k
    hf = load_safetensors_dir(converted["hf"])
    for k, v in hf.items():
        assert torch.equal(rel["language_model." + k], v), k
    assert {k.split(".")[0] for k in rel} == {"vision_model", "audio_model", "language_model",
                                              "linear_proj", "linear_proj_audio"}
    assert sorted(k for k in rel if k.startswith("linear_proj.")) == [
        "linear_proj.0.bias", "linear_proj.0.weight", "linear_proj.2.bias",
        "linear_proj.2.weight"]
    shards = set(json.loads((converted["rel"] / "model.safetensors.index.json").read_text())
                 ["weight_map"].values())
    assert len(shards) > 1  # 200KB shards


@pytest.mark.slow
def test_release_export_loads_strictly_into_a_model_from_its_config(converted):
    from megatron_omni.convert.release import build_model_from_release, load_release_into_model

    conf = json.loads((converted["rel"] / "config.json").read_text())
    assert conf["model_type"] == "bailing2" and conf["mlp_depths"] == 2
    assert {"vision_config", "audio_config", "llm_config"} <= set(conf)
    model, cfg = build_model_from_release(converted["rel"])
    state = load_safetensors_dir(converted["rel"])
    load_release_into_model(model, state, cfg)
    params = dict(model.named_parameters())
    assert torch.equal(params["linear_proj.2.weight"], state["linear_proj.2.weight"])
    unexpected = dict(state, **{"vision_model.blocks.9.norm1.weight": torch.zeros(32)})
    with pytest.raises(ValueError, match="blocks.9"):
        load_release_into_model(model, unexpected, cfg)


@pytest.mark.slow
def test_verify_without_transformers_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert tool_main("verify", tmp_path) == 2
    err = capsys.readouterr().err
    assert "pip install 'megatron-omni[convert]'" in err and "Traceback" not in err


def test_verify_matches_and_catches_a_perturbed_weight(converted, capsys):
    assert tool_main("verify", converted["ck"], "--hf", converted["hf"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "max |logit diff|" in out
    bad = converted["root"] / "llama_perturbed"
    shutil.copytree(converted["hf"], bad)
    shard = next(bad.glob("*.safetensors"))
    state = load_safetensors_dir(bad)
    state["model.layers.2.mlp.down_proj.weight"][0, 0] += 0.5
    save_file(state, str(shard), metadata={"format": "pt"})
    r = run_cli("verify", converted["ck"], "--hf", bad, "--tolerance", "1e-4")
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "FAIL" in r.stdout
