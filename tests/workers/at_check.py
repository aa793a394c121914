"""Worker (1 rank): an AT checkpoint against the checkpoint it was initialised from, and its
export. argv: result.json INIT_CKPT AT_CKPT EXPORT_DIR -- key=value overrides of the AT run.

* every non-adapter weight (LLM, vision, audio, projectors) of the AT checkpoint is bit-exact
  the initial one; the adapters moved (B != 0);
* logits of the adapted model (LoRA on, TP=PP=1, loaded from the AT checkpoint, resharded)
  equal those of our LLM built from the merged weights ``W + alpha/r B A`` the exporter reads;
* ``export --format release`` merges the adapters (counted) and its merged q/k/v weights equal
  ``W + alpha/r B A`` recomputed from the adapted model's parameters.
"""

import json
import sys

import torch

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from megatron_omni.config import load_config  # noqa: E402
from megatron_omni.convert.exporter import export_checkpoint, load_llm_from_checkpoint  # noqa
from megatron_omni.models.omni import OmniModel, part_of  # noqa: E402
from megatron_omni.parallel import runtime  # noqa: E402
from megatron_omni.training.checkpoint import load_checkpoint  # noqa: E402
from megatron_omni.training.lora import apply_lora, is_lora_param, lora_modules  # noqa: E402

torch.set_num_threads(1)


def main(out_path, args):
    sep = args.index("--")
    (init, at, export_dir), overrides = args[:sep], args[sep + 1:]
    cfg = load_config(None, overrides + ["parallel.tensor_model_parallel_size=1",
                                         "parallel.pipeline_model_parallel_size=1",
                                         "parallel.sequence_parallel=false"])
    runtime.initialize(cfg.parallel, seed=1)
    base = OmniModel(cfg)
    load_checkpoint(init, [base], weights_only=True)
    ad = OmniModel(cfg)
    al = cfg.alignment
    apply_lora([ad], al.lora_rank, al.lora_alpha, targets=al.lora_targets)
    load_checkpoint(at, [ad], weights_only=True)
    result = {"equal": {}, "params": {}}
    adapted = dict(ad.named_parameters())
    for name, p in base.named_parameters():
        part = part_of(name)
        result["params"][part] = result["params"].get(part, 0) + p.numel()
        result["equal"][part] = result["equal"].get(part, True) and torch.equal(p, adapted[name])
    result["adapter_b_max"] = max(m.lora_B.weight.abs().max().item() for m in lora_modules(ad))
    result["adapters"] = sum(1 for n in adapted if is_lora_param(n))

    vocab = cfg.model.llm.vocab_size
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).expand(2, 24)
    merged, _ = load_llm_from_checkpoint(at)
    ad.eval()
    base.eval()
    with torch.no_grad():
        lo_ad = ad.llm(ids, pos)[..., :vocab]
        lo_merged = merged(ids, pos)[..., :vocab]
        lo_base = base.llm(ids, pos)[..., :vocab]
    result["merged_vs_adapted"] = (lo_ad - lo_merged).abs().max().item()
    result["base_vs_adapted"] = (lo_ad - lo_base).abs().max().item()

    summary = export_checkpoint(at, export_dir, "release", progress=False)
    result["lora_merged"] = summary["lora_merged"]
    from pathlib import Path

    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(export_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    q = ad.llm.decoder.layers[0].self_attention.linear_qkv
    w = q.weight + q.lora_scale * q.lora_B.weight @ q.lora_A.weight  # group-major [q;k;v]
    llm = cfg.model.llm
    g, hq, d = llm.num_query_groups, llm.num_attention_heads // llm.num_query_groups, llm.head_dim
    w = w.reshape(g, hq + 2, d, -1)
    want_q = w[:, :hq].reshape(g * hq * d, -1)
    got_q = tensors["language_model.model.layers.0.self_attn.q_proj.weight"].float()
    result["release_q_proj_diff"] = (got_q - want_q).abs().max().item()
    with open(out_path, "w") as f:
        json.dump(result, f)
    runtime.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
