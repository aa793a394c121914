#!/usr/bin/env python
"""Benchmark: forward+backward of our megatron-core LLM vs the same-size transformers Llama.

Both models get the same weights (loaded through our HF adapter), the same tokens, one process,
fp32 on CPU (or the GPU when present). Prints the mean step time of each and the ratio
ours / transformers, for an unpacked row and for a packed row of 4 samples (ours uses THD segments,
transformers runs the 4 samples as a padded batch, the usual alternative).

    python bench/bench_llm.py [--layers 4 --hidden 512 --seq 1024 --iters 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def timeit(fn, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from megatron_omni.parallel.cpu_compat import import_megatron_fast

    import_megatron_fast()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_omni.config import ParallelConfig, load_config
    from megatron_omni.models.attention import packed_seq_params
    from megatron_omni.models.llm import build_llm, load_full_llm_state
    from megatron_omni.models.weight_maps.llm import hf_to_megatron, llm_config_from_hf
    from megatron_omni.parallel import runtime

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_PORT", "29731")
    runtime.initialize(ParallelConfig(), env=runtime.DistEnv(0, 1, 0, "127.0.0.1",
                                                             int(os.environ["MASTER_PORT"]),
                                                             "single"))
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=131072, tie_word_embeddings=False,
                         attn_implementation="sdpa",
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg)
    cfg = load_config(None, ["model.vision.enabled=false", "model.audio.enabled=false"])
    cfg.model.llm = llm_config_from_hf(hf_cfg.to_dict())
    ours = build_llm(cfg)
    load_full_llm_state(ours, hf_to_megatron(hf.state_dict(), cfg.model.llm, args.vocab))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf.to(device)
    ours.to(device)

    s = args.seq
    ids = torch.randint(0, args.vocab, (1, s), device=device)
    labels = torch.randint(0, args.vocab, (1, s), device=device)
    pos = torch.arange(s, device=device)[None]

    def step_ours(packed=None):
        def f():
            ours.zero_grad(set_to_none=True)
            if packed is None:
                loss = ours(ids, pos, labels=labels).mean()
            else:
                loss = ours(ids, packed[0], labels=labels, packed_seq_params=packed[1]).mean()
            loss.backward()
        return f

    def step_hf(batch_ids, batch_labels):
        def f():
            hf.zero_grad(set_to_none=True)
            logits = hf(batch_ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                     batch_labels.flatten())
            loss.backward()
        return f

    q = s // 4
    packed_pos = torch.cat([torch.arange(q, device=device)] * 4)[None]
    cu = torch.arange(0, s + 1, q, dtype=torch.int32, device=device)
    rows = [
        ("unpacked row", step_ours(), step_hf(ids, labels)),
        ("packed 4 samples", step_ours((packed_pos, packed_seq_params(cu))),
         step_hf(ids.view(4, q), labels.view(4, q))),
    ]
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"# bench_llm: {platform.node()} {platform.machine()} {device} threads={args.threads} "
          f"torch {torch.__version__}")
    print(f"# model: layers={args.layers} hidden={args.hidden} heads={args.heads}/"
          f"{args.kv_heads} ffn={args.ffn} vocab={args.vocab} params={n_params / 1e6:.1f}M "
          f"seq={s}")
    print(f"{'case':<18} {'ours ms':>9} {'hf ms':>9} {'ours/hf':>8} {'ours tok/s':>11}")
    for name, f_ours, f_hf in rows:
        t_ours = timeit(f_ours, args.iters)
        t_hf = timeit(f_hf, args.iters)
        print(f"{name:<18} {t_ours * 1e3:9.1f} {t_hf * 1e3:9.1f} {t_ours / t_hf:8.2f} "
              f"{s / t_ours:11.0f}")
    runtime.destroy()


if __name__ == "__main__":
    main()
