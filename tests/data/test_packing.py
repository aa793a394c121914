"""Tests of megatron_omni.data.packing: invariants over many random buffers, worked examples,
streaming == batch, determinism, and efficiency against first fit on the realistic mix."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from megatron_omni.data.packing import (
    STRATEGIES,
    Packer,
    PackingConfig,
    PackingStats,
    SampleInfo,
    pack_samples,
    realistic_mix,
    select_samples_to_pack,
)

# ----------------------------------------------------------------------------- helpers


def random_buffer(rng: random.Random, seq_length: int, n: int) -> list[SampleInfo]:
    """Random descriptors including edge cases: empty, exactly seq_length, too long, media-heavy."""
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.05:
            out.append(SampleInfo(f"s{i}", 0, 0, 0, "text"))
        elif kind < 0.10:
            out.append(SampleInfo(f"s{i}", seq_length, 0, 0, "text"))
        elif kind < 0.35:
            out.append(SampleInfo(f"s{i}", rng.randint(1, 2 * seq_length), 0, 0, "text"))
        elif kind < 0.45:
            out.append(SampleInfo(f"s{i}", rng.randint(1, seq_length // 3), 0, 0, "audio"))
        else:
            imgs = rng.randint(1, 5)
            vis = rng.randint(1, seq_length)
            n_tok = vis + rng.randint(0, seq_length // 4)
            out.append(SampleInfo(f"s{i}", n_tok, imgs, 4 * vis, rng.choice(["image", "video"])))
    return out


def random_config(rng: random.Random, strategy: str) -> PackingConfig:
    S = rng.choice([16, 64, 100, 512, 4096])
    return PackingConfig(
        seq_length=S,
        max_images_per_row=rng.choice([None, 0, 1, 2, 4, 8]),
        max_patches_per_row=rng.choice([None, S, 2 * S, 4 * S]),
        truncate_text=rng.random() < 0.5,
        pad_to_seq_length=rng.random() < 0.8,
        strategy=strategy,
    )


def expected_fate(s: SampleInfo, cfg: PackingConfig) -> tuple[str, int]:
    """Independent statement of the admission rules: ('skip', reason) or ('keep', length)."""
    n = s.num_tokens
    if n == 0:
        return "skip", "empty"
    if n > cfg.seq_length:
        if cfg.truncate_text and s.modality == "text" and s.num_images == 0 and s.num_patches == 0:
            n = cfg.seq_length
        else:
            return "skip", "too_long"
    if cfg.max_images_per_row is not None and s.num_images > cfg.max_images_per_row:
        return "skip", "too_many_images"
    if cfg.max_patches_per_row is not None and s.num_patches > cfg.max_patches_per_row:
        return "skip", "too_many_patches"
    return "keep", n


def check_result(samples: list[SampleInfo], cfg: PackingConfig, res) -> None:
    by_id = {s.id: s for s in samples}
    S = cfg.seq_length
    seen: Counter = Counter()
    real = 0
    truncated = 0
    for row in res.rows:
        assert row.sample_ids, "empty row"
        assert row.seq_length == S
        # budgets
        assert sum(row.lengths) <= S
        imgs = sum(by_id[i].num_images for i in row.sample_ids)
        pats = sum(by_id[i].num_patches for i in row.sample_ids)
        assert row.num_images == imgs and row.num_patches == pats
        if cfg.max_images_per_row is not None:
            assert imgs <= cfg.max_images_per_row
        if cfg.max_patches_per_row is not None:
            assert pats <= cfg.max_patches_per_row
        # whole samples, truncation only where allowed
        for sid, length in zip(row.sample_ids, row.lengths):
            fate, want = expected_fate(by_id[sid], cfg)
            assert fate == "keep", (sid, want)
            assert length == want
            if length != by_id[sid].num_tokens:
                assert row.truncated[sid] == by_id[sid].num_tokens
                truncated += 1
            else:
                assert sid not in row.truncated
            seen[sid] += 1
        assert row.modalities == tuple(by_id[i].modality for i in row.sample_ids)
        # samples inside a row keep arrival order
        order = [samples.index(by_id[i]) for i in row.sample_ids]
        assert order == sorted(order)
        # cu_seqlens
        cu, cup = row.cu_seqlens, row.cu_seqlens_padded
        assert cu.dtype == np.int32 and cup.dtype == np.int32
        assert cu[0] == 0 and list(np.diff(cu)) == list(row.lengths)
        assert row.num_tokens == int(cu[-1]) == sum(row.lengths)
        if cfg.pad_to_seq_length:
            assert row.num_pad == S - row.num_tokens
        else:
            assert row.num_pad == 0
        if row.num_pad:
            assert list(cup) == list(cu) + [S]
            te = row.cu_seqlens_te_padded()
            assert len(te) == len(cu) and list(te[:-1]) == list(cu[:-1]) and te[-1] == S
        else:
            assert np.array_equal(cup, cu)
        assert np.array_equal(row.position_starts, cu[:-1])
        pos = row.position_ids()
        assert len(pos) == int(cup[-1])
        assert all(pos[int(st)] == 0 for st in cup[:-1])
        assert np.all(np.diff(pos)[np.diff(pos) != 1] <= 0)  # only ever +1 or a restart
        real += row.num_tokens
    # rows ordered by their earliest sample
    firsts = [samples.index(by_id[r.sample_ids[0]]) for r in res.rows]
    assert firsts == sorted(firsts)
    # exactly once: packed or skipped, never both
    skipped_ids = [sid for sid, _ in res.skipped]
    assert len(skipped_ids) == len(set(skipped_ids))
    assert all(c == 1 for c in seen.values())
    assert set(seen) | set(skipped_ids) == set(by_id) and not set(seen) & set(skipped_ids)
    for sid, reason in res.skipped:
        assert expected_fate(by_id[sid], cfg) == ("skip", reason)
    # stats
    st = res.stats
    assert st.rows == len(res.rows) and st.samples == sum(seen.values())
    assert st.real_tokens == real and st.slots == len(res.rows) * S
    assert st.skipped == Counter(r for _, r in res.skipped)
    assert st.truncated == truncated
    assert st.efficiency == pytest.approx(real / st.slots if st.rows else 0.0)
    assert 0.0 <= st.efficiency <= 1.0


def rows_key(rows):
    return [(r.sample_ids, r.lengths, r.cu_seqlens.tolist(), r.cu_seqlens_padded.tolist(),
             r.num_pad) for r in rows]


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_invariants_random_buffers(strategy):
    for seed in range(60):
        rng = random.Random(seed * 31 + len(strategy))
        cfg = random_config(rng, strategy)
        samples = random_buffer(rng, cfg.seq_length, rng.randint(0, 120))
        check_result(samples, cfg, pack_samples(samples, cfg))


def test_invariants_realistic_mix_with_media_budgets():
    for seed in range(6):
        for S in (4096, 8192):
            for mi, mp in [(None, None), (4, 24576), (2, None), (8, S)]:
                cfg = PackingConfig(S, mi, mp, truncate_text=True)
                samples = realistic_mix(300, seed)
                check_result(samples, cfg, pack_samples(samples, cfg))


def test_auto_never_worse_than_first_fit_and_beats_naive_on_realistic_mix():
    for seed in range(8):
        samples = realistic_mix(400, seed)
        for S in (4096, 8192):
            for mi, mp in [(None, None), (4, 24576), (2, None)]:
                base = dict(
                    seq_length=S, max_images_per_row=mi, max_patches_per_row=mp, truncate_text=True
                )
                ours = pack_samples(samples, PackingConfig(**base)).stats
                ff = pack_samples(samples, PackingConfig(**base, strategy="first_fit")).stats
                naive = pack_samples(samples, PackingConfig(**base, strategy="one_per_row")).stats
                assert ours.real_tokens == ff.real_tokens == naive.real_tokens
                assert ours.efficiency >= ff.efficiency, (seed, S, mi, mp)
                assert ours.efficiency > 1.5 * naive.efficiency
                if mi is None:  # token budget only: BFD is within ~1% of the bound
                    assert ours.efficiency >= 0.98, (seed, S, ours.efficiency)
                    assert ours.efficiency > ff.efficiency


def test_best_fit_decreasing_alone_beats_first_fit_token_budget():
    for seed in range(8):
        samples = realistic_mix(400, seed)
        for S in (4096, 8192):
            bfd = pack_samples(
                samples, PackingConfig(S, truncate_text=True, strategy="best_fit_decreasing")
            )
            ff = pack_samples(samples, PackingConfig(S, truncate_text=True, strategy="first_fit"))
            assert bfd.stats.rows < ff.stats.rows


@pytest.mark.parametrize("buffer_size", [1, 7, 64, 1000])
def test_streaming_packer_equals_batch_on_chunks(buffer_size):
    rng = random.Random(buffer_size)
    cfg = PackingConfig(512, max_images_per_row=3, max_patches_per_row=1024, truncate_text=True)
    samples = random_buffer(rng, 512, 300)
    packer = Packer(cfg, buffer_size=buffer_size)
    streamed, emitted_at = [], []
    for i, s in enumerate(samples):
        out = packer.add(s)
        if out:
            emitted_at.append(i + 1)
        streamed.extend(out)
    assert len(packer) == len(samples) % buffer_size
    streamed.extend(packer.flush())
    assert len(packer) == 0 and packer.flush() == []
    # rows are emitted exactly when a buffer fills
    assert all(k % buffer_size == 0 for k in emitted_at)
    batch, stats, skipped = [], PackingStats(512), []
    for k in range(0, len(samples), buffer_size):
        res = pack_samples(samples[k : k + buffer_size], cfg)
        batch.extend(res.rows)
        stats += res.stats
        skipped.extend(res.skipped)
    assert streamed == batch
    assert rows_key(streamed) == rows_key(batch)
    assert packer.stats.as_dict() == stats.as_dict()
    assert packer.skipped == skipped
    # pack_iter is the same thing
    assert list(Packer(cfg, buffer_size).pack_iter(samples)) == batch
    if buffer_size >= len(samples):
        assert rows_key(batch) == rows_key(pack_samples(samples, cfg).rows)


def test_deterministic_for_same_input_order():
    for seed in range(5):
        samples = realistic_mix(500, seed)
        for mi in (None, 2):
            cfg = PackingConfig(8192, max_images_per_row=mi, truncate_text=True)
            a = pack_samples(samples, cfg)
            b = pack_samples(list(samples), cfg)
            assert rows_key(a.rows) == rows_key(b.rows)
            assert a.stats.as_dict() == b.stats.as_dict()


# ----------------------------------------------------------------------------- worked examples


def test_worked_example_budgets_truncation_and_padding():
    cfg = PackingConfig(seq_length=8, max_images_per_row=1, truncate_text=True)
    samples = [
        SampleInfo("A", 5, modality="text"),
        SampleInfo("B", 3, 1, 12, "image"),
        SampleInfo("C", 2, 1, 8, "image"),
        SampleInfo("D", 3, modality="text"),
        SampleInfo("E", 9, modality="audio"),  # longer than the row, not text: skipped
        SampleInfo("F", 12, modality="text"),  # pure text: cut to 8
        SampleInfo("G", 4, 2, 16, "image"),  # two images > max 1: skipped
    ]
    res = pack_samples(samples, cfg)
    # Decreasing dominant size: F(8) B(img) C(img) A(5) D(3). F fills a row; B and C cannot share
    # (one image per row); A best-fits next to B (room 5 -> 0); D goes with C.
    assert [r.sample_ids for r in res.rows] == [("A", "B"), ("C", "D"), ("F",)]
    ab, cd, f = res.rows
    assert ab.cu_seqlens.tolist() == [0, 5, 8] and ab.num_pad == 0
    assert ab.cu_seqlens_padded.tolist() == [0, 5, 8]
    assert cd.lengths == (2, 3)
    assert cd.cu_seqlens.tolist() == [0, 2, 5] and cd.num_pad == 3
    assert cd.cu_seqlens_padded.tolist() == [0, 2, 5, 8]
    assert cd.cu_seqlens_te_padded().tolist() == [0, 2, 8]
    assert cd.position_starts.tolist() == [0, 2]
    assert cd.position_ids().tolist() == [0, 1, 0, 1, 2, 0, 1, 2]
    assert (cd.num_images, cd.num_patches) == (1, 8)
    assert f.lengths == (8,) and f.truncated == {"F": 12} and f.cu_seqlens.tolist() == [0, 8]
    assert res.skipped == [("E", "too_long"), ("G", "too_many_images")]
    st = res.stats
    assert (st.rows, st.samples, st.real_tokens, st.slots) == (3, 5, 21, 24)
    assert st.efficiency == pytest.approx(21 / 24)
    assert (st.truncated, st.truncated_tokens) == (1, 4)
    assert st.as_dict()["skipped/too_long"] == 1 and st.as_dict()["skipped/too_many_images"] == 1

    # without truncation F is skipped; without padding the rows end at their real length
    res2 = pack_samples(samples, PackingConfig(8, max_images_per_row=1, pad_to_seq_length=False))
    assert ("F", "too_long") in res2.skipped
    cd2 = [r for r in res2.rows if r.sample_ids == ("C", "D")][0]
    assert cd2.num_pad == 0 and cd2.cu_seqlens_padded.tolist() == [0, 2, 5]


def test_worked_example_bfd_beats_first_fit():
    samples = [SampleInfo(i, n) for i, n in enumerate([4, 4, 6, 6])]
    ff = pack_samples(samples, PackingConfig(10, strategy="first_fit"))
    assert [r.sample_ids for r in ff.rows] == [(0, 1), (2,), (3,)]
    for strategy in ("best_fit_decreasing", "auto"):
        res = pack_samples(samples, PackingConfig(10, strategy=strategy))
        assert [r.sample_ids for r in res.rows] == [(0, 2), (1, 3)]
        assert res.stats.efficiency == 1.0
    naive = pack_samples(samples, PackingConfig(10, strategy="one_per_row"))
    assert [r.sample_ids for r in naive.rows] == [(0,), (1,), (2,), (3,)]
    assert naive.stats.efficiency == pytest.approx(20 / 40)


def test_worked_example_best_fit_picks_tightest_row():
    # 7 and 5 open two rows (room 3 and 5); 3 must go to the row with room 3, so 5 still fits.
    samples = [SampleInfo("a", 7), SampleInfo("b", 5), SampleInfo("c", 3), SampleInfo("d", 5)]
    res = pack_samples(samples, PackingConfig(10, strategy="best_fit_decreasing"))
    assert [r.sample_ids for r in res.rows] == [("a", "c"), ("b", "d")]


def test_select_samples_to_pack_energon_shape():
    samples = [
        {"key": k, "n": n, "img": i}
        for k, n, i in [("x", 6, 1), ("y", 4, 1), ("z", 4, 0), ("w", 20, 0)]
    ]
    stats = PackingStats(10)
    groups = select_samples_to_pack(
        samples,
        PackingConfig(10, max_images_per_row=1),
        info=lambda s: SampleInfo(
            s["key"], s["n"], s["img"], 4 * s["img"], "image" if s["img"] else "audio"
        ),
        stats=stats,
    )
    assert [[s["key"] for s in g] for g in groups] == [["x", "z"], ["y"]]
    assert all(g[0] is samples[["x", "y", "z", "w"].index(g[0]["key"])] for g in groups)
    assert stats.skipped == Counter({"too_long": 1}) and stats.rows == 2


def test_config_validation_messages():
    with pytest.raises(ValueError, match="seq_length"):
        PackingConfig(0)
    with pytest.raises(ValueError, match="max_images_per_row"):
        PackingConfig(8, max_images_per_row=-1)
    with pytest.raises(ValueError, match="strategy"):
        PackingConfig(8, strategy="magic")
    with pytest.raises(ValueError, match="buffer_size"):
        Packer(PackingConfig(8), buffer_size=0)
    with pytest.raises(ValueError, match="negative"):
        pack_samples([SampleInfo("n", -1)], PackingConfig(8))
