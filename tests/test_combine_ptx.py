"""The one-row-a-thread combine (``memslot.kernels.combine_ptx``) run by its Python emulator
against a brute-force ranking: the networks, the padding they skip, a rare row's places past
the first 2k (merged 8 at a time) and the rows the recheck ranked. The PTX itself runs on a GPU
(``test_kernels_triton.test_the_ptx_combine_gives_the_triton_combines_picks``) and compiles
on any machine (``test_kernels_compile``)."""

import struct

import numpy as np
import pytest

from memslot.kernels import combine_ptx
from memslot.kernels.combine_ptx import Emulate, pack_key


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def _raw(score: float, index: int) -> int:
    raw = (_bits(score) << 32) | int(index)
    return raw - (1 << 64) if raw >= 1 << 63 else raw


def brute_force(counts, places, half_s, half_i, n_keys, k, wide, softmax):
    """Every one of the k x k sums ranked: (scores, slots, ranks, each half's sub-keys)."""
    halves = []
    for h in (0, 1):
        if counts[h] >= 0:
            cands = [
                (struct.unpack("<f", struct.pack("<I", (int(r) >> 32) & 0xFFFFFFFF))[0],
                 int(r) & 0x7FFFFFFF)
                for r in places[h][: min(counts[h], wide)]
            ]  # fmt: skip
        else:
            cands = [(float(s), int(i)) for s, i in zip(half_s[h], half_i[h], strict=True)]
        cands.sort(key=lambda c: pack_key(_bits(c[0]), c[1]), reverse=True)
        halves.append(cands[:k])
    (t1, i1), (t2, i2) = (list(zip(*h, strict=True)) for h in halves)
    sums = []
    for a in range(k):
        for b in range(k):
            s = float(np.float32(t1[a]) + np.float32(t2[b]))
            sums.append((pack_key(_bits(s), a * 64 + b), s, a, b))
    sums.sort(reverse=True)
    top = sums[:k]
    scores = np.array([s for _, s, _, _ in top], np.float32)
    if softmax:
        e = np.exp(scores.astype(np.float64) - scores.max())
        scores = e / e.sum()
    slots = [i1[a] * n_keys + i2[b] for _, _, a, b in top]
    return list(scores), slots, [(a, b) for _, _, a, b in top], [list(i1), list(i2)]


def random_row(rng, k, wide, n_keys, count_kinds, ties):
    counts, places, half_s, half_i = [], np.zeros((2, wide), np.int64), [], []
    for h in (0, 1):
        kind = count_kinds[h]
        count = {"ranked": -1, "most": int(rng.integers(k, 2 * k + 1)),
                 "wide": int(rng.integers(k, wide + 1))}[kind]  # fmt: skip
        n = k if count < 0 else count
        index = rng.choice(n_keys, size=n, replace=False)
        score = rng.standard_normal(n).astype(np.float32)
        if ties:  # few distinct scores: the order of equal ones is the index's
            score = np.round(score * 2) / 2
        if count >= 0:
            places[h, :n] = [_raw(s, i) for s, i in zip(score, index, strict=True)]
            places[h, n:] = rng.integers(-(2**62), 2**62, size=wide - n)  # garbage past count
            half_s.append(rng.standard_normal(k).astype(np.float32))  # not read
            half_i.append(rng.integers(0, n_keys, size=k))
        else:  # the recheck's sorted top k
            order = sorted(range(n), key=lambda j: pack_key(_bits(score[j]), index[j]),
                           reverse=True)  # fmt: skip
            half_s.append(score[order])
            half_i.append(index[order])
        counts.append(count)
    return counts, places, half_s, half_i


@pytest.mark.parametrize("k, wide", [(32, 64), (32, 128), (20, 128), (16, 32), (8, 64), (5, 32),
                                     (1, 32)])  # fmt: skip
@pytest.mark.parametrize("ties", [False, True])
def test_the_one_thread_combine_ranks_as_every_sum_ranked(k, wide, ties):
    kp = max(16, 1 << (k - 1).bit_length())
    rng = np.random.default_rng(k * 1000 + wide + ties)
    kinds = [("most", "most"), ("wide", "most"), ("ranked", "wide"), ("ranked", "ranked")]
    for row in range(8):
        counts, places, half_s, half_i = random_row(rng, k, wide, 4096, kinds[row % 4], ties)
        for softmax in (False, True):
            got = Emulate(counts, places, half_s, half_i, 4096, k, wide).run(kp, softmax)
            want = brute_force(counts, places, half_s, half_i, 4096, k, wide, softmax)
            assert got.slots == want[1]
            assert got.ranks == want[2]
            assert got.index == want[3]
            if softmax:
                np.testing.assert_allclose(got.scores, want[0], rtol=1e-6, atol=1e-7)
            else:
                assert got.scores == want[0]  # the fp32 sums, exactly


def test_the_one_thread_combine_refuses_shapes_it_was_not_written_for():
    with pytest.raises(ValueError, match="power of two"):
        combine_ptx.combine_asm(40, 64, 128, True, False)
    with pytest.raises(ValueError, match="multiple"):
        combine_ptx.combine_asm(32, 32, 96, True, False)


def test_the_networks_skip_padding():
    """The 56 pairs past half-rank 0 of top-32 fill 1.75 groups of 32: the comparators with
    the padding of the second are not emitted."""
    ptx = combine_ptx.combine_asm(32, 32, 64, False, False)
    compares = sum(1 for line in ptx.splitlines() if line.startswith("setp.lt.s64"))
    whole = 2 * (2 * 191 + 80) + 2 * 191 + 80 + 2 * 80  # every group of 32 full
    assert len(combine_ptx.rest_pairs(32)) == 56
    assert compares < whole
