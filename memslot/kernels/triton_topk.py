"""Fused product-key top-k in Triton: scoring, per-half top-k, top-k of the sums.

Two kernels (three after the Gluon one, below). The half kernel takes BLOCK_N tokens of one half
of one head (grid: row blocks x heads x 2 halves). It streams the n_keys sub-keys in chunks of
BLOCK_C, scored by one matrix product per chunk (the key loads pipelined two stages deep),
twice: the first pass keeps the max of each group of sub-keys c = g (mod BLOCK_C), elementwise
across chunks, and a bisection on those maxima gives a value that K of them reach: a lower bound
on the K-th best score. The second compacts the few scores at or above it (about 43 of 1,024 on
random keys) into a small per-row scratch list (each as its fp32 bits and index in one int64).
Each candidate's place is its row's count so far plus a matrix product of the chunk's kept mask
with the strict upper triangle, and the candidates are stored by inline PTX in the matrix
product's own register layout (a plain ``tl.store`` first moves the tile, its pointers and its
mask to another layout through shared memory). One bitonic top-k (``tl.topk`` on (score, index)
int64 keys ordered as the scores, made from the candidates kept) ranks each row's list: by
default in the combine kernel, whose small programs hide the sort network's latency better than
the half kernel's two a multiprocessor (its program ranks WIDE places where a row of it has more
than CAP). Ranking in the half kernel, a block with a row of more than CAP candidates ranks them
from WIDE places, SUB rows at a time; past WIDE either way the block falls back to a top-k
network over every chunk.

Neither the scores nor the k x k sums reach global memory; the candidates (8 bytes each) and
each half's sorted picks (16 bytes each) do.

On Hopper the candidates come from the warp-specialised Gluon kernel in ``gluon_topk`` instead,
and ``_recheck_kernel`` then ranks the rare blocks past WIDE by that network.

The combine kernel (ranking both halves' candidates first, unless the half kernel did) never
forms the k x k sums either: with both halves sorted in descending order, the pair of
half-ranks (a, b) is dominated by every (a' <= a, b' <= b), so only the pairs
with (a + 1) * (b + 1) <= k can reach the top k (119 of 1,024 pairs for k = 32). Those
candidates are gathered from registers; the sums with half-rank 0 on either side are already in
descending order, so only the other 56 go through a top-k network, and two bitonic merges rank
the three lists. For the memory layer it stores each row's softmax over its k scores (its
weights) instead of the scores, so no kernel of its own runs the softmax. It spreads each row
over a warp's lanes, and its networks' shuffles of int64 keys bound its time (a version that
ran one row a thread in generated PTX, with no shuffle, was slower: docs/BENCHMARKS.md).

``query_topk`` takes whole queries (N, H, k_dim), the strided output of the layer's
projection: one pass writes both halves heads-first (2, H, N, k_dim/2), rms-normalised by the
norm weight when there is one (the query side of qk-norm), for the half kernel to read and the
backward to reuse; its backward is one pass through the norm's derivative into the query's own
layout.

The backward is deterministic: the gradient of each kept half-score is a sum over the final
picks that used it, formed in a fixed order per row and scattered (unique indices, no atomics)
into a dense (H, N, n_keys) matrix per half, written whole by the same kernel, that two batched
matrix products turn into query and key gradients.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from memslot.kernels.ptx import STORE_CANDIDATE, STORE_CANDIDATE_CONSTRAINTS
from memslot.kernels.reference import RMS_EPS

try:  # Gluon (Triton's explicit-layout dialect) for the warp-specialised half kernel on Hopper
    from memslot.kernels import gluon_topk
except (ImportError, AttributeError):  # a Triton without (this) Gluon: the Triton kernels alone
    gluon_topk = None

_NEG_INF = tl.constexpr(float("-inf"))
# the last launch of each kernel (its registers and spills, for the benchmark's report)
LAUNCHED: dict[str, object] = {}
# Triton's CPU interpreter multiplies bf16 operands of tl.dot as raw bits: upcast there.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=64)
def _candidate_pairs(topk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-rank pairs (a, b) with (a + 1) * (b + 1) <= topk: the only sums that can be top-k."""
    pairs = [(a, b) for a in range(topk) for b in range(topk) if (a + 1) * (b + 1) <= topk]
    ranks = torch.tensor(pairs, dtype=torch.int32, device=device)  # (C, 2)
    return ranks[:, 0].contiguous(), ranks[:, 1].contiguous()


@functools.lru_cache(maxsize=64)
def _split_pairs(topk: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For the split combine: the pair ids (places in ``_candidate_pairs``) of the pairs (a, 0),
    a = 1 .. topk - 1, the half-ranks and ids of the pairs with a, b >= 1, and their number."""
    pairs = [(a, b) for a in range(topk) for b in range(topk) if (a + 1) * (b + 1) <= topk]
    pid = {p: i for i, p in enumerate(pairs)}
    col0 = [pid[(a, 0)] for a in range(1, topk)] or [0]
    rest = [(a, b, pid[(a, b)]) for a, b in pairs if a >= 1 and b >= 1]
    t = torch.tensor(rest or [(0, 0, 0)], dtype=torch.int32, device=device)  # n_rest may be 0
    return (
        torch.tensor(col0, dtype=torch.int32, device=device),
        t[:, 0].contiguous(),
        t[:, 1].contiguous(),
        t[:, 2].contiguous(),
        len(rest),
    )


@triton.jit
def _pack(score, index):
    """int64 keys whose signed order is (score descending, then index ascending).

    The fp32 bits become an int32 with the float's order (negative floats have their magnitude
    bits flipped); the low word holds 2**31 - 1 - index, so equal scores rank the lower index
    first. One sort network then carries each score's index with it.
    """
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def _unpack(key):
    """(fp32 score, int32 index) from a key made by ``_pack``."""
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _raw(score, index):
    """A candidate as pass two stores it: (fp32 bits << 32) | index, a few instructions for
    every score it tests; ``_rank_key`` makes a ``_pack`` key of it for the few it kept."""
    return (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | index.to(tl.int64)


@triton.jit
def _rank_key(raw, valid):
    """The ``_pack`` key of a ``_raw`` candidate; below every real key where not valid."""
    score = (raw >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    key = _pack(score, (raw & 0x7FFFFFFF).to(tl.int32))
    return tl.where(valid, key, -9223372036854775807)


@triton.jit
def _store_in_place(ptr, value, mask):
    """``tl.store(ptr, value, mask)`` of int64 values, each thread storing the elements it holds.

    A plain scattered store of a tile that comes out of a matrix product first moves the tile
    into a "coalesced" layout through shared memory (the values, the pointers and the mask);
    scattered places gain nothing from that. Inline PTX leaves the layout alone.
    """
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.global.b64 [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,l",
        [ptr.to(tl.int64, bitcast=True), mask.to(tl.int32), value],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _store_candidate(row_ptr, place, score, col, mask):
    """Store the ``_raw`` candidate (score, col) at ``row_ptr[place]`` (int64 places) where
    mask, each thread storing the elements it holds, like ``_store_in_place``; the address and
    the candidate's two words are formed inside the PTX from the row's pointer, the int32 place,
    the score's bits and the index, so no 64-bit pointer or value tile is held in registers."""
    return tl.inline_asm_elementwise(
        STORE_CANDIDATE,
        STORE_CANDIDATE_CONSTRAINTS,
        [row_ptr.to(tl.int64, bitcast=True), mask.to(tl.int32), place,
         score.to(tl.int32, bitcast=True), col],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )  # fmt: skip


@triton.jit
def _score_chunk(q, keys_ptr, stride_kk, cols, d, n_keys, half, EVEN: tl.constexpr,
                 IEEE: tl.constexpr):  # fmt: skip
    """Scores of BLOCK_N query rows against the sub-keys ``cols``; -inf past n_keys."""
    if EVEN:  # n_keys a multiple of BLOCK_C and half a power of two: no masks
        kc = tl.load(keys_ptr + cols[:, None] * stride_kk + d[None, :])
    else:
        kc = tl.load(
            keys_ptr + cols[:, None] * stride_kk + d[None, :],
            mask=(cols < n_keys)[:, None] & (d < half)[None, :],
            other=0.0,
        )
    if IEEE:
        s = tl.dot(q, tl.trans(kc.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kc))
    if not EVEN:
        s = tl.where((cols < n_keys)[None, :], s, _NEG_INF)
    return s  # (BLOCK_N, BLOCK_C) fp32


@triton.jit
def _kth_bound(group_max, K: tl.constexpr, KP: tl.constexpr, BISECT: tl.constexpr):
    """Per row, a value that at least K of the group maxima reach: a lower bound on the row's
    K-th best score, since the group maxima are distinct scores.

    BISECT == 0: the K-th largest group maximum, by a top-k network. Otherwise BISECT halvings
    of [smallest, largest] group maximum, keeping the largest tested value that K maxima reach:
    no sort, and after about a dozen steps as tight as the K-th maximum on real scores.
    """
    if BISECT == 0:
        kcol = tl.arange(0, KP)
        top = tl.topk(group_max, KP)
        bound = tl.min(tl.where(kcol[None, :] < K, top, float("inf")), axis=1)
    else:
        # empty groups (-inf, n_keys < BLOCK_C) are never counted; >= K groups are non-empty
        lo = tl.min(tl.where(group_max > _NEG_INF, group_max, float("inf")), axis=1)
        hi = tl.max(group_max, axis=1)
        for _ in tl.static_range(BISECT):
            mid = lo + (hi - lo) * 0.5
            reach = tl.sum((group_max >= mid[:, None]).to(tl.int32), axis=1) >= K
            lo = tl.where(reach, mid, lo)
            hi = tl.where(reach, hi, mid)
        bound = lo
    return bound


@triton.jit
def _keep_chunk(s, cols, bound, count, rows, row_mask, scratch, tri,
                WIDE: tl.constexpr, SCAN: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Store the chunk's scores s at or above each row's bound as ``_raw`` candidates at the
    row's next places in scratch (none past WIDE); the rows' new counts (places asked for).

    SCAN 0: places by a prefix sum, plain stores; otherwise by a product with the strict
    triangle ``tri`` (stays in the dot layout), with plain stores (1), stores in the registers'
    own layout (2, no conversion to a coalesced one) or those with the address and candidate
    formed in the PTX (3)."""
    keep = s >= bound[:, None]
    if SCAN == 0:
        place = count[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
        tl.store(
            scratch + rows[:, None] * WIDE + place,
            _raw(s, cols[None, :]),
            mask=keep & (place < WIDE) & row_mask[:, None],
        )
    else:
        if IEEE:
            before = tl.dot(keep.to(tl.float32), tri, input_precision="ieee")
        else:
            before = tl.dot(keep.to(tl.bfloat16), tri)
        place = tl.where(keep & row_mask[:, None], count[:, None] + before.to(tl.int32), WIDE)
        if SCAN == 1:
            tl.store(scratch + rows[:, None] * WIDE + place, _raw(s, cols[None, :]),
                     mask=place < WIDE)  # fmt: skip
        elif SCAN == 2:
            _store_in_place(scratch + rows[:, None] * WIDE + place, _raw(s, cols[None, :]),
                            place < WIDE)  # fmt: skip
        else:
            _store_candidate((scratch + rows.to(tl.int64) * WIDE)[:, None], place, s,
                             cols[None, :], place < WIDE)  # fmt: skip
    return count + tl.sum(keep.to(tl.int32), axis=1)


@triton.jit
def _half_operands(which, h, q1_ptr, q2_ptr, k1_ptr, k2_ptr, stride_q1n, stride_q1h, stride_q2n,
                   stride_q2h, stride_k1h, stride_k1k, stride_k2h, stride_k2k):  # fmt: skip
    """(query rows, their row stride, sub-keys, their row stride) of half ``which`` of head h."""
    if which == 0:
        q_ptr = q1_ptr + h * stride_q1h
        stride_qn = stride_q1n
        keys_ptr = k1_ptr + h * stride_k1h
        stride_kk = stride_k1k
    else:
        q_ptr = q2_ptr + h * stride_q2h
        stride_qn = stride_q2n
        keys_ptr = k2_ptr + h * stride_k2h
        stride_kk = stride_k2k
    return q_ptr, stride_qn, keys_ptr, stride_kk


@triton.jit
def _half_topk_kernel(
    q1_ptr,
    q2_ptr,
    k1_ptr,
    k2_ptr,
    qn_ptr,
    scratch_ptr,
    count_ptr,
    half_s_ptr,
    half_i_ptr,
    N,
    H,
    n_keys,
    half,
    stride_q1n,
    stride_q1h,
    stride_q2n,
    stride_q2h,
    stride_k1h,
    stride_k1k,
    stride_k2h,
    stride_k2k,
    K: tl.constexpr,
    KP: tl.constexpr,
    CAP: tl.constexpr,
    WIDE: tl.constexpr,
    SUB: tl.constexpr,
    HALF_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BISECT: tl.constexpr,
    EVEN: tl.constexpr,
    IEEE: tl.constexpr,
    STOP: tl.constexpr,
    SAVE_Q: tl.constexpr = False,
    SCAN: tl.constexpr = 0,
    late_ptr=None,
    LATER: tl.constexpr = False,
):
    """Top-K sub-keys of one half of one head for BLOCK_N rows, descending, into
    half_s / half_i (2, N, H, K).

    Threshold select in two passes over the sub-keys, each chunk scored by one matrix product:
    1. the max of each group of sub-keys c = g (mod BLOCK_C), elementwise across chunks; a value
       that K group maxima reach is a lower bound on the row's K-th best score (on random keys
       about 43 of 1,024 scores reach it);
    2. the scores at or above the bound, packed with their index, are compacted into WIDE
       scratch places per row (SCAN 0: a prefix sum gives each its place; 1: a product with the
       strict triangle; 2: that, and stores in the registers' layout); one bitonic top-k ranks
       the first CAP places of every row.
    A block where some row has more than CAP candidates ranks its rows SUB at a time from the
    WIDE places; past WIDE (or with fewer than K) it ranks every chunk with the top-k network
    (exact either way, only slower).
    With SAVE_Q the query rows are written to qn (2, H, N, half) for the backward.
    With LATER the common case leaves the ranking to the combine kernel, which has room to
    hide the sort network's latency (up to WIDE candidates a row): each row's candidate count
    goes to late (2, H, N), and -1 there marks a row this kernel ranked itself (the rare blocks
    with a row past WIDE or short of K).
    STOP (benchmarks only) ends early to time the stages: 1 after pass one, 2 after pass two.
    """
    h = tl.program_id(1)
    which = tl.program_id(2)  # 0: first half, 1: second half
    q_ptr, stride_qn, keys_ptr, stride_kk = _half_operands(
        which, h, q1_ptr, q2_ptr, k1_ptr, k2_ptr, stride_q1n, stride_q1h, stride_q2n, stride_q2h,
        stride_k1h, stride_k1k, stride_k2h, stride_k2k,
    )  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    d = tl.arange(0, HALF_P2)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qn + d[None, :],
        mask=row_mask[:, None] & (d < half)[None, :],
        other=0.0,
    )
    if SAVE_Q:
        qn_rows = ((which * H + h) * N + rows).to(tl.int64) * half
        tl.store(qn_ptr + qn_rows[:, None] + d[None, :], q,
                 mask=row_mask[:, None] & (d < half)[None, :])  # fmt: skip
    if IEEE:
        q = q.to(tl.float32)
    ccol = tl.arange(0, BLOCK_C)
    kcol = tl.arange(0, KP)
    out_off = which * N * H * K + (rows[:, None] * H + h) * K + kcol[None, :]
    out_mask = row_mask[:, None] & (kcol[None, :] < K)

    group_max = tl.full((BLOCK_N, BLOCK_C), _NEG_INF, tl.float32)
    for c0 in range(0, n_keys, BLOCK_C):
        s = _score_chunk(q, keys_ptr, stride_kk, c0 + ccol, d, n_keys, half, EVEN, IEEE)
        group_max = tl.maximum(group_max, s)
    bound = _kth_bound(group_max, K, KP, BISECT)  # (BLOCK_N,)
    if STOP == 1:
        tl.store(half_s_ptr + out_off, tl.broadcast_to(bound[:, None], (BLOCK_N, KP)), out_mask)
        return

    scratch = scratch_ptr + ((which * H + h) * N).to(tl.int64) * WIDE  # (2, H, N, WIDE), ``_raw``
    tri = ccol[:, None] < ccol[None, :]  # tri[c', c] = c' < c: keep @ tri counts kept before c
    if IEEE:
        tri = tri.to(tl.float32)
    else:
        tri = tri.to(tl.bfloat16)
    count = tl.zeros((BLOCK_N,), tl.int32)
    for c0 in range(0, n_keys, BLOCK_C):
        cols = c0 + ccol
        s = _score_chunk(q, keys_ptr, stride_kk, cols, d, n_keys, half, EVEN, IEEE)
        count = _keep_chunk(s, cols, bound, count, rows, row_mask, scratch, tri, WIDE, SCAN, IEEE)
    if STOP == 2:
        tl.store(half_i_ptr + out_off, tl.broadcast_to(count[:, None], (BLOCK_N, KP)), out_mask)
        return
    tl.debug_barrier()  # the program's scratch stores before its loads
    most = tl.max(tl.where(row_mask, count, 0), axis=0)
    enough = tl.min(tl.where(row_mask, count, K), axis=0) >= K
    # the common case: every row's candidates in CAP places (WIDE when the combine kernel ranks)
    if enough & (most <= (WIDE if LATER else CAP)):
        if LATER:
            tl.store(late_ptr + (which * H + h) * N + rows, count, mask=row_mask)
        else:
            slot = tl.arange(0, CAP)
            valid = (slot[None, :] < count[:, None]) & row_mask[:, None]
            cand = tl.load(scratch + rows[:, None] * WIDE + slot[None, :], mask=valid, other=0)
            cand = _rank_key(cand, valid)
            _store_half(half_s_ptr, half_i_ptr, out_off, out_mask, tl.topk(cand, KP))
    else:
        if LATER:  # ranked below, in this kernel
            tl.store(late_ptr + (which * H + h) * N + rows, tl.full((BLOCK_N,), -1, tl.int32),
                     mask=row_mask)  # fmt: skip
        if WIDE > CAP:
            if enough & (most <= WIDE):  # rare: ranked from WIDE places, SUB rows at a time
                counts = count_ptr + (which * H + h) * N
                tl.store(counts + rows, count, mask=row_mask)
                tl.debug_barrier()
                wslot = tl.arange(0, WIDE)
                for r0 in range(0, BLOCK_N, SUB):
                    srows = tl.program_id(0) * BLOCK_N + r0 + tl.arange(0, SUB)
                    smask = srows < N
                    scount = tl.load(counts + srows, mask=smask, other=0)
                    valid = (wslot[None, :] < scount[:, None]) & smask[:, None]
                    cand = tl.load(
                        scratch + srows[:, None] * WIDE + wslot[None, :], mask=valid, other=0
                    )
                    cand = _rank_key(cand, valid)
                    soff = which * N * H * K + (srows[:, None] * H + h) * K + kcol[None, :]
                    smk = smask[:, None] & (kcol[None, :] < K)
                    _store_half(half_s_ptr, half_i_ptr, soff, smk, tl.topk(cand, KP))
            else:
                best = _rank_every_chunk(q, keys_ptr, stride_kk, ccol, d, n_keys, half, BLOCK_N,
                                         KP, BLOCK_C, EVEN, IEEE)  # fmt: skip
                _store_half(half_s_ptr, half_i_ptr, out_off, out_mask, best)
        else:
            best = _rank_every_chunk(q, keys_ptr, stride_kk, ccol, d, n_keys, half, BLOCK_N, KP,
                                     BLOCK_C, EVEN, IEEE)  # fmt: skip
            _store_half(half_s_ptr, half_i_ptr, out_off, out_mask, best)


@triton.jit
def _recheck_kernel(
    q1_ptr, q2_ptr, k1_ptr, k2_ptr, late_ptr, half_s_ptr, half_i_ptr, N, H, n_keys, half,
    n_blocks, stride_q1n, stride_q1h, stride_q2n, stride_q2h, stride_k1h, stride_k1k,
    stride_k2h, stride_k2k,
    K: tl.constexpr, KP: tl.constexpr, WIDE: tl.constexpr, HALF_P2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr,
    TURNS: tl.constexpr = 1,
):  # fmt: skip
    """After a half kernel that left each row's candidate count in late (2, H, N) (-1: ranked
    by it): the blocks of BLOCK_N rows with a row out of [K, WIDE] (fewer candidates than K, or
    more than its scratch places: ties at the bound) are ranked here by the exact top-k network
    over every chunk, and their rows marked -1 in late. A few programs stride over all
    2 x H x n_blocks blocks, at most TURNS each: in the common case each reads the counts of
    all its blocks by one load and is done."""
    kcol = tl.arange(0, KP)
    ccol = tl.arange(0, BLOCK_C)
    d = tl.arange(0, HALF_P2)
    n_all = 2 * H * n_blocks
    # every count of the program's blocks at once: (TURNS, BLOCK_N), a block a row
    mine = tl.program_id(0) + tl.arange(0, TURNS) * tl.num_programs(0)
    # (a name of its own: Triton's compiler refuses a variable whose shape the loop changes)
    block_rows = (mine % n_blocks)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    ok = (mine < n_all)[:, None] & (block_rows < N)
    counts = tl.load(late_ptr + (mine // n_blocks)[:, None] * N + block_rows, mask=ok, other=K)
    outside = (tl.min(counts, axis=1) < K) | (tl.max(counts, axis=1) > WIDE)  # (TURNS,)
    if tl.max(outside.to(tl.int32), axis=0) == 0:
        return
    for t in range(tl.program_id(0), n_all, tl.num_programs(0)):
        which = t // (H * n_blocks)
        h = (t // n_blocks) % H
        rows = (t % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        line = (which * H + h) * N + rows
        seen = tl.load(late_ptr + line, mask=row_mask, other=K)
        if (tl.min(seen, axis=0) < K) | (tl.max(seen, axis=0) > WIDE):
            tl.store(late_ptr + line, tl.full((BLOCK_N,), -1, tl.int32), mask=row_mask)
            q_ptr, stride_qn, keys_ptr, stride_kk = _half_operands(
                which, h, q1_ptr, q2_ptr, k1_ptr, k2_ptr, stride_q1n, stride_q1h, stride_q2n,
                stride_q2h, stride_k1h, stride_k1k, stride_k2h, stride_k2k,
            )  # fmt: skip
            q = tl.load(q_ptr + rows[:, None] * stride_qn + d[None, :],
                        mask=row_mask[:, None] & (d < half)[None, :], other=0.0)  # fmt: skip
            if IEEE:
                q = q.to(tl.float32)
            best = _rank_every_chunk(q, keys_ptr, stride_kk, ccol, d, n_keys, half, BLOCK_N, KP,
                                     BLOCK_C, EVEN, IEEE)  # fmt: skip
            off = which * N * H * K + (rows[:, None] * H + h) * K + kcol[None, :]
            _store_half(half_s_ptr, half_i_ptr, off, row_mask[:, None] & (kcol[None, :] < K),
                        best)  # fmt: skip


@triton.jit
def _filter_kernel(stage_ptr, bound_ptr, scratch_ptr, late_ptr, L, STAGE_WIDE: tl.constexpr,
                   WIDE: tl.constexpr, ROWS: tl.constexpr, PIECE: tl.constexpr):  # fmt: skip
    """Keep, for ROWS rows of L, the staged ``_raw`` candidates that reach the row's bound.

    Row r has late[r] candidates at places 0.. of its STAGE_WIDE in stage; those whose score is
    at least bound[r] go, in their order, to its first places in scratch (WIDE a row), and
    late[r] becomes their number. A row with more than STAGE_WIDE (not all were staged) keeps
    its count; one with more than WIDE keepers stores WIDE of them: both counts pass WIDE, so
    the recheck ranks their blocks.
    """
    lines = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = lines < L
    count = tl.load(late_ptr + lines, mask=ok, other=0)
    bound = tl.load(bound_ptr + lines, mask=ok, other=0.0)
    whole = ok & (count <= STAGE_WIDE)
    src = stage_ptr + lines.to(tl.int64)[:, None] * STAGE_WIDE
    dst = scratch_ptr + lines.to(tl.int64)[:, None] * WIDE
    kept = tl.zeros([ROWS], dtype=tl.int32)
    most = tl.max(tl.where(whole, count, 0), axis=0)
    for start in range(0, most, PIECE):
        place = start + tl.arange(0, PIECE)[None, :]
        valid = (place < count[:, None]) & whole[:, None]
        cand = tl.load(src + place, mask=valid, other=0)
        score = (cand >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        keep = valid & (score >= bound[:, None])
        k = keep.to(tl.int32)
        dest = kept[:, None] + tl.cumsum(k, axis=1) - 1
        tl.store(dst + dest, cand, mask=keep & (dest < WIDE))
        kept += tl.sum(k, axis=1)
    tl.store(late_ptr + lines, kept, mask=whole)


def filter_candidates(stage: torch.Tensor, bound: torch.Tensor, scratch: torch.Tensor,
                      late: torch.Tensor, rows: int = 2, piece: int = 64,
                      num_warps: int = 1):  # fmt: skip
    """``_filter_kernel`` over every row of stage (..., STAGE_WIDE) int64 into scratch
    (..., WIDE) int64, by bound (...) fp32, counts in late (...) int32 (updated in place).
    Tiles: 2 rows of 64 places a program, one warp (H200, the stage of 4,096 sub-keys with pass
    one over a quarter: 0.085 ms against 0.088 for 4 rows of 32, 0.109 for 16 rows of 64 and
    4 warps; 71 tiles swept, ``bench/topk_ws.py --filter-sweep``)."""
    L = late.numel()
    if L == 0:
        return None
    return _filter_kernel[(triton.cdiv(L, rows),)](
        stage, bound, scratch, late, L, STAGE_WIDE=stage.shape[-1], WIDE=scratch.shape[-1],
        ROWS=rows, PIECE=piece, num_warps=num_warps,
    )  # fmt: skip


@triton.jit
def _store_half(half_s_ptr, half_i_ptr, off, mask, best):
    """Store a half's sorted top-k keys as scores and sub-key indices."""
    top_s, top_i = _unpack(best)
    tl.store(half_s_ptr + off, top_s, mask=mask)
    tl.store(half_i_ptr + off, top_i, mask=mask)


@triton.jit
def _rank_every_chunk(q, keys_ptr, stride_kk, ccol, d, n_keys, half, BLOCK_N: tl.constexpr,
                      KP: tl.constexpr, BLOCK_C: tl.constexpr, EVEN: tl.constexpr,
                      IEEE: tl.constexpr):  # fmt: skip
    """The exact fallback: every chunk's top-KP by the sort network, merged into a running best."""
    best = tl.full((BLOCK_N, KP), -9223372036854775807, tl.int64)
    for c0 in range(0, n_keys, BLOCK_C):
        cols = c0 + ccol
        s = _score_chunk(q, keys_ptr, stride_kk, cols, d, n_keys, half, EVEN, IEEE)
        chunk = tl.topk(_pack(s, cols[None, :]), KP)  # (BLOCK_N, KP), descending
        # the larger half of two descending lists is max(a, reversed b), then a sort
        best = tl.sort(tl.maximum(best, tl.flip(chunk, 1)), descending=True)
    return best


@triton.jit
def _rank_places(scratch_ptr, line, count, row_mask, start, PLACES: tl.constexpr,
                 WIDE: tl.constexpr, KP: tl.constexpr):  # fmt: skip
    """The top KP ``_pack`` keys, descending, of each row's candidates in scratch places
    start .. start + PLACES (WIDE places a row, the first count[row] of them filled)."""
    slot = start + tl.arange(0, PLACES)
    valid = (slot[None, :] < count[:, None]) & row_mask[:, None]
    cand = tl.load(scratch_ptr + line.to(tl.int64)[:, None] * WIDE + slot[None, :], mask=valid,
                   other=0)  # fmt: skip
    return tl.topk(_rank_key(cand, valid), KP)


@triton.jit
def _ranked_half(half_s_ptr, half_i_ptr, scratch_ptr, late_ptr, rows, row_mask, which, R, H,
                 SAVE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr,
                 WIDE: tl.constexpr):  # fmt: skip
    """Half ``which``'s sorted top-K of (token, head) rows r = n * H + h, descending: (scores
    (BLOCK_R, KP) fp32, -inf past K; sub-key indices int32). A row whose count in late
    (2, H, N) is -1 was ranked by the half kernel (read from half_s / half_i); the others are
    ranked here from their count of candidates in scratch (2, H, N, WIDE): CAP places, and for
    the rare program with a row past CAP the rest CAP at a time, merged in; with SAVE their
    indices are stored to half_i for the backward."""
    N = R // H
    kcol = tl.arange(0, KP)
    off = which * R * K + rows[:, None] * K + kcol[None, :]
    mask = row_mask[:, None] & (kcol[None, :] < K)
    line = (which * H + rows % H) * N + rows // H  # (which, h, n)
    count = tl.load(late_ptr + line, mask=row_mask, other=0)
    best = _rank_places(scratch_ptr, line, count, row_mask, 0, CAP, WIDE, KP)
    if WIDE > CAP:  # rare: a row past CAP places; CAP more at a time up to its count, merged in
        most = tl.minimum(tl.max(count, axis=0), WIDE)
        for start in range(CAP, most, CAP):
            more = _rank_places(scratch_ptr, line, count, row_mask, start, CAP, WIDE, KP)
            # the larger half of two descending lists is max(a, reversed b), then a sort
            best = tl.sort(tl.maximum(best, tl.flip(more, 1)), descending=True)
    score, index = _unpack(best)
    ranked = (count >= 0)[:, None]
    done = mask & (count < 0)[:, None]
    score = tl.where(ranked, score, tl.load(half_s_ptr + off, mask=done, other=0.0))
    index = tl.where(ranked, index, tl.load(half_i_ptr + off, mask=done, other=0))
    if SAVE:
        tl.store(half_i_ptr + off, index, mask=mask & ranked)
    return tl.where(mask, score, _NEG_INF), tl.where(mask, index, 0)


@triton.jit
def _combine_kernel(
    half_s_ptr,
    half_i_ptr,
    pair_a_ptr,
    pair_b_ptr,
    scores_ptr,
    slots_ptr,
    pair_rank_ptr,
    R,
    n_keys,
    n_pairs,
    K: tl.constexpr,
    KP: tl.constexpr,
    CP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SAVE_FOR_BACKWARD: tl.constexpr,
    col0_id_ptr=None,
    rest_a_ptr=None,
    rest_b_ptr=None,
    rest_id_ptr=None,
    n_rest=0,
    SPLIT: tl.constexpr = False,
    RP: tl.constexpr = 16,
    scratch_ptr=None,
    late_ptr=None,
    H=1,
    RANK: tl.constexpr = False,
    CAP: tl.constexpr = 16,
    WIDE: tl.constexpr = 16,
    SOFTMAX: tl.constexpr = False,
):
    """Top-K of the k x k sums for BLOCK_R (token, head) rows, from both halves' sorted top-K
    (with RANK first ranked here from the half kernel's candidates, ``_ranked_half``); with
    SOFTMAX each row's softmax over its K scores is stored instead of the scores.

    The sums are never all formed: with both halves in descending order, the pair of half-ranks
    (a, b) is dominated by every (a' <= a, b' <= b), so only the n_pairs pairs with
    (a + 1) * (b + 1) <= K can reach the top K (119 of 1,024 for K = 32).

    SPLIT ranks them in three parts: the sums of half-rank a = 0 and those of b = 0 are already
    in descending order (the halves are), so only the n_rest pairs with a, b >= 1 (56 for
    K = 32) go through a top-K network; two bitonic merges give the top K of the three. Each
    candidate keeps its place in the full pair list as its index, so ties rank as without SPLIT.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    kcol = tl.arange(0, KP)
    off = rows[:, None] * K + kcol[None, :]
    mask = row_mask[:, None] & (kcol[None, :] < K)
    if RANK:  # the half kernel left most rows' candidates in scratch: rank them here
        t1, i1 = _ranked_half(half_s_ptr, half_i_ptr, scratch_ptr, late_ptr, rows, row_mask, 0,
                              R, H, SAVE_FOR_BACKWARD, K, KP, CAP, WIDE)  # fmt: skip
        t2, i2 = _ranked_half(half_s_ptr, half_i_ptr, scratch_ptr, late_ptr, rows, row_mask, 1,
                              R, H, SAVE_FOR_BACKWARD, K, KP, CAP, WIDE)  # fmt: skip
    else:
        t1 = tl.load(half_s_ptr + off, mask=mask, other=float("-inf"))
        t2 = tl.load(half_s_ptr + R * K + off, mask=mask, other=float("-inf"))
        i1 = tl.load(half_i_ptr + off, mask=mask, other=0)
        i2 = tl.load(half_i_ptr + R * K + off, mask=mask, other=0)

    pcol = tl.arange(0, CP)
    p_mask = pcol < n_pairs
    pa = tl.broadcast_to(tl.load(pair_a_ptr + pcol, mask=p_mask, other=0)[None, :], (BLOCK_R, CP))
    pb = tl.broadcast_to(tl.load(pair_b_ptr + pcol, mask=p_mask, other=0)[None, :], (BLOCK_R, CP))
    if SPLIT:
        # a = 0: t1[0] + t2[b], pair id b; b = 0: t1[a] + t2[0], a >= 1: both descending
        first = kcol[None, :] == 0
        t1_0 = tl.max(tl.where(first, t1, _NEG_INF), axis=1)
        t2_0 = tl.max(tl.where(first, t2, _NEG_INF), axis=1)
        row0 = _pack(t1_0[:, None] + t2, tl.broadcast_to(kcol[None, :], (BLOCK_R, KP)))
        below = kcol + 1 < K
        nxt = tl.broadcast_to(tl.where(below, kcol + 1, 0)[None, :], (BLOCK_R, KP))
        c0_id = tl.load(col0_id_ptr + kcol, mask=below, other=0)
        col0 = tl.where(below[None, :], tl.gather(t1, nxt, axis=1) + t2_0[:, None], _NEG_INF)
        col0 = _pack(col0, tl.broadcast_to(c0_id[None, :], (BLOCK_R, KP)))
        rcol = tl.arange(0, RP)
        r_mask = rcol < n_rest
        ra = tl.broadcast_to(
            tl.load(rest_a_ptr + rcol, mask=r_mask, other=0)[None, :], (BLOCK_R, RP)
        )
        rb = tl.broadcast_to(
            tl.load(rest_b_ptr + rcol, mask=r_mask, other=0)[None, :], (BLOCK_R, RP)
        )
        r_id = tl.load(rest_id_ptr + rcol, mask=r_mask, other=0)
        rest = tl.where(r_mask[None, :], tl.gather(t1, ra, axis=1) + tl.gather(t2, rb, axis=1),
                        _NEG_INF)  # fmt: skip
        rest = tl.topk(_pack(rest, tl.broadcast_to(r_id[None, :], (BLOCK_R, RP))), KP)
        # the larger half of two descending lists is max(a, reversed b): bitonic, then merged
        best = tl.bitonic_merge(tl.maximum(row0, tl.flip(col0, 1)), descending=True)
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(rest, 1)), descending=True)
        out_s, pick = _unpack(best)
    else:
        cand = tl.gather(t1, pa, axis=1) + tl.gather(t2, pb, axis=1)
        cand = tl.where(p_mask[None, :], cand, _NEG_INF)
        out_s, pick = _unpack(tl.topk(_pack(cand, pcol[None, :]), KP))  # (BLOCK_R, KP)
    out_pa = tl.gather(pa, pick, axis=1)
    out_pb = tl.gather(pb, pick, axis=1)
    out_slot = tl.gather(i1, out_pa, axis=1).to(tl.int64) * n_keys + tl.gather(i2, out_pb, axis=1)
    if SOFTMAX:  # the row's largest score is its first: exp(s - max) / sum, in fp32
        top = tl.max(tl.where(mask, out_s, _NEG_INF), axis=1)
        e = tl.where(mask, tl.exp(out_s - tl.where(row_mask, top, 0.0)[:, None]), 0.0)
        out_s = e / tl.where(row_mask, tl.sum(e, axis=1), 1.0)[:, None]
    tl.store(scores_ptr + off, out_s.to(scores_ptr.dtype.element_ty), mask=mask)
    tl.store(slots_ptr + off, out_slot, mask=mask)
    if SAVE_FOR_BACKWARD:  # (2, N, H, K): which half-rank each pick combined
        tl.store(pair_rank_ptr + off, out_pa, mask=mask)
        tl.store(pair_rank_ptr + R * K + off, out_pb, mask=mask)


@triton.jit
def _half_score_grad_kernel(
    grad_ptr,
    half_idx_ptr,
    pair_rank_ptr,
    dense_ptr,
    R,
    H,
    N,
    n_keys,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Whole rows of dense (2, H, N, n_keys): zeros, and at half_idx[half, r, a] the sum over
    the picks j of row r = n * H + h that combined half-rank a, grad[r, j].

    The program writes its rows' zeros and then, after a barrier, their few non-zeros, so the
    scattered stores land in lines it has just written (in L2) instead of a table zeroed by an
    earlier kernel (in DRAM).
    """
    half = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    kcol = tl.arange(0, KP)
    mask = row_mask[:, None] & (kcol[None, :] < K)
    off = rows[:, None] * K + kcol[None, :]
    g = tl.load(grad_ptr + off, mask=mask, other=0.0).to(tl.float32)
    rank = tl.load(pair_rank_ptr + half * R * K + off, mask=mask, other=-1)
    kept = tl.load(half_idx_ptr + half * R * K + off, mask=mask, other=0)
    acc = tl.zeros((BLOCK_R, KP), tl.float32)
    for a in range(K):
        total = tl.sum(tl.where(rank == a, g, 0.0), axis=1)
        acc = tl.where(kcol[None, :] == a, total[:, None], acc)
    out_row = (half * H + rows % H).to(tl.int64) * N + rows // H  # (half, h, n)
    base = dense_ptr + out_row * n_keys  # (BLOCK_R,)
    zeros = tl.zeros((BLOCK_R, BLOCK_K), dense_ptr.dtype.element_ty)
    for k0 in range(0, n_keys, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        tl.store(
            base[:, None] + cols[None, :], zeros, mask=row_mask[:, None] & (cols < n_keys)[None, :]
        )
    tl.debug_barrier()  # the zeros before the values that overwrite some of them
    tl.store(base[:, None] + kept, acc.to(dense_ptr.dtype.element_ty), mask=mask)


def _next_pow2(x: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(1, x)))


# the warp-specialised kernel's tiles where the caller names none, for every n_keys, over
# those of ``_default_ws_tiles`` (``gluon_topk.half_topk_ws``'s keyword arguments; a benchmark
# sets it to compare); None: ``_default_ws_tiles`` alone
WS_TILES: dict | None = None


def _default_ws_tiles(n_keys: int) -> dict:
    """The Gluon kernel's tiles by sub-key count. From 4,096 sub-keys pass one reads a quarter
    of them (H200, whole top-k in turns: 0.99-1.03 ms against 1.05-1.14 with every sub-key; at
    1,024 sub-keys 0.58-0.63 against 0.42, so not there: over only 16 chunks, what sampling
    adds to pass two, the skipped chunks' group maxima and their bisection, outweighs what it
    takes off pass one; with the bound by 6 halvings and pass two overlapped, at 4,096
    sub-keys a quarter 0.90-0.93 ms against 0.95-0.97 for a half). The other tiles are
    ``half_topk_ws``'s defaults."""
    return {"sample": 4} if n_keys >= 4096 else {}


def _default_tiles(N: int) -> dict:
    """Tiles of the half kernel for N rows (H200 sweeps: best at 1,024 and 4,096 sub-keys)."""
    # places of the candidates: 3 = triangle product and stores in place, address and candidate
    # formed in the PTX (H200: 1.780 ms against 1.828 for 2 at 4,096 sub-keys; 231 registers
    # against 242); inline PTX, which the interpreter cannot run: 1, plain stores, there
    # split: the combine kernel merges the sums of half-rank 0 as sorted lists and ranks only
    # the rest by a network (H200: top-k 0.657 ms against 0.692 at 1,024 sub-keys); when the
    # half kernel ranks, it takes 16 rows a program (``combine_rows_ranked``; H200, two calls:
    # 0.638 / 1.725 ms at 1,024 / 4,096 sub-keys against 0.652 / 1.749 with 32)
    # wide: candidate places per row in scratch, for the rare block with a row over the 64 that
    # the common path ranks (128 beat 64, i.e. rescanning the keys, and 256 on the H200)
    scan = 1 if _INTERPRETED else 3
    if N < 1024:
        tiles = dict(block_n=16, block_c=128, num_warps=4, num_stages=2, bisect=12)
    else:
        tiles = dict(block_n=64, block_c=64, num_warps=4, num_stages=2, bisect=12)
    # later: each half's candidates ranked by the combine kernel, 8 rows a program (more
    # programs a multiprocessor to hide the sort network's latency) rather than at the end of
    # the half kernel, two programs a multiprocessor (H200, one call: 0.588 ms against 0.644 at
    # 1,024 sub-keys, 1.740 against 1.736 at 4,096; 16 rows a program 0.608, 32 0.740)
    return dict(tiles, scan=scan, wide=128, split=True, later=True, combine_rows=8,
                combine_rows_ranked=16)  # fmt: skip


def product_key_topk_forward(
    q1: torch.Tensor,
    q2: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    topk: int,
    save_for_backward: bool = False,
    block_n: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
    cap: int | None = None,
    num_stages: int | None = None,
    bisect: int | None = None,
    stop: int = 0,
    scan: int | None = None,
    combine_rows: int | None = None,
    combine_warps: int = 4,
    wide: int | None = None,
    normed_out: torch.Tensor | None = None,
    split: bool | None = None,
    later: bool | None = None,
    ws: bool | None = None,
    ws_tiles: dict | None = None,
    recheck: bool = False,
    softmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(scores, slots, half_idx, pair_rank); see ``reference.product_key_topk``.

    ``normed_out`` (2, H, N, half), when given, receives the query halves heads-first (what the
    key gradient is a product with).

    scores (N, H, topk) fp32, descending (one rounding of the fp32 sum, where the reference
    rounds each half-score to the input dtype: the layer's softmax is in fp32 anyway), or with
    ``softmax`` each row's softmax over them (the combine kernel has the row); slots
    (N, H, topk) int64. With ``save_for_backward``, half_idx (2, N, H, topk) int32 holds the
    sub-keys each half kept and pair_rank (2, N, H, topk) int32 the half-ranks each pick
    combined; otherwise both are None. The other arguments choose tiles (benchmarks sweep them);
    ``stop`` 1 or 2 ends after pass one or two of the half kernel, 3 before the combine kernel,
    and returns garbage (timing). ``combine_rows`` and ``combine_warps`` are the combine
    kernel's tiles. ``later`` ranks each half's candidates in the combine kernel instead of the
    half kernel. ``ws`` (default: where ``gluon_topk.eligible``) finds the
    candidates with the warp-specialised Gluon kernel (``ws_tiles``: its keyword arguments;
    default ``_default_ws_tiles`` updated by ``WS_TILES``; with a sampled bound its staged
    candidates go through ``filter_candidates``),
    then ranks the rare blocks with a row out of range by ``_recheck_kernel`` (``recheck``
    runs that after the Triton half kernel too, for the tests on the CPU).
    """
    N, H, half = q1.shape
    n_keys = keys1.shape[1]
    if topk < 1 or topk > n_keys:
        raise ValueError(f"topk must be in [1, n_keys={n_keys}], got {topk}")
    q1, q2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q1, q2))
    keys1, keys2 = (t.to(q1.dtype) for t in (keys1, keys2))
    keys1, keys2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (keys1, keys2))
    device = q1.device
    scores = torch.empty(N, H, topk, dtype=torch.float32, device=device)
    slots = torch.empty(N, H, topk, dtype=torch.int64, device=device)
    half_s = torch.empty(2, N, H, topk, dtype=torch.float32, device=device)
    half_idx = torch.empty(2, N, H, topk, dtype=torch.int32, device=device)
    pair_rank = torch.empty(2, N, H, topk, dtype=torch.int32, device=device)
    if N == 0:
        return (scores, slots) + ((half_idx, pair_rank) if save_for_backward else (None, None))
    kp = _next_pow2(topk, 16)  # the sort networks need powers of two
    tiles = _default_tiles(N)
    block_n = block_n or tiles["block_n"]
    block_c = max(kp, min(block_c or tiles["block_c"], _next_pow2(n_keys, 16)))
    cap = max(kp, _next_pow2(cap or 2 * kp))  # candidate places per row (fall back past that)
    half_p2 = _next_pow2(half, 16)
    later = tiles["later"] if later is None else later
    if ws_tiles is None:
        ws_tiles = _default_ws_tiles(n_keys) | (WS_TILES or {})
    ws_tiles = dict(ws_tiles)
    ws_ok = normed_out is None and gluon_topk is not None and gluon_topk.eligible(
        q1, q2, keys1, topk, ws_tiles.get("block_c", gluon_topk.BLOCK_C_))  # fmt: skip
    if ws is None:
        ws = later and ws_ok
    elif ws and not ws_ok:
        raise ValueError("ws needs a Hopper GPU, bf16 halves that are views of one (2, H, N, "
                         "half) tensor (no normed_out), half a multiple of 64 up to 256 and "
                         "n_keys a multiple of the Gluon kernel's block_c")  # fmt: skip
    if (ws or recheck) and not later:
        raise ValueError("the warp-specialised half kernel and the recheck leave the ranking to "
                         "the combine kernel: they need later")  # fmt: skip
    # candidate places per row in scratch: a block with a row of more than cap (but at most
    # wide) candidates ranks them from there, SUB rows at a time, instead of rescanning the keys
    wide = max(cap, _next_pow2(wide or tiles["wide"]))
    sub = max(16, min(block_n, 4096 // wide))  # tiles at least 16 wide
    scratch = torch.empty(2, H, N, wide, dtype=torch.int64, device=device)
    counts = torch.empty(2, H, N, dtype=torch.int32, device=device) if wide > cap else scratch
    late = torch.empty(2, H, N, dtype=torch.int32, device=device) if later else counts
    combine_rows = combine_rows or tiles["combine_rows" if later else "combine_rows_ranked"]
    even = n_keys % block_c == 0 and half == half_p2
    ieee = q1.dtype == torch.float32 or _INTERPRETED
    if ws:
        # with pass one over 1 / sample of the sub-keys, pass two stages about sample times the
        # candidates, and the filter keeps those reaching the bound of every sub-key in scratch
        sample = ws_tiles.get("sample", 1)
        stage, bound = scratch, None
        if sample > 1:
            stage = torch.empty(2, H, N, wide * sample, dtype=torch.int64, device=device)
            bound = torch.empty(2, H, N, dtype=torch.float32, device=device)
        LAUNCHED["ws"] = gluon_topk.half_topk_ws(q1, q2, keys1, keys2, stage, late, topk,
                                                 stage.shape[-1], stop=stop if stop < 3 else 0,
                                                 bound=bound, **ws_tiles)  # fmt: skip
        if bound is not None and stop != 1:
            LAUNCHED["filter"] = filter_candidates(stage, bound, scratch, late)
        if stop in (1, 2):  # late holds each row's bound (stop 1) or its candidate count
            return scores, slots, late, None
    else:
        LAUNCHED["half"] = _half_topk_kernel[(triton.cdiv(N, block_n), H, 2)](
            q1, q2, keys1, keys2, q1 if normed_out is None else normed_out, scratch, counts, half_s,
            half_idx, N, H, n_keys, half,
            q1.stride(0), q1.stride(1), q2.stride(0), q2.stride(1),
            keys1.stride(0), keys1.stride(1), keys2.stride(0), keys2.stride(1),
            # every dim at least 16: Triton 3.6 fails to compile reductions over 4-wide tiles
            K=topk, KP=kp, CAP=cap, WIDE=wide, SUB=sub, HALF_P2=half_p2, BLOCK_N=block_n,
            BLOCK_C=block_c,
            BISECT=tiles["bisect"] if bisect is None else bisect,
            EVEN=even, IEEE=ieee, STOP=stop if stop < 3 else 0,
            SCAN=tiles["scan"] if scan is None else scan,
            SAVE_Q=normed_out is not None, late_ptr=late, LATER=later,
            num_warps=num_warps or tiles["num_warps"], num_stages=num_stages or tiles["num_stages"],
        )  # fmt: skip
    if (ws or recheck) and stop in (0, 3):
        n_blocks = triton.cdiv(N, block_n)
        programs = 4 if not q1.is_cuda else 2 * torch.cuda.get_device_properties(
            device).multi_processor_count  # fmt: skip
        # at most 64 blocks a program, so that each reads all its counts by one load
        programs = min(2 * H * n_blocks, max(programs, triton.cdiv(2 * H * n_blocks, 64)))
        LAUNCHED["recheck"] = _recheck_kernel[(programs,)](
            q1, q2, keys1, keys2, late, half_s, half_idx, N, H, n_keys, half, n_blocks,
            q1.stride(0), q1.stride(1), q2.stride(0), q2.stride(1),
            keys1.stride(0), keys1.stride(1), keys2.stride(0), keys2.stride(1),
            K=topk, KP=kp, WIDE=wide, HALF_P2=half_p2, BLOCK_N=block_n, BLOCK_C=block_c,
            EVEN=even, IEEE=ieee,
            TURNS=_next_pow2(triton.cdiv(2 * H * n_blocks, programs), 1),
            num_warps=tiles["num_warps"],
        )  # fmt: skip
    if stop:  # half_s holds each row's bound (stop 1), half_idx its candidate count (stop 2)
        return scores, slots, half_s, half_idx  # or (stop 3) both halves' sorted top-k
    pair_a, pair_b = _candidate_pairs(topk, device)
    split = tiles["split"] if split is None else split
    col0_id, rest_a, rest_b, rest_id, n_rest = _split_pairs(topk, device)
    LAUNCHED["combine"] = _combine_kernel[(triton.cdiv(N * H, combine_rows),)](
        half_s, half_idx, pair_a, pair_b, scores, slots, pair_rank, N * H, n_keys,
        pair_a.numel(), K=topk, KP=kp, CP=_next_pow2(pair_a.numel(), 16), BLOCK_R=combine_rows,
        SAVE_FOR_BACKWARD=save_for_backward, col0_id_ptr=col0_id, rest_a_ptr=rest_a,
        rest_b_ptr=rest_b, rest_id_ptr=rest_id, n_rest=n_rest, SPLIT=split,
        RP=_next_pow2(max(n_rest, kp), 16), scratch_ptr=scratch, late_ptr=late, H=H,
        RANK=later, CAP=cap, WIDE=wide, SOFTMAX=softmax, num_warps=combine_warps,
    )  # fmt: skip
    if not save_for_backward:
        return scores, slots, None, None
    return scores, slots, half_idx, pair_rank


def half_score_grads(
    grad_scores: torch.Tensor, half_idx: torch.Tensor, pair_rank: torch.Tensor, n_keys: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """Gradient of the loss with respect to every half-score: (2, H, N, n_keys) in ``dtype``,
    heads before tokens so that the query and key gradients are plain batched products."""
    _, N, H, K = half_idx.shape
    dense = torch.empty(2, H, N, n_keys, dtype=dtype, device=grad_scores.device)
    R = N * H
    if R == 0:
        return dense
    block_r = 32
    _half_score_grad_kernel[(triton.cdiv(R, block_r), 2)](
        grad_scores.contiguous(), half_idx, pair_rank, dense, R, H, N, n_keys,
        K=K, KP=_next_pow2(K, 16), BLOCK_R=block_r, BLOCK_K=min(256, _next_pow2(n_keys, 16)),
    )  # fmt: skip
    return dense


def _score_grads(
    dense: torch.Tensor,
    normed: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    need_q: bool,
    need_k: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the half-scores' inputs from the dense half-score gradient (2, H, N, n_keys):
    (query halves (2, H, N, half), sub-keys (2, H, n_keys, half)), each None when not needed;
    ``normed`` (2, H, N, half) holds the query halves the scores were computed from."""
    dq = torch.matmul(dense, torch.stack((keys1, keys2)).to(dense.dtype)) if need_q else None
    dk = torch.matmul(dense.transpose(-1, -2), normed) if need_k else None
    return dq, dk


def _forward_for_autograd(ctx, q1, q2, keys1, keys2, topk, normed=None, softmax=False):
    """The fused forward (with ``softmax``, the scores turned into weights); returns what
    ``_backward_of_scores`` needs when a gradient is needed (else None). ``normed``
    (2, H, N, half): the query halves heads-first, of which q1 and q2 are views; otherwise the
    kernel writes them there."""
    needs_grad = any(ctx.needs_input_grad)
    N, H, half = q1.shape
    out = None
    if needs_grad and normed is None:
        normed = out = torch.empty(2, H, N, half, dtype=q1.dtype, device=q1.device)
    scores, slots, half_idx, pair_rank = product_key_topk_forward(
        q1, q2, keys1, keys2, topk, save_for_backward=needs_grad, normed_out=out, softmax=softmax
    )
    ctx.mark_non_differentiable(slots)
    ctx.n_keys = keys1.shape[1]
    ctx.key_dtypes = (keys1.dtype, keys2.dtype)
    return scores, slots, (keys1, keys2, half_idx, pair_rank, normed) if needs_grad else None


def _backward_of_scores(ctx, grad_scores, keys1, keys2, half_idx, pair_rank, normed, need_q,
                        need_k):  # fmt: skip
    """(dq (2, H, N, half) or None, dk1, dk2): gradients through the half-scores."""
    dense = half_score_grads(grad_scores, half_idx, pair_rank, ctx.n_keys, normed.dtype)
    dq, dk = _score_grads(dense, normed, keys1, keys2, need_q, need_k)
    if dk is None:
        return dq, None, None
    return dq, dk[0].to(ctx.key_dtypes[0]), dk[1].to(ctx.key_dtypes[1])


class ProductKeyTopK(torch.autograd.Function):
    """Fused top-k of given query halves; scores are differentiable in the halves and sub-keys."""

    @staticmethod
    def forward(ctx, q1, q2, keys1, keys2, topk: int):  # noqa: D102
        scores, slots, saved = _forward_for_autograd(ctx, q1, q2, keys1, keys2, topk)
        if saved is not None:
            ctx.save_for_backward(*saved)
        return scores, slots

    @staticmethod
    def backward(ctx, grad_scores, _grad_slots):  # noqa: D102
        need = ctx.needs_input_grad
        dq, dk1, dk2 = _backward_of_scores(
            ctx, grad_scores, *ctx.saved_tensors, need[0] or need[1], need[2] or need[3]
        )
        dq1, dq2 = (None, None) if dq is None else (dq[0].transpose(0, 1), dq[1].transpose(0, 1))
        return dq1, dq2, dk1, dk2, None


class QueryTopK(torch.autograd.Function):
    """Top-k of whole queries (N, H, k_dim), qk-norm of the halves included; differentiable in
    the query, the sub-keys and the norm weight."""

    @staticmethod
    def forward(ctx, q, keys1, keys2, norm_weight, topk: int, softmax: bool = False):  # noqa: D102
        # one pass writes the normalised halves heads-first: the top-k kernel reads each head's
        # rows contiguously and the key gradient is a plain batched product with them
        normed = normalise_query(q, norm_weight)  # (2, H, N, half)
        q1, q2 = normed[0].transpose(0, 1), normed[1].transpose(0, 1)  # (N, H, half) views
        out, slots, saved = _forward_for_autograd(ctx, q1, q2, keys1, keys2, topk, normed, softmax)
        ctx.softmax = softmax
        if saved is not None:
            ctx.save_for_backward(q, norm_weight, out if softmax else None, *saved)
        return out, slots

    @staticmethod
    def backward(ctx, grad_out, _grad_slots):  # noqa: D102
        q, norm_weight, weights, *saved = ctx.saved_tensors
        grad_scores = grad_out
        if ctx.softmax:  # through the softmax: w * (g - sum(g * w)) per row
            grad_scores = weights * (grad_out - (grad_out * weights).sum(-1, keepdim=True))
        need = ctx.needs_input_grad
        need_q = need[0] or need[3]
        dq_normed, dk1, dk2 = _backward_of_scores(
            ctx, grad_scores, *saved, need_q, need[1] or need[2]
        )
        dq = dw = None
        if need_q:
            dq, dw = query_grads(dq_normed, q, norm_weight)
        return dq, dk1, dk2, dw, None, None


@triton.jit
def _query_rows(which, R, H, N, half, stride_qn, stride_qh, HALF_P2: tl.constexpr,
                BLOCK_R: tl.constexpr):  # fmt: skip
    """Rows r = n * H + h of the program's block: (offsets of half ``which`` of each row in the
    query (N, H, 2 * half), in the heads-first halves (2, H, N, half), in a contiguous query;
    the columns; the tile's mask)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = (rows // H).to(tl.int64)
    h = rows % H
    d = tl.arange(0, HALF_P2)
    mask = (rows < R)[:, None] & (d < half)[None, :]
    in_q = n * stride_qn + h * stride_qh + which * half
    heads_first = ((which * H + h) * N + n) * half
    contiguous = rows.to(tl.int64) * 2 * half + which * half
    return in_q, heads_first, contiguous, d, mask


@triton.jit
def _query_norm_kernel(
    q_ptr,
    norm_w_ptr,
    out_ptr,
    R,
    H,
    N,
    half,
    eps,
    stride_qn,
    stride_qh,
    HALF_P2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NORM: tl.constexpr,
):
    """out (2, H, N, half) = each half of the query (N, H, 2 * half), rms-normalised and
    scaled by its row of norm_w (when NORM; in fp32, rounded once), BLOCK_R rows of one half."""
    which = tl.program_id(1)
    in_q, heads_first, _, d, mask = _query_rows(which, R, H, N, half, stride_qn, stride_qh,
                                                HALF_P2, BLOCK_R)  # fmt: skip
    x = tl.load(q_ptr + in_q[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        w = tl.load(norm_w_ptr + which * half + d, mask=d < half, other=0.0).to(tl.float32)
        rms = tl.rsqrt(tl.sum(x * x, axis=1) / half + eps)  # (BLOCK_R,)
        x = x * rms[:, None] * w[None, :]
    tl.store(out_ptr + heads_first[:, None] + d[None, :], x.to(out_ptr.dtype.element_ty), mask)


def normalise_query(q: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """The two halves of q (N, H, k_dim), rms-normalised and scaled by norm_weight (2, k_dim/2)
    when given, heads-first: (2, H, N, k_dim/2) in q's dtype."""
    N, H, k_dim = q.shape
    half = k_dim // 2
    out = torch.empty(2, H, N, half, dtype=q.dtype, device=q.device)
    if N * H:
        block_r = 32
        _query_norm_kernel[(triton.cdiv(N * H, block_r), 2)](
            q, q if norm_weight is None else norm_weight.contiguous(), out, N * H, H, N, half,
            RMS_EPS, q.stride(0), q.stride(1), HALF_P2=_next_pow2(half, 16), BLOCK_R=block_r,
            NORM=norm_weight is not None,
        )  # fmt: skip
    return out


@triton.jit
def _query_grad_kernel(
    dqn_ptr,
    q_ptr,
    norm_w_ptr,
    dq_ptr,
    dw_ptr,
    R,
    H,
    N,
    half,
    eps,
    stride_qn,
    stride_qh,
    HALF_P2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NORM: tl.constexpr,
):
    """For BLOCK_R rows r = n * H + h of one half: the query gradient dq (N, H, 2 * half) from
    the gradient dqn (2, H, N, half) of the normalised half (through the qk-norm when NORM),
    and this block's part of the norm weight's gradient, dw (blocks, 2, half) in fp32.

        y = x * rms * w, rms = (mean(x**2) + eps)**-1/2:
        dx = rms * (g * w) - x * rms**3 * mean(g * w * x);  dw = sum_rows g * x * rms
    """
    which = tl.program_id(1)
    in_q, heads_first, contiguous, d, mask = _query_rows(which, R, H, N, half, stride_qn,
                                                         stride_qh, HALF_P2, BLOCK_R)  # fmt: skip
    g = tl.load(dqn_ptr + heads_first[:, None] + d[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    if NORM:
        x = tl.load(q_ptr + in_q[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(norm_w_ptr + which * half + d, mask=d < half, other=0.0).to(tl.float32)
        rms = tl.rsqrt(tl.sum(x * x, axis=1) / half + eps)  # (BLOCK_R,)
        dw = tl.sum(g * x * rms[:, None], axis=0)  # (HALF_P2,)
        tl.store(dw_ptr + (tl.program_id(0) * 2 + which) * half + d, dw, mask=d < half)
        gw = g * w[None, :]
        scale = rms * rms * rms * tl.sum(gw * x, axis=1) / half
        g = rms[:, None] * gw - x * scale[:, None]
    tl.store(dq_ptr + contiguous[:, None] + d[None, :], g.to(dq_ptr.dtype.element_ty), mask=mask)


def query_grads(
    dq_normed: torch.Tensor, q: torch.Tensor, norm_weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dq (N, H, k_dim) in q's dtype, d norm_weight (2, k_dim/2) or None) from the gradient
    (2, H, N, k_dim/2) of the query halves the scores used: one pass through the qk-norm's
    backward, written in the query's own layout."""
    N, H, k_dim = q.shape
    half = k_dim // 2
    dq = torch.empty(N, H, k_dim, dtype=q.dtype, device=q.device)
    R = N * H
    block_r = 32
    blocks = triton.cdiv(R, block_r)
    dw = torch.zeros(blocks, 2, half, dtype=torch.float32, device=q.device)
    if R:
        _query_grad_kernel[(blocks, 2)](
            dq_normed, q, q if norm_weight is None else norm_weight.contiguous(), dq, dw, R, H, N,
            half, RMS_EPS, q.stride(0), q.stride(1), HALF_P2=_next_pow2(half, 16),
            BLOCK_R=block_r, NORM=norm_weight is not None,
        )  # fmt: skip
    if norm_weight is None:
        return dq, None
    return dq, dw.sum(0).to(norm_weight.dtype)


def product_key_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, slots), each (N, H, topk); the Triton version of ``reference.product_key_topk``."""
    return ProductKeyTopK.apply(q1, q2, keys1, keys2, topk)


def query_topk(
    q: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    topk: int,
    norm_weight: torch.Tensor | None = None,
    softmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, slots), each (N, H, topk), or with ``softmax`` (weights, slots), the combine
    kernel turning each row's scores into its softmax; the Triton version of
    ``reference.query_topk``."""
    return QueryTopK.apply(q, keys1, keys2, norm_weight, topk, softmax)
