"""Preference pairs (DPO, the alignment stage) packed whole: chosen and rejected side by side.

Preprocessing validates a preference record (docs/data_format.md section 3) and stores it as ONE
sample whose ``num_tokens`` is the sum of both sequences. :class:`PreferenceTaskEncoder` is the
``OmniTaskEncoder`` of the preference dataset: it packs such records by their stored counts
(media counted twice: each sequence carries the prompt's images, videos and audio), decodes the
media once, templates the pair into its two sequences and writes them as two adjacent samples of
the row (``<key>/chosen``, ``<key>/rejected``). The batch gains ``dpo_pairs``, a ``[P, 2]``
LongTensor of (chosen, rejected) segment indices into ``cu_seqlens``, which
``training/dpo.py`` reads.

Because a record is one Energon sample, a pair is always in one packed row, hence one
micro-batch, hence on the data-parallel rank that reads that row: Energon slices the dataset by
sample, never inside one. The shared prompt is computed twice (once per sequence); sharing its
keys/values between both answers would need a custom attention mask, which the THD packed
attention we use does not express.

Anything else in the dataset (chat or text records) is skipped and counted as ``not_preference``.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.energon import edataclass, stateless

from megatron_omni.data.loaders import OmniSample, OmniTaskEncoder, PackedRow
from megatron_omni.data.packing import PackingStats, SampleInfo, select_samples_to_pack
from megatron_omni.data.templates import PreferencePair

CHOSEN, REJECTED = "chosen", "rejected"


@edataclass
class PreferenceRow(PackedRow):
    """A packed row of whole pairs; ``pairs``: (chosen, rejected) segment indices in the row."""

    pairs: list = None


class PreferenceTaskEncoder(OmniTaskEncoder):
    """Task encoder of the preference dataset (see the module docstring)."""

    @staticmethod
    def sample_info(s: OmniSample) -> SampleInfo:
        r = s.record
        return SampleInfo(s.__key__, int(r["num_tokens"]), 2 * int(r["num_images"]),
                          2 * int(r["num_patches"]), "preference")

    @stateless
    def select_samples_to_pack(self, samples: list[OmniSample]) -> list[list[OmniSample]]:
        keep = []
        for s in samples:
            if s.record.get("form") == "preference":
                keep.append(s)
            else:
                self.skipped["not_preference"] += 1
        stats = PackingStats(seq_length=self.packing.seq_length)
        groups = select_samples_to_pack(keep, self.packing, info=self.sample_info, stats=stats)
        self.skipped.update(stats.skipped)
        return groups

    def _encode(self, s: OmniSample, t, got: dict) -> dict | None:
        r = s.record
        if not isinstance(t, PreferencePair):
            self._skip("not_preference", s.__key__)
            return None
        n = len(t.chosen.input_ids) + len(t.rejected.input_ids)
        if n != int(r["num_tokens"]) or n > self.packing.seq_length:
            self._skip("token_count_mismatch", s.__key__, f"{n} != stored {r['num_tokens']}")
            return None
        return {"pair": [self._sequence(f"{s.__key__}/{CHOSEN}", t.chosen, got),
                         self._sequence(f"{s.__key__}/{REJECTED}", t.rejected, got)]}

    def _concat(self, enc: list[dict]) -> PreferenceRow:
        flat = [e for p in enc for e in p["pair"]]
        row = super()._concat(flat)
        fields = {f.name: getattr(row, f.name) for f in dataclasses.fields(PackedRow)}
        return PreferenceRow(**fields, pairs=[(2 * i, 2 * i + 1) for i in range(len(enc))])

    @stateless
    def batch(self, rows: list[PreferenceRow]) -> dict:
        out = super().batch(rows)
        pairs, offset = [], 0
        for r in rows:
            pairs += [(offset + c, offset + j) for c, j in r.pairs]
            offset += len(r.cu_seqlens) - 1
        out["dpo_pairs"] = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
        return out
