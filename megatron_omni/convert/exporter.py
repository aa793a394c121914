"""megatron-omni distributed checkpoint -> M2-omni release layout or a transformers Llama; and the
logit check against transformers (``verify``).

Export runs in ONE process whatever TP/PP the checkpoint was saved at: it reads the global (TP=1)
view one transformer layer at a time (:class:`.checkpoint_io.MegatronCheckpointReader`),
converts that layer's tensors through the weight maps (``models/weight_maps``) and hands them to
a shard writer that flushes a ``*.safetensors`` file whenever ``max_shard_bytes`` is reached.
Peak memory is about one layer plus one shard.

LoRA: parameters named ``X.lora_A[.name].weight`` / ``X.lora_B[.name].weight`` are merged into
``X.weight`` as ``W + scale * B @ A`` before the map (``training/lora.py``: ``merge_lora``;
scale = ``--lora-scale``, else ``lora_alpha / lora_rank`` from the saved run config).
Alignment-stage (AT) checkpoints hold them in that layout (``training/lora.py``); other
checkpoints have none and this step does nothing.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..data.special_tokens import NUM_SPECIAL, SPECIAL_TOKENS
from ..models.weight_maps import llm as llm_map
from ..models.weight_maps.core import ConversionError, export_tensors, group_units
from .checkpoint_io import MegatronCheckpointReader, ShardedSafetensorsWriter, atomic_output
from .release import (
    check_release_expressible,
    dtype_name,
    llama3_scaling,
    llm_hf_fields,
    release_config,
    release_links,
)

log = logging.getLogger(__name__)

FORMATS = ("release", "llama")

LLAMA_README = """\
# {name}: the LLM of a megatron-omni (M2-omni) checkpoint as a transformers Llama

Exported by `tools/convert_checkpoint.py export --format llama` from `{source}`.
Load it with `transformers.LlamaForCausalLM.from_pretrained(...)`.

## Positions: M-RoPE reduces to Llama's 1-D RoPE for text

The M2-omni LLM uses M-RoPE: the rotary frequency pairs of every head are split into (temporal,
height, width) sections {section} and each section is rotated by its own position index. For a
text token the three indices are equal (t = h = w = the running position), so every pair is
rotated by that one position -- exactly Llama's 1-D RoPE, with the same theta ({theta}) and
{scaling}. This export is therefore exact for text-only inputs (`tools/convert_checkpoint.py
verify` checks the logits against the megatron model). It is NOT the omni model: images, video
and audio need the encoders, projectors and 3-D positions of the full release export
(`--format release`).

## Vocabulary

`vocab_size` = {vocab}: the base tokenizer's {base} tokens, the {num_special} M2-omni special
tokens (`{first_special}` ... `{last_special}`, ids {base}..{last_special_id}) and {codebook}
speech-output codes `<speech_0>` ... (ids {speech0}..{last_id}). Use the base model's tokenizer
with these tokens appended in this order (megatron_omni/data/special_tokens.py); the tokenizer
files are not part of the megatron checkpoint.

LoRA: {lora}
"""


def llama_hf_config(cfg, dtype: torch.dtype, token_ids: Optional[dict] = None) -> dict:
    """transformers ``LlamaConfig`` dict for our LLM (1-D RoPE, with the llama3 scaling only if
    the checkpoint was trained with it)."""
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **llm_hf_fields(cfg),
           "torch_dtype": dtype_name(dtype)}
    scaling = llama3_scaling(cfg)
    out["rope_scaling"] = {"rope_type": "llama3", **scaling} if scaling else None
    out.update(token_ids or {})
    return out


def _lora_scale(reader: MegatronCheckpointReader, scale: Optional[float]) -> Optional[float]:
    if not reader.lora_pairs():
        return scale
    if scale is None:
        scale = reader.lora_scale_from_config()
    if scale is None:
        raise ConversionError("the checkpoint holds LoRA deltas (*lora_A*/*lora_B*) but its "
                              "config names no lora_alpha/lora_rank; pass --lora-scale")
    return scale


def export_checkpoint(checkpoint, out, fmt: str = "release", force: bool = False,
                      max_shard_bytes: int = 5 * 10**9, dtype: Optional[torch.dtype] = None,
                      lora_scale: Optional[float] = None, progress: bool = True) -> dict:
    """Export ``checkpoint`` (a step directory or a checkpoint root) to ``out``.

    ``fmt``: ``release`` (M2-omni layout, every part) or ``llama`` (the LLM alone as a
    ``LlamaForCausalLM``). ``dtype``: cast every tensor (None keeps the stored dtypes).
    Returns a summary dict.
    """
    from tqdm import tqdm

    from ..training.lora import is_lora_name

    if fmt not in FORMATS:
        raise ConversionError(f"unknown export format {fmt!r}; use one of {FORMATS}")
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it")
    reader = MegatronCheckpointReader(checkpoint)
    cfg = reader.cfg
    scale = _lora_scale(reader, lora_scale)
    lora = reader.lora_pairs()
    if fmt == "release":
        check_release_expressible(cfg)
        links = release_links(cfg)
    else:
        links = llm_map.links(cfg.model.llm, ours="llm.", hf="")
    targets = {link.ours for link in links}
    names = [n for n in reader.names() if not is_lora_name(n)]
    lacking = sorted(targets - set(names))
    if lacking:
        raise ConversionError(f"{reader.dir} lacks {len(lacking)} tensor(s) its config implies: "
                              f"{lacking[:8]}")
    stray = sorted(n for n in names if n not in targets
                   and (fmt == "release" or n.startswith("llm.")))
    if stray:
        raise ConversionError(f"{reader.dir} holds tensor(s) the {fmt} layout has no place for: "
                              f"{stray[:8]}{' ...' if len(stray) > 8 else ''}")
    llm_dtype = dtype or reader.dtype("llm.embedding.word_embeddings.weight")
    conv = reader.extra_state.get("conversion") if isinstance(reader.extra_state, dict) else None
    token_ids = dict((conv or {}).get("llama_config") or {})

    written = 0
    with atomic_output(out, force) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        units = group_units(links)
        bar = tqdm(total=len(links), desc=f"export {fmt}", unit="tensor", disable=not progress)
        for unit in units:
            tensors = reader.read_merged([link.ours for link in unit], scale)
            for link in unit:
                for name, t in export_tensors(link, tensors[link.ours]).items():
                    writer.add(name, t if dtype is None else t.to(dtype))
                    written += 1
                bar.update(1)
            del tensors
        bar.close()
        index = writer.close()
        if fmt == "release":
            config = release_config(cfg, llm_dtype, token_ids)
        else:
            config = llama_hf_config(cfg, llm_dtype, token_ids)
            (tmp / "README.md").write_text(_llama_readme(out.name, reader, cfg, bool(lora)))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"out": str(out), "format": fmt, "tensors": written,
            "shards": len(set(index["weight_map"].values())),
            "bytes": index["metadata"]["total_size"], "lora_merged": len(lora),
            "source": str(reader.dir)}


def _llama_readme(name: str, reader: MegatronCheckpointReader, cfg, lora: bool) -> str:
    from ..models.omni import special_token_ids

    sp = special_token_ids(cfg)
    llm = cfg.model.llm
    scaling = llama3_scaling(cfg)
    scaling_text = ("the same Llama-3.1 frequency scaling (factor {factor}, low/high frequency "
                    "factors {low_freq_factor}/{high_freq_factor}, original context "
                    "{original_max_position_embeddings})".format(**scaling)
                    if scaling else "no frequency scaling")
    return LLAMA_README.format(
        name=name, source=reader.dir, section=tuple(llm.mrope_section), theta=llm.rotary_base,
        scaling=scaling_text, vocab=llm.vocab_size, base=sp.base_vocab_size,
        num_special=NUM_SPECIAL, first_special=SPECIAL_TOKENS[0], last_special=SPECIAL_TOKENS[-1],
        last_special_id=sp.speech_offset - 1, codebook=sp.speech_codebook_size,
        speech0=sp.speech_offset, last_id=sp.vocab_size - 1,
        lora="LoRA deltas were merged into the weights (W + scale * B @ A)." if lora else
        "the checkpoint held no LoRA deltas.")


# --- verify --------------------------------------------------------------------------------------

def load_llm_from_checkpoint(checkpoint, lora_scale: Optional[float] = None):
    """``(OmniLLM, cfg)``: our LLM at TP=PP=1 (local layer spec, fp32) with the checkpoint's
    weights, read through the streaming reader (any saved TP/PP; vocabulary padding re-done)."""
    from ..config.validate import padded_vocab_size
    from ..models.llm import build_llm, load_full_llm_state
    from ..training.lora import is_lora_name
    from .checkpoint_io import ensure_single_rank_megatron

    reader = MegatronCheckpointReader(checkpoint)
    cfg = reader.cfg
    cfg.model.transformer_impl = "local"
    cfg.training.bf16 = False
    cfg.training.fp8 = None
    cfg.parallel.tensor_model_parallel_size = 1
    cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.virtual_pipeline_model_parallel_size = None
    cfg.parallel.sequence_parallel = False
    cfg.parallel.first_stage_num_layers = None
    cfg.parallel.context_parallel_size = 1
    ensure_single_rank_megatron()
    scale = _lora_scale(reader, lora_scale)
    names = [n for n in reader.names() if n.startswith("llm.") and not is_lora_name(n)]
    full = {n[4:]: t for n, t in reader.read_merged(names, scale).items()}
    llm = cfg.model.llm
    padded = padded_vocab_size(llm.vocab_size, llm.make_vocab_size_divisible_by, 1)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in full:
            t = full[key][:llm.vocab_size]
            full[key] = torch.cat([t, t.new_zeros(padded - t.shape[0], t.shape[1])], 0)
    model = build_llm(cfg, pre_process=True, post_process=True)
    load_full_llm_state(model, full)
    return model.eval(), cfg


def verify(checkpoint, hf_dir=None, tolerance: float = 1e-4, batch: int = 2, seq_len: int = 32,
           seed: int = 0, lora_scale: Optional[float] = None, progress: bool = False) -> dict:
    """Logits of our LLM (from ``checkpoint``) vs transformers' ``LlamaForCausalLM`` (``hf_dir``,
    or a temporary LLM export of the checkpoint) on the same random tokens, positions
    0..seq_len-1. Returns ``{"max": .., "mean": .., "ok": max <= tolerance, ...}``."""
    from transformers import LlamaForCausalLM

    model, cfg = load_llm_from_checkpoint(checkpoint, lora_scale)
    vocab = cfg.model.llm.vocab_size
    with tempfile.TemporaryDirectory(prefix="omni_verify_") as tmp:
        if hf_dir is None:
            hf_dir = Path(tmp) / "llama"
            export_checkpoint(checkpoint, hf_dir, "llama", dtype=torch.float32,
                              lora_scale=lora_scale, progress=progress)
        hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    if hf.config.vocab_size != vocab:
        raise ConversionError(f"{hf_dir} has vocab_size {hf.config.vocab_size}, the checkpoint "
                              f"{vocab}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    pos = torch.arange(seq_len).expand(batch, seq_len)
    device = next(model.parameters()).device
    with torch.no_grad():
        ours = model(ids.to(device), pos.to(device))[..., :vocab].float().cpu()
        ref = hf(input_ids=ids, position_ids=pos).logits.float()
    diff = (ours - ref).abs()
    result = {"max": float(diff.max()), "mean": float(diff.mean()), "tolerance": tolerance,
              "tokens": batch * seq_len, "hf_dir": str(hf_dir)}
    result["ok"] = result["max"] <= tolerance
    return result
