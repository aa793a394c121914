"""Generation checks on a tiny random omni model saved as a real checkpoint.

Used in-process by ``tests/inference/test_generate.py`` (TP=1) and as a gloo worker
(``run_workers("generate_check.py", 2, [tmp, save_layout])``): the checkpoint is saved at
``save_layout`` (``tp1``, ``tp2`` or ``pp2``), loaded for generation at TP = world size, PP = 1,
and a prompt with an image and an audio clip (real PNG / WAV files through the chat template) is
decoded with and without KV cache. Rank 0 writes the results JSON; the test asserts on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from dist_utils import finish_worker  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402

TEXTS = ["What shape is in the image and what do you hear?", "a red circle and two beeps",
         "the blue square moves left", "three high beeps", "Describe the sound.",
         "What colour is the shape?"] * 4
SAVE_LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
MAX_NEW = 10


def make_tokenizer(tmp: Path):
    from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

    path = tmp / "tokenizer.json"
    if torch.distributed.is_initialized():
        if torch.distributed.get_rank() == 0:
            train_tiny_tokenizer(TEXTS, 300, path)
        torch.distributed.barrier()
    else:
        train_tiny_tokenizer(TEXTS, 300, path)
    return path, load_tokenizer(path, speech_codebook_size=32)


def overrides(tok_path: Path, vocab: int, tp: int = 1, pp: int = 1, *extra,
              codebook: int = 32) -> list[str]:
    return [f"model.llm.vocab_size={vocab}", f"model.speech_codebook_size={codebook}",
            "model.llm.num_layers=2", "model.llm.make_vocab_size_divisible_by=64",
            "model.vision.depth=1", "model.vision.hidden_size=32", "model.vision.num_heads=2",
            "model.audio.hidden_size=32", "model.audio.num_heads=2",
            "model.audio.ffn_hidden_size=64", "model.audio.num_blocks=2",
            "model.transformer_impl=local", f"data.tokenizer={tok_path}",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}", "data.modalities=[text,image]",
            *extra]


def save_random_checkpoint(root: Path, ovr: list[str], seed: int = 7) -> Path:
    """A randomly initialised omni model saved at the layout of ``ovr`` (collective)."""
    from megatron_omni.config import load_config
    from megatron_omni.models.omni import OmniModel
    from megatron_omni.training.checkpoint import save_checkpoint

    cfg = load_config(None, ovr)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    model = OmniModel(cfg)
    # Larger LLM weights than the training init, so the random model has decisive logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("llm.") and p.dim() == 2:
                p.mul_(8.0)
    return save_checkpoint(root, 1, [model], cfg=cfg)


def write_media(tmp: Path) -> tuple[Path, Path]:
    import soundfile
    from PIL import Image

    png, wav = tmp / "shape.png", tmp / "beep.wav"
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        img = np.zeros((56, 84, 3), dtype=np.uint8)
        img[10:40, 20:60] = (220, 30, 30)
        Image.fromarray(img).save(png)
        t = np.arange(12000) / 16000.0
        soundfile.write(wav, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return png, wav


def reinit(tp: int, pp: int = 1, seed: int = 1234) -> None:
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _max_diff(step_logits, rows) -> float:
    """Largest |difference| over the finite (not masked) logits of every step."""
    diffs = []
    for a, b in zip(step_logits, rows):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        keep = torch.isfinite(a)
        diffs.append(float((a[keep] - b[keep]).abs().max()))
    return max(diffs)


def generation_checks(tmp: Path, save_layout: str = "tp1") -> dict:
    """Save at ``save_layout``, generate at TP = world size; every rank returns the results."""
    from megatron_omni.data.media import ImageSettings, MediaProcessor
    from megatron_omni.inference import generate as G

    tmp = Path(tmp)
    world = torch.distributed.get_world_size()
    tok_path, tok = make_tokenizer(tmp)
    save_tp, save_pp = SAVE_LAYOUTS[save_layout]
    reinit(save_tp, save_pp)
    root = tmp / "ckpt"
    save_random_checkpoint(root, overrides(tok_path, tok.vocab_size, save_tp, save_pp))

    reinit(world, 1)
    cfg = G.generation_config(root, world)
    model = G.load_generation_model(root, cfg)
    png, wav = write_media(tmp)
    proc = MediaProcessor("cpu", image=ImageSettings(min_pixels=56 * 56, max_pixels=56 * 84))
    prompt = G.build_chat_prompt(tok, "What shape is in <image> and what is in <audio>?",
                                 images=[png], audios=[wav], processor=proc)
    sp = tok.special
    ids = prompt.tokens.tolist()
    res = {"world": world, "prompt_len": len(prompt), "next_position": prompt.next_position,
           "image_patches": ids.count(sp.image_patch), "audio_patches": ids.count(sp.audio_patch),
           "grid": prompt.vision_grid_thw.tolist(),
           "ends_with_header": ids[-len(G._assistant_header(tok)):] == G._assistant_header(tok)}

    cached_gen = G.OmniGenerator.for_tokenizer(model, tok, use_cache=True)
    plain_gen = G.OmniGenerator.for_tokenizer(model, tok, use_cache=False)
    greedy = G.SamplingParams(max_new_tokens=MAX_NEW)
    cached = cached_gen.generate(prompt, greedy, keep_logits=True)
    plain = plain_gen.generate(prompt, greedy, keep_logits=True)
    full = cached_gen.full_logits(prompt, cached.token_ids)
    T = len(prompt)
    rows = full[T - 1:T - 1 + len(cached.token_ids)]
    top2 = rows.topk(2, dim=-1).values
    res.update(
        cached=cached.token_ids, uncached=plain.token_ids, stop=cached.stop_reason,
        full_argmax=rows.argmax(-1).tolist(),
        # The decisive margin of each greedy pick (top-1 minus top-2 logit) vs the disagreement
        # between the step logits and the full forward.
        min_margin=float((top2[:, 0] - top2[:, 1]).min()),
        cached_vs_full=_max_diff(cached.step_logits, rows),
        uncached_vs_full=_max_diff(plain.step_logits, rows),
        suppressed_ok=all(t not in (sp.image_patch, sp.video_patch, sp.audio_patch)
                          and t < tok.vocab_size for t in cached.token_ids))
    # Stop: make the first greedy token a stop token.
    first = cached.token_ids[0]
    stopper = G.OmniGenerator(model, {first: "eot"})
    out = stopper.generate(prompt, greedy)
    res["stop_test"] = {"tokens": out.token_ids, "reason": out.stop_reason, "first": first}
    # Sampling.
    def sample(seed, **kw):
        p = G.SamplingParams(max_new_tokens=MAX_NEW, seed=seed, **kw)
        return cached_gen.generate(prompt, p).token_ids

    res.update(sample_a=sample(5, temperature=1.5), sample_b=sample(5, temperature=1.5),
               sample_c=sample(6, temperature=1.5),
               sample_uncached=plain_gen.generate(
                   prompt, G.SamplingParams(max_new_tokens=MAX_NEW, seed=5, temperature=1.5)
               ).token_ids,
               topk1=sample(9, temperature=1.0, top_k=1),
               topp_small=sample(9, temperature=1.0, top_p=1e-6))
    parsed = G.parse_answer(cached.answer_ids, tok)
    res["parsed_text_len"] = len(parsed.text)
    if world > 1:
        # The same checkpoint at TP=1 (data-parallel replicas) must give the same greedy answer.
        reinit(1, 1)
        cfg1 = G.generation_config(root, 1)
        model1 = G.load_generation_model(root, cfg1)
        res["tp1_tokens"] = G.OmniGenerator.for_tokenizer(model1, tok).generate(
            prompt, greedy).token_ids
        reinit(world, 1)
    return res


def main(out_path: str, tmp: str, save_layout: str) -> None:
    from megatron_omni.config import ParallelConfig
    from megatron_omni.parallel import runtime

    torch.set_num_threads(1)
    runtime.initialize(ParallelConfig(), seed=1234)
    res = generation_checks(Path(tmp), save_layout)
    # Every rank must have produced the same tokens.
    all_res = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(all_res, {k: res[k] for k in ("cached", "sample_a")})
    res["ranks_agree"] = all(r == all_res[0] for r in all_res)
    finish_worker(out_path, res)


if __name__ == "__main__":
    main(*sys.argv[1:4])
