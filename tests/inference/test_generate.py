"""Generation from a checkpoint (KV cache vs full recompute vs full forward, TP=1 and TP=2,
sampling), answer parsing, the CLI and the held-out evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_workers
from workers import generate_check as W

from megatron_omni.cli import generate as cli
from megatron_omni.inference import generate as G

REPO = Path(__file__).resolve().parents[2]


def check_generation_results(r: dict) -> None:
    # The prompt: chat template with one image block (56x84 px -> grid 1x4x6 -> 6 tokens) and
    # one 256-token audio block, ending with the assistant header; the image block shifts the
    # M-RoPE positions (6 tokens span max(1, 2, 3) = 3 positions).
    assert r["image_patches"] == 6 and r["grid"] == [[1, 4, 6]]
    assert r["audio_patches"] == 256 and r["ends_with_header"]
    assert r["next_position"] == r["prompt_len"] - 3
    # Greedy: the KV-cache generator, the full-recompute generator and the argmax of one full
    # forward over prompt + generated tokens agree at every step.
    assert len(r["cached"]) == W.MAX_NEW and r["stop"] == "max_new_tokens"
    assert r["cached"] == r["uncached"] == r["full_argmax"]
    assert r["cached_vs_full"] < 1e-4 and r["uncached_vs_full"] < 1e-4
    assert r["min_margin"] > 10 * max(r["cached_vs_full"], r["uncached_vs_full"])
    assert r["suppressed_ok"]
    # Stopping at a stop token (the stop token is part of the output).
    st = r["stop_test"]
    assert st["tokens"] == [st["first"]] and st["reason"] == "eot"
    # Sampling: seeded and reproducible, seed-dependent, cache-independent; top-k=1 and a tiny
    # top-p are greedy.
    assert r["sample_a"] == r["sample_b"] == r["sample_uncached"]
    assert r["sample_a"] != r["sample_c"]
    assert r["sample_a"] != r["cached"]
    assert r["topk1"] == r["cached"] and r["topp_small"] == r["cached"]
    assert r.get("ranks_agree", True)


def test_greedy_cache_equals_full_forward_tp1(tmp_path, single_rank):
    r = W.generation_checks(tmp_path, "tp1")
    assert r["world"] == 1
    check_generation_results(r)


@pytest.mark.slow
def test_greedy_cache_equals_full_forward_tp2_from_pp2_checkpoint(tmp_path):
    # Saved at TP=1 x PP=2, generated at TP=2 x PP=1 (resharded on load), and again at TP=1.
    r = run_workers("generate_check.py", 2, [str(tmp_path), "pp2"], timeout=300)
    assert r["world"] == 2 and r["ranks_agree"]
    check_generation_results(r)
    assert r["tp1_tokens"] == r["cached"]


def test_sample_token_rules():
    logits = torch.tensor([0.0, 3.0, 2.9, float("-inf"), 1.0])
    greedy = G.SamplingParams()
    assert G.sample_token(logits, greedy) == 1
    draws = {G.sample_token(logits, G.SamplingParams(temperature=5.0, top_k=2),
                            torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {1, 2}  # only the two best, never the masked id
    draws = {G.sample_token(logits, G.SamplingParams(temperature=5.0),
                            torch.Generator().manual_seed(s)) for s in range(60)}
    assert 3 not in draws and len(draws) >= 3
    # top-p: mass of token 1 alone is < 0.6, tokens 1 + 2 reach it.
    draws = {G.sample_token(logits, G.SamplingParams(temperature=1.0, top_p=0.6),
                            torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {1, 2}
    with pytest.raises(ValueError):
        G.SamplingParams(top_p=0.0)


def test_parse_answer_splits_text_captions_and_speech(tmp_path):
    _, tok = W.make_tokenizer(tmp_path)
    sp = tok.special
    ids = (tok.encode("Here:") + [sp.gen_image_start] + tok.encode("a red circle")
           + [sp.gen_image_end] + tok.encode(" and") + [sp.gen_audio_start]
           + [sp.speech_offset + c for c in (3, 0, 31)] + [sp.gen_audio_end]
           + [sp.gen_audio_start, sp.speech_offset + 7])
    a = G.parse_answer(ids, tok)
    assert a.gen_image_captions == ["a red circle"]
    assert a.speech_codes == [[3, 0, 31], [7]] and a.unclosed == ["gen_audio"]
    assert a.text == "Here:<gen_image>a red circle</gen_image> and"
    out = G.GenerationOutput(ids + [tok.eot_id], "eot")
    assert out.answer_ids == ids


def test_cli_help():
    p = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for flag in ("--checkpoint", "--image", "--audio", "--video", "--temperature", "--top-k",
                 "--top-p", "--seed", "--no-cache", "--eval", "pipeline"):
        assert flag in p.stdout


def test_cli_refuses_bad_input_with_exit_2_and_one_line(tmp_path, capsys):
    """Checked before any process group or model exists (so in-process here)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cases = [
        (["--checkpoint", str(tmp_path / "nope")], "--checkpoint"),
        (["--checkpoint", str(ckpt), "--image", str(tmp_path / "cat.png")], "--image"),
        (["--checkpoint", str(ckpt), "--audio", str(tmp_path)], "--audio"),
        (["--checkpoint", str(ckpt), "--config", str(tmp_path / "run.yaml")], "--config"),
        (["--checkpoint", str(ckpt), "--top-p", "0"], "top_p"),
        (["--checkpoint", str(ckpt), "--max-new-tokens", "0"], "max_new_tokens"),
    ]
    for argv, word in cases:
        assert cli.main(argv) == 2, argv
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("omni-generate: error:"), out.err
        assert word in lines[0] and out.out == ""


# ------------------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, single_rank):
    """A tiny prepared dataset (text, image, audio; 3 held-out samples each) and a random
    checkpoint whose saved config points at it."""
    from megatron_omni.data.preprocess import discover_inputs, preprocess
    from megatron_omni.data.synthetic import corpus_texts, make_synthetic_dataset
    from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

    base = tmp_path_factory.mktemp("gen_eval")
    raw = base / "raw"
    make_synthetic_dataset(raw, num_per_modality=1, seed=3, num_val_per_modality=3)
    tok_path = train_tiny_tokenizer(corpus_texts(raw), 300, base / "tokenizer.json")
    tok = load_tokenizer(tok_path, speech_codebook_size=64)
    preprocess(discover_inputs(raw, ["text", "image", "audio"]), base / "prepared", tok,
               media_root=raw, workers=1, progress=False)
    W.reinit(1, 1)
    ckpt = base / "ckpt"
    W.save_random_checkpoint(ckpt, W.overrides(
        tok_path, tok.vocab_size, 1, 1, f"data.path={base / 'prepared'}",
        "data.seq_length=1024", "data.media_backend=cpu", "data.packing_buffer_size=4",
        codebook=64))
    answers = {}
    for m in ("text", "image", "audio"):
        for line in (raw / f"{m}_val.jsonl").read_text().splitlines():
            o = json.loads(line)
            if "messages" in o:
                answers.setdefault(m, []).append(o["messages"][-1]["content"].strip())
    return {"base": base, "raw": raw, "ckpt": ckpt, "tok": tok, "answers": answers}


def test_cli_eval_prints_per_modality_loss_and_accuracy(prepared, capsys):
    out = cli.run(["--checkpoint", str(prepared["ckpt"]), "--eval", "--max-new-tokens", "8"])
    text = capsys.readouterr().out
    ev = out["eval"]
    assert set(ev) == {"text", "image", "audio"}
    for m, r in ev.items():
        assert r["samples"] == 3 and r["loss_tokens"] > 0
        assert 0.0 < r["loss"] < 20.0  # random model: about ln(vocab) ~ 6.2
        assert any(line.startswith(m) and f"{r['loss']:.4f}" in line for line in text.splitlines())
    # Text val lines are pure text: loss only. Image/audio val lines are chat: answered.
    assert ev["text"]["answered"] == 0 and ev["text"]["accuracy"] is None
    for m in ("image", "audio"):
        assert ev[m]["answered"] == 3 and ev[m]["accuracy"] is not None
        # References are the held-out answers of the raw JSONL.
        assert {ex["reference"] for ex in ev[m]["examples"]} <= set(prepared["answers"][m])
    assert "exact match" in text and "accuracy" in text


def test_eval_exact_match_counts_oracle_answers(prepared, monkeypatch):
    """With a stand-in generator that returns the reference (or the reference minus its last
    token), exact-match accuracy is 1 (or 0): the matcher compares what it should."""
    import dataclasses

    from megatron_omni.data.tokenizer import load_tokenizer

    cfg = G.generation_config(prepared["ckpt"], 1)
    model = G.load_generation_model(prepared["ckpt"], cfg)
    tok = load_tokenizer(cfg.data.tokenizer, speech_codebook_size=64)
    last = {}
    split = G._answer_split

    def recording_split(ids, loss, header):
        last["r"] = split(ids, loss, header)
        return last["r"]

    for cut, want in ((0, 1.0), (2, 0.0)):
        def oracle(self, prompt, params=G.SamplingParams(), keep_logits=False):
            plen, ref = last["r"]
            assert len(prompt) == plen and params.greedy
            ids = ref[:len(ref) - cut] if cut else ref
            return G.GenerationOutput(list(ids), "eot" if not cut else "max_new_tokens", plen)

        monkeypatch.setattr(G, "_answer_split", recording_split)
        monkeypatch.setattr(G.OmniGenerator, "generate", oracle)
        res = G.evaluate(model, tok, dataclasses.replace(cfg.data, media_backend="cpu"),
                         modalities=["image", "audio"])
        for m in ("image", "audio"):
            assert res[m].answered == 3 and res[m].accuracy == want, res[m]


def test_cli_generates_with_image_and_audio(prepared, tmp_path, capsys):
    raw = prepared["raw"]
    img = next(p for p in sorted((raw / "images").iterdir()) if p.suffix == ".png")
    wav = sorted((raw / "audios").glob("*.wav"))[0]
    out_json = tmp_path / "out.json"
    out = cli.run(["--checkpoint", str(prepared["ckpt"]), "--prompt", "What is this?",
                       "--image", str(img), "--audio", str(wav), "--max-new-tokens", "6",
                       "--json", str(out_json)])
    text = capsys.readouterr().out
    assert json.loads(out_json.read_text()) == out
    assert len(out["token_ids"]) == 6 and out["stop_reason"] == "max_new_tokens"
    assert "answer (6 tokens, stop: max_new_tokens)" in text
    # Sampling through the CLI is reproducible.
    again = [cli.run(["--checkpoint", str(prepared["ckpt"]), "--prompt", "Hi",
                          "--max-new-tokens", "6", "--temperature", "1.3", "--seed", "3"])
             for _ in range(2)]
    assert again[0]["token_ids"] == again[1]["token_ids"]


def _run_cli(*argv):
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megatron_omni.cli.generate", *map(str, argv)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def test_cli_exit_codes_end_to_end(prepared, tmp_path):
    """The command line: 0 with the answer; 2 and one line, no traceback, for a config error
    found after the checkpoint's config was read, and for a folder without a checkpoint."""
    out = tmp_path / "out.json"
    ok = _run_cli("--checkpoint", prepared["ckpt"], "--prompt", "Hi", "--max-new-tokens", "2",
                  "--json", out)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(json.loads(out.read_text())["token_ids"]) == 2
    bad = _run_cli("--checkpoint", prepared["ckpt"], "--override", "model.llm.num_layers=0")
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr
    err = [ln for ln in bad.stderr.splitlines() if ln.startswith("omni-generate: error:")]
    assert len(err) == 1 and "num_layers" in err[0], bad.stderr[-3000:]
    (tmp_path / "empty").mkdir()
    empty = _run_cli("--checkpoint", tmp_path / "empty")
    assert empty.returncode == 2 and "Traceback" not in empty.stderr, empty.stderr[-3000:]
    assert "omni-generate: error:" in empty.stderr and "checkpoint" in empty.stderr


def test_eval_with_deferred_decoding_equals_worker_decoding(prepared, monkeypatch):
    """data.media_backend=deferred (images decoded in this process, CPU backend here): evaluate
    decodes the val batches itself and scores exactly what worker decoding scores."""
    import dataclasses

    from megatron_omni.data.tokenizer import load_tokenizer

    cfg = G.generation_config(prepared["ckpt"], 1)
    model = G.load_generation_model(prepared["ckpt"], cfg)
    tok = load_tokenizer(cfg.data.tokenizer, speech_codebook_size=64)
    monkeypatch.setattr(G.OmniGenerator, "generate", lambda self, prompt, params=None,
                        keep_logits=False: G.GenerationOutput([], "eot", len(prompt)))
    res = {b: G.evaluate(model, tok, dataclasses.replace(cfg.data, media_backend=b),
                         modalities=["image"])["image"] for b in ("cpu", "deferred")}
    assert res["cpu"].loss_tokens == res["deferred"].loss_tokens > 0
    assert res["cpu"].loss_sum == res["deferred"].loss_sum


def test_checkpoint_config_readers_follow_one_rule(prepared, monkeypatch, caplog):
    """Generation, conversion and a resume's re-seed read a checkpoint's saved config through one
    reader: keys this version does not know are an error naming them under ``model`` (the
    weights depend on them) and one warning elsewhere; the re-seed reads the raw value."""
    import logging

    import yaml
    from megatron.core import dist_checkpointing

    from megatron_omni.config import ConfigError, to_dict
    from megatron_omni.config.loader import merge
    from megatron_omni.convert.checkpoint_io import MegatronCheckpointReader
    from megatron_omni.models.weight_maps.core import ConversionError
    from megatron_omni.training import checkpoint as ckpt

    real = dist_checkpointing.load_common_state_dict
    extra: dict = {}

    def with_extra_keys(path, *args, **kwargs):  # as if another version had saved it
        common = real(path, *args, **kwargs)
        meta = dict(common[ckpt.META_KEY])
        meta["config"] = yaml.safe_dump(merge(yaml.safe_load(meta["config"]), extra))
        return {**common, ckpt.META_KEY: meta}

    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", with_extra_keys)
    gen_cfg = to_dict(G.generation_config(prepared["ckpt"], 1))
    conv_cfg = to_dict(MegatronCheckpointReader(prepared["ckpt"]).cfg)

    extra.update(training={"future_option": 1, "seed": 99}, wandb={"project": "p"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_omni.config.loader"):
        gen = to_dict(G.generation_config(prepared["ckpt"], 1))
        reader = MegatronCheckpointReader(prepared["ckpt"])
    notes = [r.getMessage() for r in caplog.records if "unknown to this version" in r.getMessage()]
    assert len(notes) == 2  # one per reader, naming every key
    assert all("training.future_option" in n and "wandb" in n for n in notes)
    gen_cfg["training"]["seed"] = conv_cfg["training"]["seed"] = 99
    assert gen == gen_cfg and to_dict(reader.cfg) == conv_cfg
    assert reader.raw_config["wandb"] == {"project": "p"}  # raw keeps every key

    extra["model"] = {"llm": {"future_norm": "x"}, "new_encoder": {"depth": 2}}
    with pytest.raises(ConfigError, match="model.llm.future_norm, model.new_encoder"):
        G.generation_config(prepared["ckpt"], 1)
    with pytest.raises(ConversionError, match="model.llm.future_norm, model.new_encoder"):
        MegatronCheckpointReader(prepared["ckpt"])
    # A resume at another layout re-seeds from the saved training.seed: read raw, never stopped
    # by a key this version lost.
    meta = with_extra_keys(str(ckpt.resolve_checkpoint(prepared["ckpt"])))[ckpt.META_KEY]
    assert ckpt._seed_from(meta, None) == 99 and ckpt._seed_from(meta, 5) == 5
