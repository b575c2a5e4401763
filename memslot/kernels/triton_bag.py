"""Weighted embedding bag in Triton: forward, and a deterministic sparse or dense backward.

Forward: one program per (token, block of the value dim) walks the token's bag (all heads'
rows) in tiles of BLOCK_B rows, so each program has BLOCK_B independent row loads in flight, and
accumulates in fp32. Any table dtype (fp32, fp16, bf16) and any value dim (masked tails). The
memory layer's gate can be applied there too: silu(gate) * the bag, rounded once. Where rows
repeat across bags (a batch that reads about as many rows as the table holds, from a table well
past L2), each bag's pairs are first put in slot order by one small sort kernel, so that the
bags running at once read nearby rows and more of the repeats are L2 hits (``order_bags``).

Backward:
* weights: grad_w[n, b] = <values[indices[n, b]], grad_out[n]>, one program per (token, tile
  of bag positions), looping over the value dim;
* value rows: the (slot, bag position) pairs are sorted once (stable, so equal slots stay in bag
  order) and each unique slot's rows are summed by one program in that fixed order: no atomics, so the result is the same bits on every
  run. Rows are written either compactly (sparse: the unique slots and their rows) or straight
  into a zeroed dense table gradient. In autograd, a 16-bit table's gradient rows are summed
  from grad_out rounded once to the table's dtype (half the gathered bytes; the rows are rounded
  to that dtype anyway).
* both at once from a 16-bit grad_out (the layer's training step): one program per unique slot
  (``embedding_bag_backward_fused``), or a fixed grid of programs each walking the sorted pairs
  of a stretch of runs of equal slots, with no host sync before the kernel
  (``embedding_bag_backward_walk``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memslot.kernels import reference


@triton.jit
def _bag_forward_kernel(
    values_ptr,
    indices_ptr,
    weights_ptr,
    out_ptr,
    gate_ptr,
    bag_ptr,
    B,
    D,
    stride_v,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GATE: tl.constexpr,
    KEEP_BAG: tl.constexpr,
):
    """out[n] = the bag of token n, or with GATE silu(gate[n]) * the bag (in fp32, rounded once);
    with KEEP_BAG the ungated bag goes to bag[n] too (for the gate's gradient)."""
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_mask = b < B
        idx = tl.load(indices_ptr + n * B + b, mask=b_mask, other=0).to(tl.int64)
        w = tl.load(weights_ptr + n * B + b, mask=b_mask, other=0.0).to(tl.float32)
        rows = tl.load(
            values_ptr + idx[:, None] * stride_v + d[None, :],
            mask=b_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_B, BLOCK_D)
        acc += tl.sum(rows * w[:, None], axis=0)
    if GATE:
        if KEEP_BAG:
            tl.store(bag_ptr + n * D + d, acc.to(bag_ptr.dtype.element_ty), mask=d_mask)
        x = tl.load(gate_ptr + n * D + d, mask=d_mask, other=0.0).to(tl.float32)
        acc = acc * x * tl.sigmoid(x)
    tl.store(out_ptr + n * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _order_bags_kernel(indices_ptr, weights_ptr, slots_ptr, ordered_w_ptr, N, B,
                       ROWS: tl.constexpr, BP: tl.constexpr, SHIFT: tl.constexpr):  # fmt: skip
    """ROWS bags' (slot, weight) pairs in ascending slot order (equal slots in their order in
    the bag): one sort of (slot << SHIFT | place) keys a bag, the weights gathered by place.
    The keys are int32 where SHIFT (log2 BP) leaves room for the slots, else int64."""
    n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b = tl.arange(0, BP)
    ok = (n[:, None] < N) & (b[None, :] < B)
    at = n.to(tl.int64)[:, None] * B + b[None, :]
    idx = tl.load(indices_ptr + at, mask=ok, other=0)
    if SHIFT < 32:  # int32 keys, pads (place BP - 1 or more) last
        key = tl.where(ok, (idx.to(tl.int32) << SHIFT) | b[None, :], 0x7FFFFFFF)
    else:
        key = tl.where(ok, (idx.to(tl.int64) << 32) | b[None, :].to(tl.int64),
                       0x7FFFFFFFFFFFFFFF)  # fmt: skip
    key = tl.sort(key, dim=1)
    place = key & ((1 << SHIFT) - 1)
    w = tl.load(weights_ptr + n.to(tl.int64)[:, None] * B + place, mask=ok, other=0.0)
    tl.store(slots_ptr + at, (key >> SHIFT).to(tl.int32), mask=ok)
    tl.store(ordered_w_ptr + at, w, mask=ok)


@triton.jit
def _gate_grads_kernel(grad_ptr, gate_ptr, bag_ptr, d_bag_ptr, d_gate_ptr, numel,
                       BLOCK: tl.constexpr):  # fmt: skip
    """d_bag = g * silu(x), d_gate = g * bag * silu'(x) of m = silu(x) * bag, in fp32."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    g = tl.load(grad_ptr + i, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(gate_ptr + i, mask=mask, other=0.0).to(tl.float32)
    bag = tl.load(bag_ptr + i, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(x)
    tl.store(d_bag_ptr + i, (g * x * sig).to(d_bag_ptr.dtype.element_ty), mask=mask)
    d_gate = g * bag * sig * (1.0 + x * (1.0 - sig))
    tl.store(d_gate_ptr + i, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bag_grad_weights_kernel(
    values_ptr,
    indices_ptr,
    grad_out_ptr,
    grad_w_ptr,
    B,
    D,
    stride_v,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = b < B
    idx = tl.load(indices_ptr + n * B + b, mask=b_mask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_B,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        g = tl.load(grad_out_ptr + n * D + d, mask=d_mask, other=0.0).to(tl.float32)
        rows = tl.load(
            values_ptr + idx[:, None] * stride_v + d[None, :],
            mask=b_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(rows * g[None, :], axis=1)
    tl.store(grad_w_ptr + n * B + b, acc, mask=b_mask)


@triton.jit
def _bag_grad_rows_kernel(
    grad_out_ptr,
    weights_ptr,
    order_ptr,
    offsets_ptr,
    slots_ptr,
    out_ptr,
    B,
    D,
    stride_g,
    stride_out,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DENSE: tl.constexpr,
):
    """Row u of the output = sum over its sorted pairs p of weights[p] * grad_out[p // B].

    The pairs of a slot are taken one at a time (BLOCK_P = 1, the fastest on the H200) or
    BLOCK_P at a time as one gathered (BLOCK_P, BLOCK_D) tile; either way in a fixed order: the
    same bits on every run.
    """
    u = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = tl.load(offsets_ptr + u)
    end = tl.load(offsets_ptr + u + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    if BLOCK_P == 1:  # one pair at a time
        for p in range(start, end):
            pair = tl.load(order_ptr + p).to(tl.int64)
            w = tl.load(weights_ptr + pair).to(tl.float32)
            g = tl.load(grad_out_ptr + (pair // B) * stride_g + d, mask=d_mask, other=0.0)
            acc += w * g.to(tl.float32)
    else:
        for p0 in range(start, end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_mask = p < end
            pair = tl.load(order_ptr + p, mask=p_mask, other=0).to(tl.int64)
            w = tl.load(weights_ptr + pair, mask=p_mask, other=0.0).to(tl.float32)
            g = tl.load(
                grad_out_ptr + (pair // B)[:, None] * stride_g + d[None, :],
                mask=p_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)  # (BLOCK_P, BLOCK_D)
            acc += tl.sum(g * w[:, None], axis=0)
    if DENSE:
        row = tl.load(slots_ptr + u).to(tl.int64)
    else:
        row = u.to(tl.int64)
    tl.store(out_ptr + row * stride_out + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _sorted_pairs(p, mask, order_ptr, weights_ptr, tokens_ptr, B: tl.constexpr,
                  PRESORTED: tl.constexpr):  # fmt: skip
    """(pair index, weight, token) of the sorted pairs p: loaded in sorted order (PRESORTED),
    or gathered through the pair index, one load after another."""
    if PRESORTED:
        pair = tl.load(order_ptr + p, mask=mask, other=0)
        w = tl.load(weights_ptr + p, mask=mask, other=0.0)
        token = tl.load(tokens_ptr + p, mask=mask, other=0)
    else:
        pair = tl.load(order_ptr + p, mask=mask, other=0).to(tl.int32)  # N * B < 2**31
        w = tl.load(weights_ptr + pair, mask=mask, other=0.0)
        token = pair // B
    return pair, w.to(tl.float32), token.to(tl.int64)


@triton.jit
def _bag_grad_fused_kernel(
    values_ptr,
    grad_out_ptr,
    weights_ptr,
    order_ptr,
    tokens_ptr,
    offsets_ptr,
    slots_ptr,
    grad_w_ptr,
    out_ptr,
    D,
    n_pairs,
    stride_v,
    stride_g,
    stride_out,
    B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DENSE: tl.constexpr,
    STREAM: tl.constexpr,
    KEEP: tl.constexpr,
    PRESORTED: tl.constexpr,
):
    """Both gradients from one walk over the sorted pairs, one program per (unique slot u,
    block of the value dim):

        row u       = sum over u's pairs p of weights[p] * grad_out[p // B]
        grad_w[p]   = <values[u], grad_out[p // B]>   (this block's part of the dot)

    The slot's value row is read once, however many pairs read it (the two-kernel backward
    gathers it once per pair), and each pair's grad_out row is gathered once for both sums.
    Pairs are taken in their sorted order, BLOCK_P at a time: the same bits on every run.
    With PRESORTED, order, weights and tokens are the pairs' indices, weights and tokens already
    in sorted order (one load before the grad_out rows, not two).
    STREAM and KEEP are the L2 eviction policies of the value rows read and the gradient rows
    written ("evict_first") and of the grad_out rows gathered ("evict_last"), or "" for none:
    every pair gathers from grad_out, so it should stay in L2 while the rows stream through.
    """
    u = tl.program_id(0)
    dblk = tl.program_id(1)
    d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = tl.load(offsets_ptr + u)
    end = tl.load(offsets_ptr + u + 1)
    slot = tl.load(slots_ptr + u).to(tl.int64)
    v = tl.load(values_ptr + slot * stride_v + d, mask=d_mask, other=0.0, eviction_policy=STREAM)
    v = v.to(tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    grad_w = grad_w_ptr + dblk.to(tl.int64) * n_pairs  # (blocks of D, N * B) partial dots
    if BLOCK_P == 1:
        for p in range(start, end):
            pair, w, token = _sorted_pairs(p, p < end, order_ptr, weights_ptr, tokens_ptr, B,
                                           PRESORTED)  # fmt: skip
            g = tl.load(grad_out_ptr + token * stride_g + d, mask=d_mask, other=0.0,
                        eviction_policy=KEEP)  # fmt: skip
            g = g.to(tl.float32)
            acc += w * g
            tl.store(grad_w + pair, tl.sum(g * v, axis=0))
    else:
        for p0 in range(start, end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_mask = p < end
            pair, w, token = _sorted_pairs(p, p_mask, order_ptr, weights_ptr, tokens_ptr, B,
                                           PRESORTED)  # fmt: skip
            g = tl.load(
                grad_out_ptr + token[:, None] * stride_g + d[None, :],
                mask=p_mask[:, None] & d_mask[None, :],
                other=0.0,
                eviction_policy=KEEP,
            ).to(tl.float32)  # (BLOCK_P, BLOCK_D)
            acc += tl.sum(g * w[:, None], axis=0)
            tl.store(grad_w + pair, tl.sum(g * v[None, :], axis=1), mask=p_mask)
    row = slot if DENSE else u.to(tl.int64)
    tl.store(out_ptr + row * stride_out + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask,
             eviction_policy=STREAM)  # fmt: skip


@triton.jit
def _run_offsets_kernel(sorted_ptr, run_ptr, offsets_ptr, slots_ptr, n, BLOCK: tl.constexpr):
    """offsets[u] = the first sorted pair of run u, offsets[U] = n, slots[u] = run u's slot:
    each written by the run's own first pair (no two writes to one place)."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = q < n
    s = tl.load(sorted_ptr + q, mask=inside, other=-1)
    s_prev = tl.load(sorted_ptr + q - 1, mask=inside & (q > 0), other=-1)
    run = tl.load(run_ptr + q, mask=inside, other=0).to(tl.int64)
    first = inside & (s != s_prev)
    tl.store(offsets_ptr + run, q.to(tl.int32), mask=first)
    tl.store(slots_ptr + run, s.to(tl.int64), mask=first)
    tl.store(offsets_ptr + run + 1, n, mask=q == n - 1)


@triton.jit
def _bag_grad_walk_kernel(
    values_ptr, grad_out_ptr, weights_ptr, pairs_ptr, sorted_ptr, offsets_ptr, count_ptr,
    grad_w_ptr, out_ptr, n, D, stride_v, stride_g, stride_out,
    B: tl.constexpr, BLOCK_D: tl.constexpr, DENSE: tl.constexpr, STREAM: tl.constexpr,
    KEEP: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Both gradients from the sorted pairs, each program walking the pairs of its own stretch
    of consecutive runs of equal slots (a block of the value dim of them), one pair a step:

        row u       = sum over u's pairs p of weights[p] * grad_out[p // B]
        grad_w[p]   = <values[u], grad_out[p // B]>   (this block's part of the dot)

    The grid is a fixed number of programs; the number of runs U is read on the device and
    program t takes runs [t * ceil(U / G), ...), so no host sync comes before the kernel and no
    program waits on a run's offsets before its first load: the pairs' slots, indices and
    weights are read in sorted order (contiguous), and a slot's value row is loaded at its
    run's first pair; a run's row is written at its last pair. STAGES > 1 hands the loop to
    Triton's pipeliner (H200: no faster). Pairs are summed in sorted order: the same bits on
    every run.
    """
    t = tl.program_id(0)
    G = tl.num_programs(0)
    dblk = tl.program_id(1)
    d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    U = tl.load(count_ptr)
    per = (U + G - 1) // G
    u0 = tl.minimum(t * per, U)
    u1 = tl.minimum(u0 + per, U)
    p0 = tl.load(offsets_ptr + u0)
    p1 = tl.load(offsets_ptr + u1)
    grad_w = grad_w_ptr + dblk.to(tl.int64) * n
    acc = tl.zeros((BLOCK_D,), tl.float32)
    v = tl.zeros((BLOCK_D,), tl.float32)
    u = u0
    prev = tl.load(sorted_ptr + p0, mask=p0 < p1, other=0) * 0 - 1  # the dtype of slots
    for p in tl.range(p0, p1, num_stages=STAGES):
        s = tl.load(sorted_ptr + p)
        s_n = tl.load(sorted_ptr + p + 1, mask=p + 1 < p1, other=-1)
        pr = tl.load(pairs_ptr + p)
        w = tl.load(weights_ptr + p).to(tl.float32)
        g = tl.load(grad_out_ptr + (pr // B).to(tl.int64) * stride_g + d, mask=d_mask,
                    other=0.0, eviction_policy=KEEP).to(tl.float32)  # fmt: skip
        if s != prev:
            v = tl.load(values_ptr + s.to(tl.int64) * stride_v + d, mask=d_mask, other=0.0,
                        eviction_policy=STREAM).to(tl.float32)  # fmt: skip
        acc += w * g
        tl.store(grad_w + pr, tl.sum(g * v, axis=0))
        if s_n != s:
            if DENSE:
                row = s.to(tl.int64)
            else:
                row = u.to(tl.int64)
            tl.store(out_ptr + row * stride_out + d, acc.to(out_ptr.dtype.element_ty),
                     mask=d_mask, eviction_policy=STREAM)  # fmt: skip
            acc = tl.zeros((BLOCK_D,), tl.float32)
            u += 1
        prev = s


def _tiles(D: int, elem_budget: int) -> tuple[int, int]:
    """(BLOCK_D, rows per tile) so that one tile holds about ``elem_budget`` elements."""
    block_d = min(max(triton.next_power_of_2(D), 16), 1024)
    return block_d, max(16, elem_budget // block_d)


# Reading each bag's rows in slot order lets the bags running at once read nearby rows, so a
# row that several of them read is more often still in L2. H100, 16,384 bags of 128 rows of
# 1,024 bf16 from a table of 1M rows: 1.407 ms with the order kernel (0.024 of it) against 1.472
# as given, the memory layer's forward 2.047 against 2.092; from 16M rows, bags sorted
# beforehand read in 1.426 ms against 1.432: few rows repeat there. So the forward orders the
# bags where they read at least this many rows per row of the table,
ORDER_BAGS_FROM = 0.5
# and only from a table several times larger than an L2 (50 MB on an H100 or H200): a smaller
# one is read from L2 in any order, and the sort would be a kernel for nothing.
ORDER_TABLE_BYTES = 256 * 2**20


def orders_bags(n_lookups: int, n_rows: int, row_bytes: int) -> bool:
    """Whether the bag forward reads each bag's rows in slot order (``ORDER_BAGS_FROM``,
    ``ORDER_TABLE_BYTES``)."""
    return (
        0 < n_rows < 2**31
        and n_rows * row_bytes >= ORDER_TABLE_BYTES
        and n_lookups >= ORDER_BAGS_FROM * n_rows
    )


def order_bags(
    indices: torch.Tensor,
    weights: torch.Tensor,
    n_rows: int = 2**31,
    elements: int = 1024,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots int32, weights), each (N, B): every bag's pairs in ascending slot order, equal
    slots in their order in the bag. Slots must be below n_rows, at most 2**31: sorted as int32
    keys where n_rows * (B rounded up to a power of two) fits in 31 bits, else as int64. A
    program sorts ``elements`` keys' worth of bags (at least one) with ``num_warps`` warps
    (H100, 16,384 bags of 128 from 1M rows, 4 warps: 0.024 ms with int32 keys, 0.031 with
    int64; 512 keys a program 0.0235 ms, 256 0.0257, 2,048 0.0259; other warps not timed)."""
    N, B = indices.shape
    indices, weights = indices.contiguous(), weights.contiguous()  # the kernel's (N, B) layout
    slots = torch.empty(N, B, dtype=torch.int32, device=indices.device)
    ordered = torch.empty_like(weights)
    if N == 0 or B == 0:
        return slots, ordered
    bp = max(16, triton.next_power_of_2(B))
    shift = bp.bit_length() - 1
    rows = max(1, elements // bp)
    _order_bags_kernel[(triton.cdiv(N, rows),)](
        indices, weights, slots, ordered, N, B, ROWS=rows, BP=bp,
        SHIFT=shift if n_rows << shift < 2**31 else 32, num_warps=num_warps,
    )  # fmt: skip
    return slots, ordered


def embedding_bag_forward(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """out[n] = sum_b weights[n, b] * values[indices[n, b]] in fp32, stored in ``out_dtype``;
    (N, D)."""
    return _bag_forward(values, indices, weights, out_dtype)[0]


def embedding_bag_forward_gated(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    out_dtype: torch.dtype,
    keep_bag: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(silu(gate) * bag in ``out_dtype``, the bag in ``out_dtype`` with ``keep_bag`` else None):
    the bag summed and gated in fp32 by the same kernel, rounded once."""
    return _bag_forward(values, indices, weights, out_dtype, gate.contiguous(), keep_bag)


def _bag_forward(values, indices, weights, out_dtype, gate=None, keep_bag=False, block_b=None,
                 num_warps=2, order=None):  # fmt: skip
    """The bag forward's launch; ``block_b`` (rows loaded at a time, by default 8,192 elements'
    worth, at least 16) and ``num_warps`` choose its tiles. H200, 16,384 bags of 128 rows of
    1,024 bf16, gated: 16 rows and 2 warps 1.001 / 1.018 ms from a table of 1M / 16M rows
    against 1.016 / 1.033 with 4 warps (the same bits: the same rows summed in the same order);
    8 rows 1.003 / 1.020; 16 or 32 rows with 8 warps 1.54-1.63. With ``order`` (by default
    ``orders_bags``) each bag's rows are summed in slot order (``order_bags``)."""
    N, B = indices.shape
    D = values.shape[1]
    out = torch.empty(N, D, dtype=out_dtype, device=values.device)
    bag = torch.empty_like(out) if gate is not None and keep_bag else None
    if N == 0 or D == 0:
        return out, bag
    if B == 0:  # an empty bag sums to zero, gated or not
        return out.zero_(), None if bag is None else bag.zero_()
    if values.stride(1) != 1:
        values = values.contiguous()
    indices, weights = indices.contiguous(), weights.contiguous()
    if order is None:
        order = orders_bags(N * B, values.shape[0], D * values.element_size())
    if order and values.shape[0] <= 2**31:  # the ordered slots are int32
        indices, weights = order_bags(indices, weights, values.shape[0])
    block_d, rows = _tiles(D, 8192)
    block_b = min(block_b or rows, max(16, triton.next_power_of_2(B)))  # at least 16 wide
    grid = (N, triton.cdiv(D, block_d))
    _bag_forward_kernel[grid](
        values, indices, weights, out, out if gate is None else gate,
        out if bag is None else bag, B, D, values.stride(0),
        BLOCK_B=block_b, BLOCK_D=block_d, GATE=gate is not None, KEEP_BAG=bag is not None,
        num_warps=num_warps,
    )  # fmt: skip
    return out, bag


def gate_grads(
    grad: torch.Tensor, gate: torch.Tensor, bag: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_bag in grad's dtype, d_gate in gate's dtype) of m = silu(gate) * bag, one pass."""
    grad, gate = grad.contiguous(), gate.contiguous()
    d_bag = torch.empty_like(grad)
    d_gate = torch.empty_like(gate)
    if grad.numel():
        block = 1024
        _gate_grads_kernel[(triton.cdiv(grad.numel(), block),)](
            grad, gate, bag, d_bag, d_gate, grad.numel(), BLOCK=block, num_warps=4
        )
    return d_bag, d_gate


def embedding_bag_grad_weights(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """grad_w[n, b] = <values[indices[n, b]], grad_out[n]>, (N, B) fp32."""
    N, B = indices.shape
    D = values.shape[1]
    grad_w = torch.empty(N, B, dtype=torch.float32, device=values.device)
    if grad_w.numel() == 0:
        return grad_w
    if D == 0:
        return grad_w.zero_()
    if values.stride(1) != 1:
        values = values.contiguous()
    block_d = min(max(triton.next_power_of_2(D), 16), 256)
    block_b = 16
    grid = (N, triton.cdiv(B, block_b))
    _bag_grad_weights_kernel[grid](
        values, indices.contiguous(), grad_out.contiguous(), grad_w, B, D, values.stride(0),
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return grad_w


def _sort_pairs(indices: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the pairs' slots sorted, the pair order: grouped by slot, then by bag position)."""
    flat = indices.reshape(-1)
    if n_slots < 2**31:
        flat = flat.to(torch.int32)  # half the bytes to sort
    return torch.sort(flat, stable=True)


def _grad_rows_buffer(S: int, D: int, rows: int, dtype, dense: bool, device) -> torch.Tensor:
    """Where a backward writes the value gradient: the whole (S, D) table's, zeroed, with
    ``dense``; else ``rows`` gradient rows."""
    if dense:
        return torch.zeros(S, D, dtype=dtype, device=device)
    return torch.empty(rows, D, dtype=dtype, device=device)


def _check_int32_pairs(n: int) -> None:
    """The fused and walking backwards index the (token, bag position) pairs in int32."""
    if n >= 2**31:
        raise ValueError(f"at most 2**31 - 1 (token, bag position) pairs, got {n}")


def _sorted_segments(
    indices: torch.Tensor, n_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique slots sorted, pair order grouped by slot then bag position, segment offsets)."""
    sorted_slots, order = _sort_pairs(indices, n_slots)
    slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    offsets = torch.zeros(slots.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return slots.to(torch.int64), order, offsets


def embedding_bag_grad_rows(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    dense: bool = False,
    block_p: int = 1,
    block_d: int = 1024,
    num_warps: int = 4,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value-table gradient: (slots (U,) sorted unique int64, rows (U, D)) or, with ``dense``,
    (slots, the whole (S, D) gradient with zeros on unread rows). Rows are in ``dtype``.

    Each pair gathers one grad_out row, so that gather is what this kernel moves most; with
    ``grad_dtype`` (e.g. bf16) grad_out is rounded to it once first, half the bytes of fp32.
    """
    S, D = values.shape
    N, B = indices.shape
    device = values.device
    if indices.numel() == 0:
        slots = torch.zeros(0, dtype=torch.int64, device=device)
        shape = (S, D) if dense else (0, D)
        return slots, torch.zeros(shape, dtype=dtype, device=device)
    slots, order, offsets = _sorted_segments(indices, S)
    U = slots.numel()
    out = _grad_rows_buffer(S, D, U, dtype, dense, device)
    if D == 0:
        return slots, out
    if grad_dtype is not None:
        grad_out = grad_out.to(grad_dtype)
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    block_d = min(max(triton.next_power_of_2(D), 16), block_d)
    grid = (U, triton.cdiv(D, block_d))
    _bag_grad_rows_kernel[grid](
        grad_out, weights.contiguous(), order, offsets, slots, out, B, D,
        grad_out.stride(0), out.stride(0),
        BLOCK_P=block_p, BLOCK_D=block_d, DENSE=dense, num_warps=num_warps,
    )  # fmt: skip
    return slots, out


def embedding_bag_backward_fused(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    dense: bool = False,
    block_p: int = 1,
    block_d: int = 512,
    num_warps: int = 1,
    keep_grad: bool = True,
    presorted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_w (N, B) fp32, slots, rows): both gradients by one kernel over the sorted pairs,
    rows as ``embedding_bag_grad_rows`` returns them (in ``dtype``; dense or sparse).

    grad_out is read in its own dtype for both sums: the weight gradients are as exact as the
    two-kernel backward's when grad_out is what the forward's output was rounded to
    (``embedding_bag(..., out_dtype=...)``), and the autograd takes this path only then.
    """
    S, D = values.shape
    N, B = indices.shape
    device = values.device
    grad_w = torch.empty(N, B, dtype=torch.float32, device=device)
    if indices.numel() == 0 or D == 0:
        slots, rows = embedding_bag_grad_rows(grad_out, values, indices, weights, dtype, dense)
        return grad_w.zero_(), slots, rows
    _check_int32_pairs(N * B)
    slots, order, offsets = _sorted_segments(indices, S)
    U = slots.numel()
    out = _grad_rows_buffer(S, D, U, dtype, dense, device)
    if values.stride(1) != 1:
        values = values.contiguous()
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    block_d = min(max(triton.next_power_of_2(D), 16), block_d)
    d_blocks = triton.cdiv(D, block_d)
    # each block of the value dim writes its part of every dot; a single block, grad_w itself
    parts = grad_w if d_blocks == 1 else torch.empty(d_blocks, N, B, device=device)
    pair_weights, tokens = weights.contiguous(), order
    if presorted:  # the pairs' indices, weights and tokens in sorted order: 2.1M-long passes
        order = order.to(torch.int32)
        pair_weights, tokens = pair_weights.reshape(-1)[order], order // B
    _bag_grad_fused_kernel[(U, d_blocks)](
        values, grad_out, pair_weights, order, tokens, offsets, slots, parts, out, D, N * B,
        values.stride(0), grad_out.stride(0), out.stride(0),
        B=B, BLOCK_P=block_p, BLOCK_D=block_d, DENSE=dense,
        STREAM="evict_first" if keep_grad else "", KEEP="evict_last" if keep_grad else "",
        PRESORTED=presorted, num_warps=num_warps,
    )  # fmt: skip
    if d_blocks > 1:
        grad_w = parts.sum(0)
    return grad_w, slots, out


def _sorted_runs(indices: torch.Tensor, n_slots: int):
    """(slots of the pairs sorted, stable, pair order, run number of each sorted pair (int32,
    0-based), number of runs as a 0-d device tensor): no host sync."""
    sorted_slots, order = _sort_pairs(indices, n_slots)
    start = torch.empty(sorted_slots.numel(), dtype=torch.int32, device=indices.device)
    start[:1] = 0
    torch.ne(sorted_slots[1:], sorted_slots[:-1], out=start[1:])
    run = torch.cumsum(start, 0, dtype=torch.int32)  # 0-based run numbers
    return sorted_slots, order, run, run[-1] + 1


def _count_on_host(count: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a device scalar to the host without waiting: (host tensor, event)."""
    if count.device.type != "cuda":
        return count.cpu(), None
    host = torch.empty((), dtype=count.dtype, pin_memory=True)
    host.copy_(count, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


_RESIDENT: dict[tuple, int] = {}


def _walk_programs(args: tuple, meta: dict, device: torch.device, per_sm: int | None,
                   waves: int, d_blocks: int) -> int:  # fmt: skip
    """Programs in the walk's grid along the pairs: ``per_sm`` for each multiprocessor, or with
    None ``waves`` times as many as stay resident together for each block of the value dim
    (from the compiled kernel's registers); 4 under the interpreter, so that runs still fall to
    several programs. A grid one program past a whole wave is the worst: that program starts
    its stretch only when another has walked a whole one (H200: 2.6 ms against 1.9)."""
    if device.type != "cuda":
        return 4
    if per_sm is None:
        key = tuple(sorted(meta.items())) + tuple(
            a.dtype for a in args if isinstance(a, torch.Tensor)
        )
        if key not in _RESIDENT:
            kernel = _bag_grad_walk_kernel.warmup(*args, grid=(1,), **meta)
            kernel._init_handles()
            warps = meta["num_warps"]
            per_warp = -(-kernel.n_regs * 32 // 256) * 256  # registers go to warps in 256s
            # from each of the 4 sub-partitions' 16K registers (H200: 12 one-warp programs of
            # 150 registers a multiprocessor stay resident, not 65536 // 4864 = 13)
            resident_warps = min(64, 4 * (16384 // per_warp))
            _RESIDENT[key] = max(1, min(32, resident_warps // warps))
        per_sm = max(1, waves * _RESIDENT[key] // d_blocks)
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def embedding_bag_backward_walk(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    dense: bool = False,
    block_d: int = 512,
    num_warps: int = 1,
    per_sm: int | None = None,
    waves: int = 2,
    stages: int = 1,
    hints: bool = True,
    programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_w (N, B) fp32, slots, rows): what ``embedding_bag_backward_fused`` returns, from a
    fixed grid of programs (``per_sm`` a multiprocessor, by default ``waves`` times as many as
    stay resident, or ``programs`` in all) that each walk the
    sorted pairs of a stretch of runs of equal slots, with no host sync before the kernel: the
    runs' offsets, slots and number U are found on the device, and U is copied to the host while
    the kernel is queued; sparse rows are written into a buffer of min(N * B, S) rows and
    returned as its first U."""
    S, D = values.shape
    N, B = indices.shape
    n = N * B
    device = values.device
    if n == 0 or D == 0:
        slots, rows = embedding_bag_grad_rows(grad_out, values, indices, weights, dtype, dense)
        return torch.zeros(N, B, dtype=torch.float32, device=device), slots, rows
    _check_int32_pairs(n)
    sorted_slots, order, run, count = _sorted_runs(indices, S)
    host_count, event = _count_on_host(count)
    bound = min(n, S)
    offsets = torch.empty(bound + 1, dtype=torch.int32, device=device)
    slots = torch.empty(bound, dtype=torch.int64, device=device)
    _run_offsets_kernel[(triton.cdiv(n, 1024),)](sorted_slots, run, offsets, slots, n, BLOCK=1024)
    out = _grad_rows_buffer(S, D, bound, dtype, dense, device)
    if values.stride(1) != 1:
        values = values.contiguous()
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    pairs = order.to(torch.int32)
    sorted_weights = weights.reshape(-1)[pairs]
    block_d = min(max(triton.next_power_of_2(D), 16), block_d)
    d_blocks = triton.cdiv(D, block_d)
    parts = torch.empty(d_blocks, N, B, dtype=torch.float32, device=device)
    args = (values, grad_out, sorted_weights, pairs, sorted_slots, offsets, count, parts, out,
            n, D, values.stride(0), grad_out.stride(0), out.stride(0))  # fmt: skip
    meta = dict(
        B=B, BLOCK_D=block_d, DENSE=dense,
        STREAM="evict_first" if hints else "", KEEP="evict_last" if hints else "",
        STAGES=stages, num_warps=num_warps, num_stages=stages,
    )  # fmt: skip
    if programs is None:
        programs = _walk_programs(args, meta, device, per_sm, waves, d_blocks)
    grid = (min(bound, programs), d_blocks)
    _bag_grad_walk_kernel[grid](*args, **meta)
    grad_w = parts[0] if d_blocks == 1 else parts.sum(0)
    if event is not None:
        event.synchronize()
    U = int(host_count)
    return grad_w, slots[:U], out if dense else out[:U]


def embedding_bag_backward(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_weights (N, B) fp32, slots (U,), grad_rows (U, D) fp32): the reference's contract."""
    grad_w = embedding_bag_grad_weights(grad_out, values, indices)
    slots, rows = embedding_bag_grad_rows(grad_out, values, indices, weights)
    return grad_w, slots, rows


def _grad_rows_in_table_dtype(grad_out, values, indices, weights, dtype, dense=False):
    """The autograd's value gradient: grad_out read in the rows' dtype when that is 16-bit."""
    low = dtype if dtype in (torch.float16, torch.bfloat16) else None
    return embedding_bag_grad_rows(grad_out, values, indices, weights, dtype, dense, grad_dtype=low)


# the tiles of the walk over sorted pairs the autograd takes for a 16-bit grad_out
# (``embedding_bag_backward_walk``); None: the fused backward of one program per unique slot
WALK_TILES = dict(block_d=512, num_warps=1, waves=2, stages=1)
WALK_BACKWARD: dict | None = WALK_TILES


def _grad_both(grad_out, values, indices, weights, dtype, dense=False):
    """The autograd's two gradients: by one fused pass over the sorted pairs when grad_out is
    16-bit (the bag's output was rounded to it, so reading it in that dtype loses nothing): the
    walk over sorted pairs (``WALK_BACKWARD``) or one program per unique slot; else by the weight and
    row kernels, which read an fp32 grad_out whole for the weight gradients."""
    if grad_out.dtype in (torch.float16, torch.bfloat16):
        if WALK_BACKWARD is not None:
            return embedding_bag_backward_walk(
                grad_out, values, indices, weights, dtype, dense, **WALK_BACKWARD
            )
        return embedding_bag_backward_fused(grad_out, values, indices, weights, dtype, dense)
    grad_w = embedding_bag_grad_weights(grad_out, values, indices)
    slots, rows = _grad_rows_in_table_dtype(grad_out, values, indices, weights, dtype, dense)
    return grad_w, slots, rows


TRITON_BAG = reference.BagKernels(
    embedding_bag_forward, embedding_bag_grad_weights, _grad_rows_in_table_dtype, _grad_both
)


class GatedEmbeddingBag(torch.autograd.Function):
    """silu(gate) * the bag, by one forward kernel; its backward is one pass for the gate's and
    the bag's gradients (the latter in the output's dtype, so a 16-bit output takes the fused
    bag backward), then the bag's backward."""

    @staticmethod
    def forward(ctx, values, indices, weights, gate, sparse_grad: bool, out_dtype):  # noqa: D102
        out, bag = embedding_bag_forward_gated(
            values, indices, weights, gate, out_dtype, keep_bag=any(ctx.needs_input_grad)
        )
        ctx.save_for_backward(values, indices, weights, gate, bag)
        ctx.sparse_grad = sparse_grad
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        values, indices, weights, gate, bag = ctx.saved_tensors
        d_bag, d_gate = gate_grads(grad_out, gate, bag)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        grad_values, grad_w = reference.bag_grads(
            TRITON_BAG, d_bag, values, indices, weights, need, ctx.sparse_grad
        )
        return grad_values, None, grad_w, d_gate, None, None


def embedding_bag(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
    out_dtype: torch.dtype = torch.float32,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable weighted embedding bag, (N, D) in ``out_dtype``, gated by silu(gate) when
    given; see ``reference.embedding_bag``."""
    if gate is not None:
        return GatedEmbeddingBag.apply(values, indices, weights, gate, sparse_grad, out_dtype)
    return reference.EmbeddingBag.apply(
        values, indices, weights, sparse_grad, TRITON_BAG, out_dtype
    )
