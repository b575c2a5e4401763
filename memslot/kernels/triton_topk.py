"""Fused product-key top-k in Triton: scoring, per-half top-k, top-k of the sums, one kernel.

One program takes BLOCK_N tokens of one head. For each half it streams the n_keys sub-keys in
chunks of BLOCK_C, scores them with one matrix product per chunk, and keeps a running top-k in
registers (a chunk's element enters only if it beats the current k-th best, so after the first
chunks few do). The k x k sums are never formed: with both halves sorted in descending order, the
pair of half-ranks (a, b) is dominated by every (a' <= a, b' <= b), so only the pairs with
(a + 1) * (b + 1) <= k can reach the top k (119 of 1,024 pairs for k = 32). Those candidates are
gathered from registers and ranked again. Neither the n_keys scores nor the candidates touch
global memory.

The backward is deterministic: the gradient of each kept half-score is a sum over the final
picks that used it, formed in a fixed order per row and scattered (unique indices, no atomics)
into a dense (N, H, n_keys) matrix that two matrix products turn into query and key gradients.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))
# Triton's CPU interpreter multiplies bf16 operands of tl.dot as raw bits: upcast there.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=64)
def _candidate_pairs(topk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-rank pairs (a, b) with (a + 1) * (b + 1) <= topk: the only sums that can be top-k."""
    pairs = [(a, b) for a in range(topk) for b in range(topk) if (a + 1) * (b + 1) <= topk]
    ranks = torch.tensor(pairs, dtype=torch.int32, device=device)  # (C, 2)
    return ranks[:, 0].contiguous(), ranks[:, 1].contiguous()


@triton.jit
def _half_topk(
    q_ptr,
    stride_qn,
    keys_ptr,
    stride_kk,
    rows,
    row_mask,
    n_keys,
    half,
    K: tl.constexpr,
    KP: tl.constexpr,
    HALF_P2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Top-K sub-keys of one half for BLOCK_N rows: (scores, indices), (BLOCK_N, KP), descending.

    Columns >= K hold -inf and index 0.
    """
    d = tl.arange(0, HALF_P2)
    d_mask = d < half
    q = tl.load(
        q_ptr + rows[:, None] * stride_qn + d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if IEEE:
        q = q.to(tl.float32)
    kcol = tl.arange(0, KP)
    ccol = tl.arange(0, BLOCK_C)
    # running top-K, unsorted; padding columns hold +inf so they are never the one replaced
    best = tl.where(kcol[None, :] < K, _NEG_INF, float("inf")) + tl.zeros(
        (q.shape[0], KP), tl.float32
    )
    best_idx = tl.zeros((q.shape[0], KP), tl.int32)
    tau = tl.min(best, axis=1)  # the current K-th best score per row
    for c0 in range(0, n_keys, BLOCK_C):
        cols = c0 + ccol
        c_mask = cols < n_keys
        kc = tl.load(
            keys_ptr + cols[:, None] * stride_kk + d[None, :],
            mask=c_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if IEEE:
            s = tl.dot(
                q, tl.trans(kc.to(tl.float32)), input_precision="ieee"
            )  # (BLOCK_N, BLOCK_C) fp32
        else:
            s = tl.dot(q, tl.trans(kc))
        s = tl.where(c_mask[None, :] & (s > tau[:, None]), s, _NEG_INF)
        entering = tl.sum((s > _NEG_INF).to(tl.int32), axis=1)
        n_iter = tl.minimum(tl.max(entering, axis=0), K)
        for _ in range(n_iter):
            m, am = tl.max(s, axis=1, return_indices=True)
            enter = m > tau
            pos = tl.argmin(best, axis=1)
            hit = (kcol[None, :] == pos[:, None]) & enter[:, None]
            best = tl.where(hit, m[:, None], best)
            best_idx = tl.where(hit, (c0 + am)[:, None], best_idx)
            s = tl.where(ccol[None, :] == am[:, None], _NEG_INF, s)
            tau = tl.min(best, axis=1)
    # sort the K kept scores in descending order
    best = tl.where(kcol[None, :] < K, best, _NEG_INF)
    top = tl.full((q.shape[0], KP), _NEG_INF, tl.float32)
    top_idx = tl.zeros((q.shape[0], KP), tl.int32)
    for j in range(K):
        m, am = tl.max(best, axis=1, return_indices=True)
        sel = kcol[None, :] == am[:, None]
        picked = tl.sum(tl.where(sel, best_idx, 0), axis=1)
        put = kcol[None, :] == j
        top = tl.where(put, m[:, None], top)
        top_idx = tl.where(put, picked[:, None], top_idx)
        best = tl.where(sel, _NEG_INF, best)
    return top, top_idx


@triton.jit
def _product_key_topk_kernel(
    q1_ptr,
    q2_ptr,
    k1_ptr,
    k2_ptr,
    pair_a_ptr,
    pair_b_ptr,
    scores_ptr,
    slots_ptr,
    half_idx_ptr,
    pair_rank_ptr,
    N,
    H,
    n_keys,
    half,
    n_pairs,
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
    CP: tl.constexpr,
    HALF_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IEEE: tl.constexpr,
    SAVE_FOR_BACKWARD: tl.constexpr,
):
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    t1, i1 = _half_topk(
        q1_ptr + h * stride_q1h, stride_q1n, k1_ptr + h * stride_k1h, stride_k1k,
        rows, row_mask, n_keys, half, K, KP, HALF_P2, BLOCK_C, IEEE,
    )  # fmt: skip
    t2, i2 = _half_topk(
        q2_ptr + h * stride_q2h, stride_q2n, k2_ptr + h * stride_k2h, stride_k2k,
        rows, row_mask, n_keys, half, K, KP, HALF_P2, BLOCK_C, IEEE,
    )  # fmt: skip

    # candidates: sums of the dominance-pruned half-rank pairs, (BLOCK_N, CP)
    pcol = tl.arange(0, CP)
    p_mask = pcol < n_pairs
    pa = tl.load(pair_a_ptr + pcol, mask=p_mask, other=0)
    pb = tl.load(pair_b_ptr + pcol, mask=p_mask, other=0)
    pa2 = tl.broadcast_to(pa[None, :], (BLOCK_N, CP))
    pb2 = tl.broadcast_to(pb[None, :], (BLOCK_N, CP))
    cand = tl.gather(t1, pa2, axis=1) + tl.gather(t2, pb2, axis=1)
    cand = tl.where(p_mask[None, :], cand, _NEG_INF)
    cand_slot = tl.gather(i1, pa2, axis=1).to(tl.int64) * n_keys + tl.gather(i2, pb2, axis=1)

    kcol = tl.arange(0, KP)
    out_s = tl.zeros((BLOCK_N, KP), tl.float32)
    out_slot = tl.zeros((BLOCK_N, KP), tl.int64)
    out_pa = tl.zeros((BLOCK_N, KP), tl.int32)
    out_pb = tl.zeros((BLOCK_N, KP), tl.int32)
    for j in range(K):
        m, am = tl.max(cand, axis=1, return_indices=True)
        sel = pcol[None, :] == am[:, None]
        put = kcol[None, :] == j
        out_s = tl.where(put, m[:, None], out_s)
        out_slot = tl.where(put, tl.sum(tl.where(sel, cand_slot, 0), axis=1)[:, None], out_slot)
        if SAVE_FOR_BACKWARD:
            out_pa = tl.where(put, tl.sum(tl.where(sel, pa2, 0), axis=1)[:, None], out_pa)
            out_pb = tl.where(put, tl.sum(tl.where(sel, pb2, 0), axis=1)[:, None], out_pb)
        cand = tl.where(sel, _NEG_INF, cand)

    out_off = (rows[:, None] * H + h) * K + kcol[None, :]
    out_mask = row_mask[:, None] & (kcol[None, :] < K)
    tl.store(scores_ptr + out_off, out_s.to(scores_ptr.dtype.element_ty), mask=out_mask)
    tl.store(slots_ptr + out_off, out_slot, mask=out_mask)
    if SAVE_FOR_BACKWARD:
        # (2, N, H, K) each: which sub-key each half kept, and which half-rank each pick used
        half_stride = N * H * K
        tl.store(half_idx_ptr + out_off, i1, mask=out_mask)
        tl.store(half_idx_ptr + half_stride + out_off, i2, mask=out_mask)
        tl.store(pair_rank_ptr + out_off, out_pa, mask=out_mask)
        tl.store(pair_rank_ptr + half_stride + out_off, out_pb, mask=out_mask)


@triton.jit
def _half_score_grad_kernel(
    grad_ptr,
    half_idx_ptr,
    pair_rank_ptr,
    dense_ptr,
    R,
    n_keys,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dense[half, r, half_idx[half, r, a]] = sum_j grad[r, j] * (pair_rank[half, r, j] == a)."""
    half = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kcol = tl.arange(0, KP)
    mask = (rows[:, None] < R) & (kcol[None, :] < K)
    off = rows[:, None] * K + kcol[None, :]
    g = tl.load(grad_ptr + off, mask=mask, other=0.0).to(tl.float32)
    rank = tl.load(pair_rank_ptr + half * R * K + off, mask=mask, other=-1)
    kept = tl.load(half_idx_ptr + half * R * K + off, mask=mask, other=0)
    acc = tl.zeros((BLOCK_R, KP), tl.float32)
    for a in range(K):
        total = tl.sum(tl.where(rank == a, g, 0.0), axis=1)
        acc = tl.where(kcol[None, :] == a, total[:, None], acc)
    dst = dense_ptr + half * R * n_keys + rows[:, None].to(tl.int64) * n_keys + kept
    tl.store(dst, acc.to(dense_ptr.dtype.element_ty), mask=mask)


def _next_pow2(x: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(1, x)))


def product_key_topk_forward(
    q1: torch.Tensor,
    q2: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    topk: int,
    save_for_backward: bool = False,
    block_n: int | None = None,
    block_c: int = 128,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(scores, slots, half_idx, pair_rank); see ``reference.product_key_topk``.

    scores (N, H, topk) fp32, descending (one rounding of the fp32 sum, where the reference
    rounds each half-score to the input dtype: the layer's softmax is in fp32 anyway); slots (N, H, topk) int64. With
    ``save_for_backward``, half_idx (2, N, H, topk) int32 holds the sub-keys each half kept and
    pair_rank (2, N, H, topk) int32 the half-ranks each pick combined; otherwise both are None.
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
    half_idx = pair_rank = None
    if save_for_backward:
        half_idx = torch.empty(2, N, H, topk, dtype=torch.int32, device=device)
        pair_rank = torch.empty(2, N, H, topk, dtype=torch.int32, device=device)
    if N == 0:
        return scores, slots, half_idx, pair_rank
    pair_a, pair_b = _candidate_pairs(topk, device)
    if block_n is None:
        block_n = 64 if N >= 64 * 132 else 32 if N >= 1024 else 16
    grid = (triton.cdiv(N, block_n), H)
    _product_key_topk_kernel[grid](
        q1, q2, keys1, keys2, pair_a, pair_b, scores, slots,
        half_idx if save_for_backward else slots, pair_rank if save_for_backward else slots,
        N, H, n_keys, half, pair_a.numel(),
        q1.stride(0), q1.stride(1), q2.stride(0), q2.stride(1),
        keys1.stride(0), keys1.stride(1), keys2.stride(0), keys2.stride(1),
        # every dim at least 16: Triton 3.6 fails to compile reductions over 4-wide tiles
        K=topk, KP=_next_pow2(topk, 16), CP=_next_pow2(pair_a.numel(), 16),
        HALF_P2=_next_pow2(half, 16), BLOCK_N=block_n,
        BLOCK_C=min(block_c, _next_pow2(n_keys, 16)),
        IEEE=q1.dtype == torch.float32 or _INTERPRETED, SAVE_FOR_BACKWARD=save_for_backward,
        num_warps=num_warps or (8 if block_n >= 64 else 4),
    )  # fmt: skip
    return scores, slots, half_idx, pair_rank


def half_score_grads(
    grad_scores: torch.Tensor, half_idx: torch.Tensor, pair_rank: torch.Tensor, n_keys: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """Gradient of the loss with respect to every half-score: (2, N, H, n_keys) in ``dtype``."""
    _, N, H, K = half_idx.shape
    dense = torch.zeros(2, N, H, n_keys, dtype=dtype, device=grad_scores.device)
    R = N * H
    if R == 0:
        return dense
    block_r = 32
    _half_score_grad_kernel[(triton.cdiv(R, block_r), 2)](
        grad_scores.contiguous(), half_idx, pair_rank, dense, R, n_keys,
        K=K, KP=_next_pow2(K, 16), BLOCK_R=block_r,
    )  # fmt: skip
    return dense


class ProductKeyTopK(torch.autograd.Function):
    """Fused top-k; scores are differentiable in the query halves and the sub-keys."""

    @staticmethod
    def forward(ctx, q1, q2, keys1, keys2, topk: int):  # noqa: D102
        needs_grad = any(ctx.needs_input_grad[:4])
        scores, slots, half_idx, pair_rank = product_key_topk_forward(
            q1, q2, keys1, keys2, topk, save_for_backward=needs_grad
        )
        ctx.mark_non_differentiable(slots)
        if needs_grad:
            ctx.save_for_backward(q1, q2, keys1, keys2, half_idx, pair_rank)
        return scores, slots

    @staticmethod
    def backward(ctx, grad_scores, _grad_slots):  # noqa: D102
        q1, q2, keys1, keys2, half_idx, pair_rank = ctx.saved_tensors
        dense = half_score_grads(grad_scores, half_idx, pair_rank, keys1.shape[1], q1.dtype)
        g1, g2 = dense[0], dense[1]  # (N, H, n_keys) each
        need = ctx.needs_input_grad
        dq1 = torch.einsum("nhk,hkd->nhd", g1, keys1.to(q1.dtype)) if need[0] else None
        dq2 = torch.einsum("nhk,hkd->nhd", g2, keys2.to(q1.dtype)) if need[1] else None
        dk1 = torch.einsum("nhk,nhd->hkd", g1, q1).to(keys1.dtype) if need[2] else None
        dk2 = torch.einsum("nhk,nhd->hkd", g2, q2).to(keys2.dtype) if need[3] else None
        return dq1, dq2, dk1, dk2, None


def product_key_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, slots), each (N, H, topk); the Triton version of ``reference.product_key_topk``."""
    return ProductKeyTopK.apply(q1, q2, keys1, keys2, topk)
