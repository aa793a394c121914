"""Packed preference rows (chosen + rejected of each pair as adjacent samples) for checks."""

from __future__ import annotations

import torch


def pref_row(pairs, T: int | None = None, pad_id: int = 0):
    """``pairs``: [(prompt, chosen, rejected)] token lists. Returns a batch dict with
    ``dpo_pairs`` [P, 2], plus the list of (sequence, answer_start) for direct recomputation."""
    seqs, answer_from, segs = [], [], []
    for prompt, chosen, rejected in pairs:
        for ans in (chosen, rejected):
            segs.append(len(seqs))
            seqs.append(prompt + ans)
            answer_from.append(len(prompt))
    lens = [len(s) for s in seqs]
    n = sum(lens)
    T = T or n
    ids = sum(seqs, []) + [pad_id] * (T - n)
    labels = torch.full((T,), pad_id, dtype=torch.long)
    mask = torch.zeros(T)
    cu, pos = [0], []
    for s, a in zip(seqs, answer_from):
        off = cu[-1]
        labels[off:off + len(s) - 1] = torch.tensor(s[1:])
        # position i predicts token i+1: trained where token i+1 is an answer token
        mask[off + a - 1:off + len(s) - 1] = 1.0
        cu.append(off + len(s))
        pos += list(range(len(s)))
    if T > n:
        cu.append(T)
        pos += list(range(T - n))
    pos_t = torch.tensor(pos).expand(3, -1)[:, None, :].contiguous()
    pairs_t = torch.tensor([[2 * i, 2 * i + 1] for i in range(len(pairs))])
    batch = dict(tokens=torch.tensor(ids)[None], labels=labels[None], loss_mask=mask[None],
                 position_ids=pos_t, cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                 dpo_pairs=pairs_t)
    return batch, list(zip(seqs, answer_from))


def random_pairs(seed: int, n: int, vocab: int, prompt_len=(4, 9), ans_len=(2, 6)):
    g = torch.Generator().manual_seed(seed)

    def r(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(1, vocab, (k,), generator=g).tolist()

    return [(r(*prompt_len), r(*ans_len), r(*ans_len)) for _ in range(n)]
