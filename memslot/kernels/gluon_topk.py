"""The half top-k's two passes as a warp-specialised Gluon kernel, for Hopper GPUs.

The Triton half kernel (``triton_topk._half_topk_kernel``) holds two programs a multiprocessor
(229 registers and 104 KiB of shared memory each), and with so few warps its key loads and its
matrix products do not overlap: it is latency-bound, not bound by the tensor cores or by L2.
This kernel splits the same work across warps. One loader warp streams the sub-keys by TMA into
a ring of STAGES shared-memory stages; two consumer warpgroups, each with 64 query rows of the
program's 128, score every stage by asynchronous warpgroup products (the query slices held as
their register operands) and hand the stage back through an mbarrier.
Each key chunk loaded serves 128 rows (twice the Triton kernel's), and the loads run ahead of
the products.

The passes are those of the Triton kernel: pass one keeps the max of each group of sub-keys
c = g (mod BLOCK_C) and bisects on those maxima for a lower bound on each row's K-th best score;
pass two stores the scores at or above it (fp32 bits << 32 | sub-key, the ``_raw`` candidates)
at each row's next places in scratch (2, H, N, WIDE) and each row's count in late (2, H, N).
The combine kernel ranks them (up to WIDE a row), so their order in a row does not matter: by
default (COMPACT 1) each thread counts its kept scores of its two rows, a scan over the four
lanes that share the rows gives each thread its first place, and the thread stores its own in
order, all in one block of inline PTX (``_quad_compact_asm``); COMPACT 0 places them as the
Triton kernel does, by a product of the kept mask with the strict upper triangle. A block of 64
rows with a row of fewer than K or more than WIDE candidates (ties at the bound) is ranked by
``triton_topk._recheck_kernel``, launched after this one, by the exact top-k network over every
chunk.

With SAMPLE > 1 pass one reads only the first 1 / SAMPLE of the chunks: the bound is still one
that K scores reach, only looser. Pass two then reads the chunks pass one skipped first, adding
them to the group maxima, so that at their end it bisects for a bound from every chunk's
maxima (as a pass one without sampling would); it keeps the skipped chunks' candidates by the
sampled bound and the sampled chunks' by the whole one, stages them (several times as many as
without sampling: the caller gives scratch the places) and stores each row's whole bound, by
which ``triton_topk.filter_candidates`` keeps the ones that reach it for the combine kernel.
The skipped chunks are kept by a bound that fewer maxima reach (``stage_k``, by default 5/8 of
K at top-32 over a quarter), so fewer are staged; the filter's bound is the higher of that and
the whole one, and a row left with fewer than K goes to the recheck. Done in this kernel's
tail, that filter left the multiprocessor idle (its one program there waited on its own
loads); as a kernel of its own it costs little.

Only for bf16 queries in the layout ``query_topk`` writes (2, H, N, half), half a multiple of
64 up to 256, n_keys a multiple of BLOCK_C and topk at most BLOCK_C; ``eligible`` says when.
It gives the same bits as the Triton path (its products are the same warpgroup products). Gluon
has no CPU interpreter: the tests of this path run on the GPU. (Taking the query as projected
and rms-normalising each consumer's slices in its registers, with no pass first, gave the
pass's bits but no time: on an H100 the layer forward took as long; docs/BENCHMARKS.md.)

On an H200 at 16,384 tokens x 4 heads, half 256, top-32 (``bench/topk_ws.py``): both passes
0.24 ms against 0.45 for the Triton half kernel at 1,024 sub-keys (pass one 0.12 against
0.18); the whole top-k 0.40 ms against 0.58, and 0.89-0.93 against 1.68 at 4,096 sub-keys,
where pass one reads a quarter of them (``sample`` 4, the default there:
``triton_topk._default_ws_tiles``). Pass two is held by its compaction (about
420 instructions a chunk a warp against 130 in pass one), not by the tensor cores: Nsight
Compute puts the tensor pipe at 57% of the kernel, the consumers' bisection at 12% of their
time (hence 6 halvings, not 12) and their waits on the products in pass two at 17%.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from memslot.kernels.ptx import STORE_CANDIDATE, STORE_CANDIDATE_CONSTRAINTS

# TMA loads: ``async_load`` in newer Tritons, ``async_copy_global_to_shared`` before
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

BLOCK_C_ = 64  # sub-keys a chunk, unless the caller picks another
ROWS_ = 64  # query rows of each consumer warpgroup (a warpgroup product is 64 rows tall)
SPLIT_ = 64  # the head dimension is loaded and multiplied in 64-wide slices (128-byte rows)
ROWS = gl.constexpr(ROWS_)
SPLIT = gl.constexpr(SPLIT_)


@gluon.jit
def _issue(q_smem, qa, k_smem, stage, C: gl.constexpr, KSPLIT: gl.constexpr,
           Q_REG: gl.constexpr, zero):  # fmt: skip
    """Start the products of consumer C's query rows with key stage ``stage``: KSPLIT
    asynchronous warpgroup products (one a 64-wide slice of the head dimension), whose result
    (ROWS, BLOCK_C) fp32 is ready after a ``warpgroup_mma_wait``. With Q_REG the query slices
    are the register operands qa (loaded once), else they are read from shared memory."""
    for j in gl.static_range(KSPLIT):
        if Q_REG:
            a = qa[j]
        else:
            a = q_smem.index(C * KSPLIT + j)
        b = k_smem.index(stage * KSPLIT + j).permute((1, 0))
        if j == 0:
            acc = warpgroup_mma(a, b, zero, use_acc=False, is_async=True)
        else:
            acc = warpgroup_mma(a, b, acc, is_async=True)
    return acc


@gluon.jit
def _keep_chunk(s, keep, before, count, c0, row_ptr, row_ok, cols, WIDE: gl.constexpr):
    """Store chunk c0's kept scores at their rows' next places; the rows' new counts."""
    place = gl.expand_dims(count, 1) + before.to(gl.int32)
    _store_candidate(row_ptr, place, s, cols + c0, keep & row_ok & (place < WIDE))
    return count + gl.sum(keep.to(gl.int32), axis=1)


@triton.constexpr_function
def _quad_compact_asm(block_c: int, wide: int) -> str:
    """PTX that stores one chunk's kept scores of a thread's two rows and gives their new counts.

    A thread of a warpgroup product's (64, block_c) fp32 result holds block_c / 2 elements:
    element j at row r + 8 * ((j >> 1) & 1) and column 2 * (lane % 4) + (j & 1) + 8 * (j >> 2),
    the four lanes of a quad sharing rows. Operands: $0.. the outputs (each element its row's
    new count), then E = block_c / 2 each of the scores (f32), the bound, the count so far, the
    row's scratch pointer and the chunk's first column c0. Each thread counts its kept scores a
    row, a scan over the quad gives its first place (a row's places go to its four lanes in lane
    order, each lane's in element order: the combine ranks them, so the order does not matter),
    and a row whose count would pass WIDE stores nothing more (its block is rechecked)."""
    e = block_c // 2
    s, b, c, ptr, c0 = (e * (k + 1) for k in range(5))
    out = [
        "{",
        ".reg .pred p, q0, q1;",
        ".reg .b32 n0, n1, i0, i1, c0, c1, t, col, k0, k1;",
        f".reg .b32 m<{e}>;",
        ".reg .b64 a;",
        "mov.b32 n0, 0;",
        "mov.b32 n1, 0;",
    ]
    # m_j = -1 where element j is kept, else 0; n_r = minus the row's kept in this thread
    for j in range(e):
        r = (j >> 1) & 1
        out += [f"set.ge.u32.f32 m{j}, ${s + j}, ${b + 2 * r};", f"add.s32 n{r}, n{r}, m{j};"]
    for r in (0, 1):
        out += [
            f"neg.s32 n{r}, n{r};",
            f"mov.b32 i{r}, n{r};",  # inclusive scan over the quad's lanes
            f"shfl.sync.up.b32 t|p, i{r}, 1, 0x1c00, 0xffffffff;",
            f"@p add.s32 i{r}, i{r}, t;",
            f"shfl.sync.up.b32 t|p, i{r}, 2, 0x1c00, 0xffffffff;",
            f"@p add.s32 i{r}, i{r}, t;",
            f"shfl.sync.idx.b32 t, i{r}, 3, 0x1c1f, 0xffffffff;",  # the row's kept this chunk
            f"add.s32 c{r}, ${c + 2 * r}, t;",  # its new count
            f"setp.le.s32 q{r}, c{r}, {wide};",  # all of them fit in the row's places
            f"sub.s32 k{r}, i{r}, n{r};",
            f"add.s32 k{r}, k{r}, ${c + 2 * r};",  # this thread's next place in the row
        ]
    out += [
        "mov.u32 t, %laneid;",
        "and.b32 t, t, 3;",
        "shl.b32 t, t, 1;",
        f"add.s32 col, t, ${c0};",
    ]
    for j in range(e):
        r = (j >> 1) & 1
        out.append(f"setp.ne.and.s32 p, m{j}, 0, q{r};")
        out += [
            f"mad.wide.s32 a, k{r}, 8, ${ptr + 2 * r};",
            f"add.s32 t, col, {(j & 1) + 8 * (j >> 2)};",
            f"@p st.global.v2.b32 [a], {{t, ${s + j}}};",
        ]
        out.append(f"sub.s32 k{r}, k{r}, m{j};")
    out += [f"mov.b32 ${j}, c{(j >> 1) & 1};" for j in range(e)]
    out.append("}")
    return " ".join(out)


@triton.constexpr_function
def _quad_compact_constraints(block_c: int) -> str:
    e = block_c // 2
    return ",".join(["=r"] * e + ["f"] * e + ["f"] * e + ["r"] * e + ["l"] * e + ["r"] * e)


@gluon.jit
def _first(a, b):
    """A reduction's combine that keeps its first operand: for tensors whose rows hold one value."""
    return a


@gluon.jit
def _quad_compact(s, bound, count, row_ptr, c0, BLOCK_C: gl.constexpr, WIDE: gl.constexpr):
    """Chunk c0's kept scores (s >= bound) stored at their rows' next places (from count); the
    rows' new counts. See ``_quad_compact_asm``."""
    asm: gl.constexpr = _quad_compact_asm(BLOCK_C, WIDE)
    new = gl.inline_asm_elementwise(
        asm, _quad_compact_constraints(BLOCK_C),
        [s, bound, gl.expand_dims(count, 1), row_ptr.to(gl.int64, bitcast=True), c0],
        dtype=gl.int32, is_pure=False, pack=BLOCK_C // 2,
    )  # fmt: skip
    return gl.reduce(new, 1, _first)  # each element holds its row's count


@gluon.jit
def _store_candidate(row_ptr, place, score, col, mask):
    """Store the candidate (score bits << 32 | col) at ``row_ptr[place]`` where mask, each
    thread the elements it holds (``ptx.STORE_CANDIDATE``, as ``triton_topk._store_candidate``)."""
    return gl.inline_asm_elementwise(
        STORE_CANDIDATE,
        STORE_CANDIDATE_CONSTRAINTS,
        [row_ptr.to(gl.int64, bitcast=True), mask.to(gl.int32), place,
         score.to(gl.int32, bitcast=True), col],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )  # fmt: skip


@gluon.jit
def _raise_bound(group_max, lo, K: gl.constexpr, STEPS: gl.constexpr):
    """A value that K of each row's group maxima reach, by STEPS halvings of [lo, largest
    maximum]; K of them must reach lo (the smallest maximum, or a bound from fewer chunks:
    the maxima only grow)."""
    hi = gl.max(group_max, axis=1)
    for _ in gl.static_range(STEPS):
        mid = lo + (hi - lo) * 0.5
        reach = gl.sum((group_max >= gl.expand_dims(mid, 1)).to(gl.int32), axis=1) >= K
        lo = gl.where(reach, mid, lo)
        hi = gl.where(reach, hi, mid)
    return lo


@gluon.jit
def _moved(s):
    """s in registers of its own (a move the compiler cannot see through): the next products
    can then take the registers of the result they replace, so that no move reads a result
    still being written (which makes ptxas serialize every warpgroup product of the kernel)."""
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [s], dtype=gl.float32,
                                     is_pure=True, pack=1)  # fmt: skip


@gluon.jit
def _two(s, i, j, n_chunks, n_rest, count, group_max, lo, bound, row_ptr, row_ok, cols, tri_smem,
         zero, op_layout: gl.constexpr, K: gl.constexpr, WIDE: gl.constexpr,
         BLOCK_C: gl.constexpr, BISECT: gl.constexpr, COMPACT: gl.constexpr,
         SAMPLE: gl.constexpr, STAGE_K: gl.constexpr):  # fmt: skip
    """Pass two's work on chunk j's scores s (the i-th chunk it reads): store the kept ones;
    with SAMPLE > 1 add the chunks pass one skipped to the group maxima and raise the bound at
    their end: to one that K of every chunk's group maxima reach (from lo, one that K of the
    sampled chunks' reach), or to the staged bound (bound: one that STAGE_K of the sampled
    chunks' reach) where that is higher. (count, group_max, lo, bound) after it."""
    c0 = (j - (j >= n_chunks).to(gl.int32) * n_chunks) * BLOCK_C
    if COMPACT == 0:
        keep = s >= bound
        before = warpgroup_mma(gl.convert_layout(keep.to(gl.bfloat16), op_layout),
                               tri_smem, zero, use_acc=False, is_async=True)  # fmt: skip
        before = warpgroup_mma_wait(num_outstanding=0, deps=(before,))
        count = _keep_chunk(s, keep, before, count, c0, row_ptr, row_ok, cols, WIDE)
    else:
        count = _quad_compact(s, bound, count, row_ptr, c0, BLOCK_C, WIDE)
    if SAMPLE > 1:
        if i < n_rest:
            group_max = gl.maximum(group_max, s)
            if i + 1 == n_rest:
                lo = _raise_bound(group_max, lo, K, BISECT)
                if STAGE_K < K:  # the staged bound (bound's one column) where that is higher
                    lo = gl.maximum(lo, gl.max(bound, axis=1))
                bound = gl.expand_dims(lo, 1)
    return count, group_max, lo, bound


@gluon.jit
def _consumer(q_smem, k_smem, tri_smem, q_bar, ready, empty, scratch_ptr, late_ptr, bound_ptr,
              N, H, n_keys, C: gl.constexpr, K: gl.constexpr, WIDE: gl.constexpr,
              BLOCK_C: gl.constexpr, KSPLIT: gl.constexpr, STAGES: gl.constexpr,
              BISECT: gl.constexpr, STOP: gl.constexpr, Q_REG: gl.constexpr,
              NUM_C: gl.constexpr, COMPACT: gl.constexpr, SAMPLE: gl.constexpr,
              OVERLAP: gl.constexpr, STAGE_K: gl.constexpr):  # fmt: skip
    """Both passes for ROWS query rows: consumer C of the program's NUM_C. In pass one each
    chunk's products are waited for before its result is used. With OVERLAP pass two starts
    each chunk's products before it compacts the chunk before (its first chunk's during the
    bisection), the finished result moved to registers of its own (``_moved``): an earlier
    try that carried the result in flight through the loop had ptxas serialize every product
    of the kernel (pass one 0.266 ms against 0.131 at 1,024 sub-keys)."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_C, 16]
    )
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout,
                                                  k_width=2)  # fmt: skip
    row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)
    h = gl.program_id(1)
    which = gl.program_id(2)
    rows = gl.program_id(0) * (NUM_C * ROWS) + C * ROWS + gl.arange(0, ROWS, layout=row_layout)
    row_mask = rows < N
    line = (which * H + h) * N + rows  # (which, h, row) in late and scratch
    zero = gl.zeros([ROWS, BLOCK_C], gl.float32, acc_layout)
    n_chunks = n_keys // BLOCK_C
    n_bound = n_chunks // SAMPLE  # the chunks pass one reads

    mbarrier.wait(q_bar, 0)
    qa = ()
    if Q_REG:
        for part in gl.static_range(KSPLIT):
            qa = qa + (q_smem.index(C * KSPLIT + part).load(op_layout),)
    group_max = gl.full([ROWS, BLOCK_C], float("-inf"), gl.float32, acc_layout)
    for i in range(n_bound):
        stage = i % STAGES
        mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
        s = _issue(q_smem, qa, k_smem, stage, C, KSPLIT, Q_REG, zero)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        mbarrier.arrive(empty.index(stage), count=1)
        group_max = gl.maximum(group_max, s)

    # pass two's first products need no bound: with OVERLAP they run during the bisection
    if STOP != 1:
        if OVERLAP:
            stage = n_bound % STAGES
            mbarrier.wait(ready.index(stage), (n_bound // STAGES) & 1)
            acc = _issue(q_smem, qa, k_smem, stage, C, KSPLIT, Q_REG, zero)
    # a value that K group maxima reach, by BISECT halvings of [smallest, largest] maximum;
    # with STAGE_K < K pass two keeps the skipped chunks' scores by one that STAGE_K reach
    lo = _raise_bound(group_max, gl.min(group_max, axis=1), K, BISECT)
    if STAGE_K < K:
        bound = gl.expand_dims(_raise_bound(group_max, lo, STAGE_K, BISECT), 1)
    else:
        bound = gl.expand_dims(lo, 1)
    if STOP == 1:
        gl.store(late_ptr + line, lo.to(gl.int32, bitcast=True), mask=row_mask)
        return

    # pass two's places, WIDE a row (with SAMPLE > 1 a stage that a later kernel filters)
    row_ptr = gl.expand_dims(scratch_ptr + line.to(gl.int64) * WIDE, 1)
    row_ok = gl.expand_dims(row_mask, 1)
    cols = gl.expand_dims(gl.arange(0, BLOCK_C, layout=col_layout), 0)
    # rows past N start over WIDE: they store nothing (and their counts are not stored)
    count = gl.where(row_mask, 0, 1 << 30).to(gl.int32)
    # with SAMPLE > 1 pass two takes the n_rest chunks pass one skipped first, adding them to
    # the group maxima, lifts the bound at their end (one from every chunk, for the filter),
    # then keeps the sampled chunks' candidates by it
    n_rest = n_chunks - n_bound
    if OVERLAP and STOP != 1:  # each chunk's products start before the one before is compacted
        for i in range(n_chunks - 1):
            j = n_bound + i
            s = _moved(warpgroup_mma_wait(num_outstanding=0, deps=(acc,)))
            mbarrier.arrive(empty.index(j % STAGES), count=1)
            stage = (j + 1) % STAGES
            mbarrier.wait(ready.index(stage), ((j + 1) // STAGES) & 1)
            acc = _issue(q_smem, qa, k_smem, stage, C, KSPLIT, Q_REG, zero)
            count, group_max, lo, bound = _two(s, i, j, n_chunks, n_rest, count, group_max, lo,
                                               bound, row_ptr, row_ok, cols, tri_smem, zero,
                                               op_layout, K, WIDE, BLOCK_C, BISECT, COMPACT,
                                               SAMPLE, STAGE_K)  # fmt: skip
        j = n_bound + n_chunks - 1
        s = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(j % STAGES), count=1)
        count, group_max, lo, bound = _two(s, n_chunks - 1, j, n_chunks, n_rest, count,
                                           group_max, lo, bound, row_ptr, row_ok, cols,
                                           tri_smem, zero, op_layout, K, WIDE, BLOCK_C, BISECT,
                                           COMPACT, SAMPLE, STAGE_K)  # fmt: skip
    else:
        for i in range(n_chunks):
            j = n_bound + i
            stage = j % STAGES
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            s = _issue(q_smem, qa, k_smem, stage, C, KSPLIT, Q_REG, zero)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            mbarrier.arrive(empty.index(stage), count=1)
            count, group_max, lo, bound = _two(s, i, j, n_chunks, n_rest, count, group_max, lo,
                                               bound, row_ptr, row_ok, cols, tri_smem, zero,
                                               op_layout, K, WIDE, BLOCK_C, BISECT, COMPACT,
                                               SAMPLE, STAGE_K)  # fmt: skip
    if SAMPLE > 1:  # for ``triton_topk._filter_kernel``: it keeps the staged ones reaching it
        gl.store(bound_ptr + line, lo, mask=row_mask)
    gl.store(late_ptr + line, count, mask=row_mask)


@gluon.jit
def _loader(q_desc, k1_desc, k2_desc, q_smem, k_smem, q_bar, ready, empty, N, H, n_keys,
            BLOCK_C: gl.constexpr, KSPLIT: gl.constexpr, STAGES: gl.constexpr,
            STOP: gl.constexpr, NUM_C: gl.constexpr, SAMPLE: gl.constexpr):  # fmt: skip
    """One warp, by TMA: the program's query rows once, then the first 1 / SAMPLE of the key
    chunks (pass one) and every chunk, those pass one skipped first (pass two)."""
    h = gl.program_id(1)
    which = gl.program_id(2)
    q_row = (which * H + h) * N + gl.program_id(0) * (NUM_C * ROWS)
    mbarrier.expect(q_bar, NUM_C * KSPLIT * q_desc.block_type.nbytes)
    for c in gl.static_range(NUM_C):
        for j in gl.static_range(KSPLIT):
            _tma_load(q_desc, [q_row + c * ROWS, j * SPLIT], q_bar,
                      q_smem.index(c * KSPLIT + j))  # fmt: skip
    n_chunks = n_keys // BLOCK_C
    n_bound = n_chunks // SAMPLE
    loads = n_bound if STOP == 1 else n_bound + n_chunks
    k_row = h * n_keys
    for i in range(loads):
        stage = i % STAGES
        mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(stage), KSPLIT * k1_desc.block_type.nbytes)
        c0 = k_row + (i - (i >= n_chunks).to(gl.int32) * n_chunks) * BLOCK_C  # skipped first
        for j in gl.static_range(KSPLIT):
            if which == 0:
                _tma_load(k1_desc, [c0, j * SPLIT], ready.index(stage),
                          k_smem.index(stage * KSPLIT + j))  # fmt: skip
            else:
                _tma_load(k2_desc, [c0, j * SPLIT], ready.index(stage),
                          k_smem.index(stage * KSPLIT + j))  # fmt: skip


@gluon.jit
def _half_topk_ws_kernel(q_desc, k1_desc, k2_desc, scratch_ptr, late_ptr, bound_ptr, N, H,
                         n_keys, K: gl.constexpr, WIDE: gl.constexpr, BLOCK_C: gl.constexpr,
                         KSPLIT: gl.constexpr, STAGES: gl.constexpr, BISECT: gl.constexpr,
                         STOP: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                         LOADER_REGS: gl.constexpr, Q_REG: gl.constexpr,
                         NUM_C: gl.constexpr, COMPACT: gl.constexpr,
                         SAMPLE: gl.constexpr, OVERLAP: gl.constexpr,
                         STAGE_K: gl.constexpr):  # fmt: skip
    """Grid (cdiv(N, NUM_C * 64), H, 2): NUM_C * 64 query rows of one half of one head a
    program, NUM_C consumer warpgroups (1, 2 or 4) and a loader warp."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [NUM_C * KSPLIT, ROWS, SPLIT], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k1_desc.dtype, [STAGES * KSPLIT, BLOCK_C, SPLIT],
                                       k1_desc.layout)  # fmt: skip
    if COMPACT == 0:
        tri_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_C, BLOCK_C],
                                                                        gl.bfloat16)  # fmt: skip
        # tri[c', c] = c' < c: the kept mask times tri counts, for each c, the kept before it
        blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        r = gl.expand_dims(gl.arange(0, BLOCK_C, layout=gl.SliceLayout(1, blocked)), 1)
        c = gl.expand_dims(gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, blocked)), 0)
        tri_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_C, BLOCK_C], tri_layout,
                                             (r < c).to(gl.bfloat16))  # fmt: skip
    else:
        tri_smem = k_smem  # not read: the places come from quad scans
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=NUM_C)  # every consumer hands each stage back
    fence_async_shared()

    if NUM_C == 4:
        gl.warp_specialize(
            [
                (_consumer, (q_smem, k_smem, tri_smem, q_bar, ready, empty, scratch_ptr,
                             late_ptr, bound_ptr, N, H, n_keys, 0, K, WIDE,
                             BLOCK_C, KSPLIT, STAGES, BISECT, STOP, Q_REG, NUM_C, COMPACT,
                             SAMPLE, OVERLAP, STAGE_K)),
                (_consumer, (q_smem, k_smem, tri_smem, q_bar, ready, empty, scratch_ptr,
                             late_ptr, bound_ptr, N, H, n_keys, 1, K, WIDE,
                             BLOCK_C, KSPLIT, STAGES, BISECT, STOP, Q_REG, NUM_C, COMPACT,
                             SAMPLE, OVERLAP, STAGE_K)),
                (_consumer, (q_smem, k_smem, tri_smem, q_bar, ready, empty, scratch_ptr,
                             late_ptr, bound_ptr, N, H, n_keys, 2, K, WIDE,
                             BLOCK_C, KSPLIT, STAGES, BISECT, STOP, Q_REG, NUM_C, COMPACT,
                             SAMPLE, OVERLAP, STAGE_K)),
                (_consumer, (q_smem, k_smem, tri_smem, q_bar, ready, empty, scratch_ptr,
                             late_ptr, bound_ptr, N, H, n_keys, 3, K, WIDE,
                             BLOCK_C, KSPLIT, STAGES, BISECT, STOP, Q_REG, NUM_C, COMPACT,
                             SAMPLE, OVERLAP, STAGE_K)),
                (_loader, (q_desc, k1_desc, k2_desc, q_smem, k_smem, q_bar, ready, empty, N, H,
                           n_keys, BLOCK_C, KSPLIT, STAGES, STOP, NUM_C, SAMPLE)),
            ],
            [4, 4, 4, 1],
            [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS],
        )  # fmt: skip
    elif NUM_C == 2:
        gl.warp_specialize(
            [
                (_consumer, (q_smem, k_smem, tri_smem, q_bar, ready, empty, scratch_ptr,
                             late_ptr, bound_ptr, N, H, n_keys, 0, K, WIDE,
                             BLOCK_C, KSPLIT, STAGES, BISECT, STOP, Q_REG, NUM_C, COMPACT,
                             SAMPLE, OVERLAP, STAGE_K)),
                (_consumer, (q_smem, k_smem, tri_smem, q_bar, ready, empty, scratch_ptr,
                             late_ptr, bound_ptr, N, H, n_keys, 1, K, WIDE,
                             BLOCK_C, KSPLIT, STAGES, BISECT, STOP, Q_REG, NUM_C, COMPACT,
                             SAMPLE, OVERLAP, STAGE_K)),
                (_loader, (q_desc, k1_desc, k2_desc, q_smem, k_smem, q_bar, ready, empty, N, H,
                           n_keys, BLOCK_C, KSPLIT, STAGES, STOP, NUM_C, SAMPLE)),
            ],
            [4, 1],
            [CONSUMER_REGS, LOADER_REGS],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_consumer, (q_smem, k_smem, tri_smem, q_bar, ready, empty, scratch_ptr,
                             late_ptr, bound_ptr, N, H, n_keys, 0, K, WIDE,
                             BLOCK_C, KSPLIT, STAGES, BISECT, STOP, Q_REG, NUM_C, COMPACT,
                             SAMPLE, OVERLAP, STAGE_K)),
                (_loader, (q_desc, k1_desc, k2_desc, q_smem, k_smem, q_bar, ready, empty, N, H,
                           n_keys, BLOCK_C, KSPLIT, STAGES, STOP, NUM_C, SAMPLE)),
            ],
            [1],
            [LOADER_REGS],
        )  # fmt: skip


def query_rows(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor | None:
    """The 2-D tensor (2 * H * N, half) the kernel reads the query halves (N, H, half) from by
    TMA, where they are views of one contiguous (2, H, N, half) tensor (heads first,
    ``normalise_query``'s output) at a 16-byte boundary; None otherwise."""
    N, H, half = q1.shape
    size = q1.element_size()
    if (
        q1.stride() != (half, N * half, 1)
        or q2.stride() != q1.stride()
        or q1.data_ptr() % 16
        or q2.data_ptr() != q1.data_ptr() + H * N * half * size
    ):
        return None
    return q1.as_strided((2 * H * N, half), (half, 1))


def eligible(q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, topk: int,
             block_c: int = BLOCK_C_) -> bool:  # fmt: skip
    """Whether the warp-specialised kernel can take these operands: a Hopper GPU, bf16 halves
    laid out as ``query_rows`` reads them, half a multiple of 64 up to 256, n_keys a multiple
    of block_c, topk at most block_c (the group maxima the bound needs)."""
    if not q1.is_cuda or q1.dtype != torch.bfloat16 or keys1.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(q1.device)[0] != 9:
        return False
    N, H, half = q1.shape
    n_keys = keys1.shape[1]
    return (
        half % SPLIT_ == 0
        and half <= 256
        and n_keys % block_c == 0
        and topk <= block_c
        and N > 0
        and query_rows(q1, q2) is not None
    )


@functools.lru_cache(maxsize=8)
def _layout(rows: int):
    return gl.NVMMASharedLayout.get_default_for([rows, SPLIT_], gl.bfloat16)


def overlap_by_default(compact: int, consumers: int) -> bool:
    """Whether pass two overlaps each chunk's products with the compaction of the chunk before
    unless the caller says: with places by quad scans (the triangle's product would wait on
    the next chunk's products) and two consumers, the tiles timed and checked on the H200 (four
    have no registers for a second result; one, capped at 128 registers for two programs a
    multiprocessor, compiles with it but was not timed)."""
    return compact == 1 and consumers == 2


def stage_k_by_default(topk: int, sample: int) -> int:
    """How many of the sampled chunks' group maxima must reach the bound that the skipped
    chunks are staged by: 5/8 of topk where pass one reads a quarter of the chunks or less and
    topk is at least 32, else topk.

    The filter keeps a row's candidates at the higher of that bound and the bound from every
    chunk, so a row is rechecked only where fewer than topk of its scores reach the staged one.
    Replayed on the CPU over 131,072 rows of Gaussian scores (``bench/stage_bound.py``) at
    4,096 sub-keys, top-32, sample 4: staged candidates a row 146 with 32, 84 with 20 (no row
    short of 32: no recheck), 67 with 16 (24 rows short, 1.2% of the 64-row blocks
    rechecked); with sample 2 and 20 a row in 135 is short, at top-16 and 10 one in 2,900.
    On an H200 at 16,384 tokens x 4 heads (84 staged a row, none short): the filter
    0.061 ms against 0.085, the half kernel 0.659 against 0.648 (two bisections in pass one),
    the whole top-k 0.894 ms against 0.923 and the 16M layer forward 1.311x the 1M one
    against 1.325x (five rounds in turns; docs/BENCHMARKS.md)."""
    return topk * 5 // 8 if sample >= 4 and topk >= 32 else topk


def half_topk_ws(q1, q2, keys1, keys2, scratch, late, topk: int, wide: int,
                 block_c: int = BLOCK_C_,
                 stages: int = 4, bisect: int = 6, stop: int = 0, consumer_regs: int = 232,
                 loader_regs: int = 40, q_reg: bool = True, consumers: int = 2,
                 maxnreg: int | None = None, compact: int = 1, sample: int = 1,
                 bound: torch.Tensor | None = None, overlap: bool | None = None,
                 stage_k: int | None = None):  # fmt: skip
    """Candidates of both halves into scratch (2, H, N, wide) and their counts into late
    (2, H, N); with stop 1 late holds each row's bound (fp32 bits) instead. With sample > 1
    the candidates are those of the sampled bound (about sample times as many: give scratch the
    places), and bound (2, H, N) fp32 receives each row's bound from every chunk's group
    maxima, by which ``triton_topk.filter_candidates`` keeps the ones that reach it.

    The sampled bound is one that stage_k of the sampled chunks' group maxima reach (default
    ``stage_k_by_default``): below topk, the skipped chunks stage fewer candidates, and bound
    receives the higher of the two bounds. A row with fewer than topk scores at that bound then
    keeps fewer than topk candidates, and the recheck ranks its block; so the results do not
    depend on stage_k, only the time does.

    Tiles (H200, whole top-k at 1,024 / 4,096 sub-keys): the query slices as register operands
    (``q_reg``) and 4 key stages 0.487 / 1.202 ms; from shared memory with 3 stages 0.499 /
    1.220; one consumer a program (two programs a multiprocessor, ``maxnreg`` 128) 0.481 /
    1.245. BLOCK_C 128 and 2 stages: pass one 0.20 ms against 0.13. Places by quad scans
    (``compact`` 1) 0.41 / 1.04 against 0.45 / 1.18 by the triangle product (0). Pass one over
    a half or a quarter of the chunks (``sample`` 2 / 4, the candidates filtered): 0.51 / 1.02
    and 0.59 / 1.00 ms against 0.42 / 1.05 (in turns, one call), so 4 from 4,096 sub-keys. Four
    consumers a program (``consumers`` 4, 120 registers each, the query read from shared memory,
    3 stages): 0.43 / 1.04. The bound by 6 halvings (``bisect``) rather than 12: 0.403 / 0.95
    against 0.416 / 0.97; with pass two's products overlapped (``overlap``, the default where
    ``overlap_by_default`` holds): 0.399 / 0.94 (one call, in turns). Consumers taking turns
    on the tensor cores (an mbarrier handing each its turn) gained nothing: 0.418 / 0.96.
    Each thread storing only its kept scores, from a local array by a bit mask (H100): one
    load and one store a pass of a loop 0.554 / 1.44 ms, four loads a row and then their
    stores 0.470 / 1.215, against 0.395 / 0.915 with every score a predicated store.
    """
    N, H, half = q1.shape
    n_keys = keys1.shape[1]
    if consumers not in (1, 2, 4):
        raise ValueError(f"consumers must be 1, 2 or 4, got {consumers}")
    if compact not in (0, 1):
        raise ValueError(f"compact must be 0 or 1, got {compact}")
    if consumers * 128 * consumer_regs + 32 * loader_regs > 65536:
        raise ValueError(
            f"{consumers} consumer warpgroups of {consumer_regs} registers and a "
            f"loader warp of {loader_regs} pass a multiprocessor's 65,536: lower "
            f"consumer_regs (four: 120, with q_reg False and loader_regs 24)"
        )
    if sample < 1 or n_keys // block_c // sample < 1:
        raise ValueError(f"sample must be in [1, n_keys / block_c = {n_keys // block_c}], "
                         f"got {sample}")  # fmt: skip
    if overlap is None:
        overlap = overlap_by_default(compact, consumers)
    if overlap and compact != 1:
        raise ValueError("overlap needs compact 1 (the triangle's product would wait on the "
                         "next chunk's products)")  # fmt: skip
    if sample > 1 and bound is None:
        raise ValueError("sample > 1 needs bound, a (2, H, N) fp32 tensor for the rows' bounds")
    if stage_k is None:
        stage_k = stage_k_by_default(topk, sample)
    if not 1 <= stage_k <= topk or (sample == 1 and stage_k != topk):
        raise ValueError(f"stage_k must be in [1, topk={topk}], and topk without sampling; "
                         f"got {stage_k} with sample {sample}")  # fmt: skip
    rows = query_rows(q1, q2)
    if rows is None:
        raise ValueError("the query halves must be views of one contiguous (2, H, N, half) "
                         "tensor, at a 16-byte boundary")  # fmt: skip
    k1, k2 = (k.contiguous() for k in (keys1, keys2))
    k1, k2 = (k if k.data_ptr() % 16 == 0 else k.clone() for k in (k1, k2))  # TMA's alignment
    k1, k2 = k1.view(H * n_keys, half), k2.view(H * n_keys, half)
    q_desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [ROWS_, SPLIT_],
                              _layout(ROWS_))  # fmt: skip
    k1_desc = TensorDescriptor(k1, list(k1.shape), list(k1.stride()), [block_c, SPLIT_],
                               _layout(block_c))  # fmt: skip
    k2_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [block_c, SPLIT_],
                               _layout(block_c))  # fmt: skip
    grid = ((N + consumers * ROWS_ - 1) // (consumers * ROWS_), H, 2)
    return _half_topk_ws_kernel[grid](
        q_desc, k1_desc, k2_desc, scratch, late, late if bound is None else bound, N, H, n_keys,
        K=topk, WIDE=wide,
        BLOCK_C=block_c, KSPLIT=half // SPLIT_, STAGES=stages, BISECT=bisect, STOP=stop,
        CONSUMER_REGS=consumer_regs, LOADER_REGS=loader_regs, Q_REG=q_reg,
        NUM_C=consumers, COMPACT=compact, SAMPLE=sample, OVERLAP=overlap, STAGE_K=stage_k,
        num_warps=4,
        # one consumer: registers for two programs a multiprocessor (their shared memory fits)
        **({"maxnreg": maxnreg or 128} if consumers == 1 or maxnreg else {}),
    )  # fmt: skip
