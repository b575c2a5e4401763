"""The memory layer's lookup and read for inference, pipelined: top-k beside the bag gather.

The half top-k kernel (``triton_topk``) is bound by latency and arithmetic; the bag gather by
DRAM bandwidth. Run one after the other, the layer pays for both. Here they run at once:

* the half kernel runs row block by row block and, as each program stores its picks, adds one
  to that block's counter in ``ready`` (a release);
* a reader kernel, launched on a side stream right after it with a small grid of programs that
  stay resident, takes groups of TOK tokens in order: it waits until their row block's counter
  reaches 2 * H (an acquire), combines both halves' picks into each head's top-k
  (``_combine_rows``), takes the softmax, stores slots and weights for the caller, and gathers,
  weights, gates and stores each token's bag.

Deadlock cannot happen: the half kernel never waits, it is launched first, and the reader's
grid is small enough that the half kernel's programs always find room beside it (a reader
program that runs before its block is ready only spins). Under serial execution (one kernel at
a time) the half kernel finishes before the reader starts, and the reader never waits.

``overlap=False`` launches the reader after the half kernel on the same stream, one group of
tokens a program, with no waiting: the same outputs, bit for bit.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from memslot.kernels.triton_topk import (
    _INTERPRETED,
    _candidate_pairs,
    _combine_rows,
    _next_pow2,
    _split_pairs,
    half_block_rows,
    half_topk,
    normalise_query,
)

LAUNCHED: dict[str, object] = {}


@triton.jit
def _lookup_read_kernel(
    half_s_ptr,
    half_i_ptr,
    pair_a_ptr,
    pair_b_ptr,
    col0_id_ptr,
    rest_a_ptr,
    rest_b_ptr,
    rest_id_ptr,
    values_ptr,
    gate_ptr,
    out_ptr,
    slots_ptr,
    weights_ptr,
    ready_ptr,
    N,
    H,
    n_keys,
    n_pairs,
    n_rest,
    D,
    stride_v,
    n_groups,
    K: tl.constexpr,
    KP: tl.constexpr,
    CP: tl.constexpr,
    RP: tl.constexpr,
    SPLIT: tl.constexpr,
    TOK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HALF_ROWS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
    WAIT: tl.constexpr,
    GATE: tl.constexpr,
):
    """For each group of TOK tokens (groups pid, pid + programs, ...): each head's top-K from
    both halves' picks, their softmax weights, and out[n] = silu(gate[n]) * sum of the weighted
    value rows (fp32, rounded once); slots and weights (N, H, K) stored too. With WAIT a group
    first waits for its row block of the half kernel (TOK divides HALF_ROWS)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    B = H * K  # one bag of every head's picks per token
    local = tl.arange(0, BLOCK_R)
    kcol = tl.arange(0, KP)
    k_ok = kcol[None, :] < K
    R = N * H
    for grp in range(pid, n_groups, programs):
        n0 = grp * TOK
        if WAIT:
            done = tl.atomic_add(ready_ptr + n0 // HALF_ROWS, 0, sem="acquire")
            while done < 2 * H:
                done = tl.atomic_add(ready_ptr + n0 // HALF_ROWS, 0, sem="acquire")
            tl.debug_barrier()
        rows = n0 * H + local
        row_mask = (local < TOK * H) & (rows < R)
        s, slot, _, _ = _combine_rows(
            half_s_ptr, half_i_ptr, pair_a_ptr, pair_b_ptr, rows, row_mask, R, n_keys, n_pairs,
            col0_id_ptr, rest_a_ptr, rest_b_ptr, rest_id_ptr, n_rest, K, KP, CP, SPLIT, RP,
            BLOCK_R,
        )  # fmt: skip
        # softmax over each row's K picks (s descending: the first is the largest)
        top = tl.max(tl.where(k_ok, s, float("-inf")), axis=1)
        top = tl.where(row_mask, top, 0.0)
        e = tl.where(k_ok, tl.exp(s - top[:, None]), 0.0)
        w = e / tl.where(row_mask, tl.sum(e, axis=1), 1.0)[:, None]
        off = rows[:, None] * K + kcol[None, :]
        mask = row_mask[:, None] & k_ok
        tl.store(slots_ptr + off, slot, mask=mask)
        tl.store(weights_ptr + off, w, mask=mask)
        tl.debug_barrier()  # the group's slots and weights stored before the bags read them
        for t in range(TOK):
            n = (n0 + t).to(tl.int64)
            if n < N:
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    d_mask = d < D
                    acc = tl.zeros((BLOCK_D,), tl.float32)
                    for b0 in tl.range(0, B, BLOCK_B, num_stages=STAGES):
                        b = b0 + tl.arange(0, BLOCK_B)
                        b_mask = b < B
                        idx = tl.load(slots_ptr + n * B + b, mask=b_mask, other=0)
                        wb = tl.load(weights_ptr + n * B + b, mask=b_mask, other=0.0)
                        vrows = tl.load(
                            values_ptr + idx[:, None] * stride_v + d[None, :],
                            mask=b_mask[:, None] & d_mask[None, :],
                            other=0.0,
                        ).to(tl.float32)
                        acc += tl.sum(vrows * wb[:, None], axis=0)
                    if GATE:
                        x = tl.load(gate_ptr + n * D + d, mask=d_mask, other=0.0).to(tl.float32)
                        acc = acc * x * tl.sigmoid(x)
                    tl.store(out_ptr + n * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


# reader tiles (H200 sweep in docs/BENCHMARKS.md): tokens a group, rows a gather tile, value
# columns a tile, pipeline stages of the gather loop, warps, resident programs a multiprocessor
READER_TILES = dict(tok=4, block_b=16, block_d=1024, stages=1, num_warps=4, per_sm=2)


@functools.lru_cache(maxsize=8)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter: a few programs, each taking several groups
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def lookup_read(
    q: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    topk: int,
    norm_weight: torch.Tensor | None,
    values: torch.Tensor,
    gate: torch.Tensor | None,
    out_dtype: torch.dtype,
    overlap: bool | None = None,
    **tiles,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (N, Dv) in ``out_dtype``, slots (N, H, topk) int64, weights (N, H, topk) fp32) of
    queries q (N, H, k_dim): the forward of ``reference.lookup_read``, not differentiable.

    ``overlap`` (default: on CUDA) runs the bag gather beside the top-k; ``tiles`` override
    ``READER_TILES`` (benchmarks sweep them)."""
    N, H, k_dim = q.shape
    D = values.shape[1]
    t = dict(READER_TILES, **tiles)
    device = q.device
    if overlap is None:
        overlap = device.type == "cuda" and not _INTERPRETED
    out = torch.empty(N, D, dtype=out_dtype, device=device)
    slots = torch.empty(N, H, topk, dtype=torch.int64, device=device)
    weights = torch.empty(N, H, topk, dtype=torch.float32, device=device)
    normed = normalise_query(q, norm_weight)  # (2, H, N, half)
    q1, q2 = normed[0].transpose(0, 1), normed[1].transpose(0, 1)
    if N == 0:
        half_topk(q1, q2, keys1, keys2, topk)  # validates topk
        return out, slots, weights
    half_rows = half_block_rows(N)
    tok = max(1, min(t["tok"], max(1, 16 // H)))
    while half_rows % tok:  # a group's tokens lie in one row block of the half kernel
        tok -= 1
    ready = torch.zeros(triton.cdiv(N, half_rows), dtype=torch.int32, device=device)
    main = torch.cuda.current_stream(device) if device.type == "cuda" else None
    side = _side_stream(device) if overlap and device.type == "cuda" else None
    if side is not None:
        side.wait_stream(main)  # the reader starts after its inputs and the zeroed counters
    half_s, half_idx = half_topk(q1, q2, keys1, keys2, topk, ready=ready)
    if values.stride(1) != 1:
        values = values.contiguous()
    if gate is not None:
        gate = gate.contiguous()
    pair_a, pair_b = _candidate_pairs(topk, device)
    col0_id, rest_a, rest_b, rest_id, n_rest = _split_pairs(topk, device)
    kp = _next_pow2(topk, 16)
    n_groups = triton.cdiv(N, tok)
    grid = (min(n_groups, t["per_sm"] * _multiprocessors(device)),) if overlap else (n_groups,)
    block_d = min(t["block_d"], _next_pow2(D, 16))
    block_b = min(t["block_b"], _next_pow2(H * topk, 16))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        LAUNCHED["reader"] = _lookup_read_kernel[grid](
            half_s, half_idx, pair_a, pair_b, col0_id, rest_a, rest_b, rest_id, values,
            out if gate is None else gate, out, slots, weights, ready, N, H, keys1.shape[1],
            pair_a.numel(), n_rest, D, values.stride(0), n_groups,
            K=topk, KP=kp, CP=_next_pow2(pair_a.numel(), 16),
            RP=_next_pow2(max(n_rest, kp), 16), SPLIT=True, TOK=tok,
            BLOCK_R=_next_pow2(tok * H, 16), HALF_ROWS=half_rows, BLOCK_B=block_b,
            BLOCK_D=block_d, STAGES=t["stages"], WAIT=overlap, GATE=gate is not None,
            num_warps=t["num_warps"],
        )  # fmt: skip
    if side is not None:
        main.wait_stream(side)
    return out, slots, weights
