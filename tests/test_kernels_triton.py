"""The Triton kernels against the reference: on a GPU when there is one, otherwise on the CPU
under Triton's interpreter (TRITON_INTERPRET=1, tiny shapes). Skipped when Triton is missing."""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # must be set before the kernels are decorated, i.e. before triton_topk/triton_bag import
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="Triton is not installed (the optional extra `gpu`)")

from memslot import kernels  # noqa: E402
from memslot.kernels import reference, triton_bag, triton_topk  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# the interpreter runs every program in Python: keep CPU shapes tiny, use real sizes on a GPU
BIG = 1 if not CUDA else 16


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def random_keys(n, heads, n_keys, half, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(n, heads, half, generator=g),
        torch.randn(n, heads, half, generator=g),
        torch.randn(heads, n_keys, half, generator=g),
        torch.randn(heads, n_keys, half, generator=g),
    ]
    return [t.to(DEVICE, dtype) for t in tensors]


TOPK_SHAPES = [  # n, heads, n_keys, half, topk
    (20 * BIG, 2, 32, 8, 4),
    (7, 1, 5, 3, 1),  # k = 1, n_keys and half not powers of two
    (30 * BIG, 3, 40, 16, 9),
    (5, 2, 64, 8, 32),
    (3, 1, 300, 24, 5),  # several sub-key chunks
]


@pytest.mark.parametrize("n,heads,n_keys,half,topk", TOPK_SHAPES)
def test_fused_topk_equals_brute_force_in_fp32(n, heads, n_keys, half, topk):
    q1, q2, k1, k2 = random_keys(n, heads, n_keys, half, seed=n + n_keys)
    scores, slots = triton_topk.product_key_topk(q1, q2, k1, k2, topk)
    want_scores, want_slots = reference.brute_force_topk(q1, q2, k1, k2, topk)
    assert slots.dtype == torch.int64 and scores.shape == (n, heads, topk)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(slots.sort(-1).values, want_slots.sort(-1).values)


@pytest.mark.parametrize("wide,block_n", [(16, 16), (512, 16), (256, 64)])
def test_fused_topk_falls_back_exactly_when_the_threshold_passes_too_many(wide, block_n):
    # 16 groups of ~19 sub-keys and k = 16: the bound is the smallest group maximum, so far more
    # than the 16 candidate places reach it: with wide = 16 every block rescans the keys with the
    # sort network, with 256 or 512 places it ranks the candidates kept there, 16 rows at a time
    n, heads, n_keys, half, topk = 6, 2, 300, 8, 16
    q1, q2, k1, k2 = random_keys(n, heads, n_keys, half, seed=5)
    group_max = torch.einsum("nhd,hkd->nhk", q1, k1)
    group_max = torch.cat([group_max, group_max.new_full((n, heads, 4), float("-inf"))], -1)
    bound = group_max.view(n, heads, -1, 16).amax(2).amin(-1, keepdim=True)
    assert (torch.einsum("nhd,hkd->nhk", q1, k1) >= bound).sum(-1).min() > 16
    scores, slots, _, _ = triton_topk.product_key_topk_forward(
        q1, q2, k1, k2, topk, block_c=16, cap=16, wide=wide, block_n=block_n
    )
    want_scores, want_slots = reference.brute_force_topk(q1, q2, k1, k2, topk)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(slots.sort(-1).values, want_slots.sort(-1).values)


def assert_same_bits_and_exact(first, second, q1, q2, k1, k2, topk):
    """Two runs of the fused top-k give the same bits (scores, slots, half indices, pair ranks),
    and the second the brute force's top-k."""
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    want_scores, want_slots = reference.brute_force_topk(q1, q2, k1, k2, topk)
    torch.testing.assert_close(second[0], want_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(second[1].sort(-1).values, want_slots.sort(-1).values)


@pytest.mark.parametrize(
    "n,heads,n_keys,half,topk,tiles",
    [
        (20 * BIG, 2, 32, 8, 4, {}),
        (7, 3, 40, 16, 9, {}),
        (6, 2, 300, 8, 16, dict(block_c=16, cap=16, wide=16)),  # every block rescans the keys
        (6, 2, 300, 8, 16, dict(block_c=16, cap=16, wide=256)),  # ranked from the wide places
    ],
)
def test_ranking_in_the_half_or_the_combine_kernel_gives_the_same_bits(
    n, heads, n_keys, half, topk, tiles
):
    q1, q2, k1, k2 = random_keys(n, heads, n_keys, half, seed=n * heads)
    here, there = (
        triton_topk.product_key_topk_forward(
            q1, q2, k1, k2, topk, save_for_backward=True, later=later, **tiles
        )
        for later in (False, True)
    )
    assert_same_bits_and_exact(here, there, q1, q2, k1, k2, topk)


@pytest.mark.parametrize(
    "n,heads,n_keys,half,topk,tiles",
    [
        (20 * BIG, 2, 32, 8, 4, {}),
        (6, 2, 300, 8, 16, dict(block_c=16, cap=16, wide=16)),  # every block rescans the keys
        (6, 2, 300, 8, 16, dict(block_c=16, cap=16, wide=256)),
    ],
)
def test_the_recheck_after_the_half_kernel_gives_the_same_bits(n, heads, n_keys, half, topk,
                                                               tiles):  # fmt: skip
    # the recheck (run after the warp-specialised kernel on Hopper) ranks the blocks whose
    # counts in late are out of range; after the Triton kernel those are the -1 blocks it
    # ranked itself, which the recheck ranks again by the exact network over every chunk
    q1, q2, k1, k2 = random_keys(n, heads, n_keys, half, seed=n + heads)
    plain, rechecked = (
        triton_topk.product_key_topk_forward(
            q1, q2, k1, k2, topk, save_for_backward=True, ws=False, recheck=recheck, **tiles
        )
        for recheck in (False, True)
    )
    assert_same_bits_and_exact(plain, rechecked, q1, q2, k1, k2, topk)


def test_the_warp_specialised_path_refuses_what_it_cannot_take():
    # fp32 halves that are not views of one heads-first tensor: not for the Gluon kernel, and
    # the recheck and the Gluon kernel both leave the ranking to the combine kernel
    q1, q2, k1, k2 = random_keys(8, 2, 64, 64, seed=3)
    with pytest.raises(ValueError, match="ws needs a Hopper GPU"):
        triton_topk.product_key_topk_forward(q1, q2, k1, k2, 4, ws=True)
    with pytest.raises(ValueError, match="need later"):
        triton_topk.product_key_topk_forward(q1, q2, k1, k2, 4, recheck=True, later=False)
    try:
        from memslot.kernels import gluon_topk
    except (ImportError, AttributeError):  # a Triton without (this) Gluon
        return
    # pass one must read at least one chunk of 64 sub-keys (refused before any launch)
    for sample in (0, 2):
        with pytest.raises(ValueError, match=r"sample must be in \[1, n_keys / block_c = 1\]"):
            gluon_topk.half_topk_ws(q1, q2, k1, k2, None, None, 4, 128, sample=sample)
    k1, k2 = (torch.randn(2, 128, 64, device=DEVICE) for _ in range(2))  # two chunks
    with pytest.raises(ValueError, match="sample > 1 needs bound"):
        gluon_topk.half_topk_ws(q1, q2, k1, k2, None, None, 4, 128, sample=2)
    bound = torch.empty(2, 2, 8, device=DEVICE)
    for sample, stage_k in ((2, 0), (2, 5), (1, 2)):  # in [1, topk], and topk unless sampled
        with pytest.raises(ValueError, match=rf"stage_k must be in \[1, topk=4\].* {stage_k} "):
            gluon_topk.half_topk_ws(q1, q2, k1, k2, None, None, 4, 128, sample=sample,
                                    bound=bound, stage_k=stage_k)  # fmt: skip
    with pytest.raises(ValueError, match="overlap needs compact 1"):
        gluon_topk.half_topk_ws(q1, q2, k1, k2, None, None, 4, 128, overlap=True, compact=0)
    with pytest.raises(ValueError, match="compact must be 0 or 1"):
        gluon_topk.half_topk_ws(q1, q2, k1, k2, None, None, 4, 128, compact=2)
    with pytest.raises(ValueError, match="consumers must be 1, 2 or 4"):
        gluon_topk.half_topk_ws(q1, q2, k1, k2, None, None, 4, 128, consumers=3)
    with pytest.raises(ValueError, match="lower consumer_regs"):  # 4 x 128 x 232 registers
        gluon_topk.half_topk_ws(q1, q2, k1, k2, None, None, 4, 128, consumers=4)
    with pytest.raises(ValueError, match=r"views of one contiguous \(2, H, N, half\)"):
        gluon_topk.half_topk_ws(q1, q2, k1, k2, None, None, 4, 128)  # two separate tensors
    q = torch.randn(8, 2, 128, device=DEVICE)
    normed = triton_topk.normalise_query(q, None)  # the heads-first halves: the layout it reads
    rows = gluon_topk.query_rows(normed[0].transpose(0, 1), normed[1].transpose(0, 1))
    assert rows.shape == (2 * 2 * 8, 64) and torch.equal(rows.view(2, 2, 8, 64), normed)
    assert gluon_topk.query_rows(normed[1].transpose(0, 1), normed[0].transpose(0, 1)) is None
    assert gluon_topk.query_rows(q[..., :64], q[..., 64:]) is None  # the query as projected


def test_the_filter_keeps_the_staged_candidates_that_reach_each_rows_bound_in_order():
    # what the Gluon kernel leaves with a sampled bound: (2, H, N) rows of staged candidates
    # (fp32 bits << 32 | sub-key), their counts, and each row's bound from every sub-key
    g = torch.Generator().manual_seed(5)
    shape, stage_wide, wide = (2, 2, 13), 128, 32
    score = torch.randn(*shape, stage_wide, generator=g)
    col = torch.randint(0, 4096, (*shape, stage_wide), generator=g)
    stage = (score.view(torch.int32).to(torch.int64) << 32) | col
    count = torch.randint(0, stage_wide + 1, shape, generator=g, dtype=torch.int32)
    count[0, 0, :3] = torch.tensor([0, stage_wide, stage_wide + 70])  # none, full, not all staged
    bound = torch.randn(shape, generator=g) * 0.5
    bound[1, 1, :2] = float("-inf")  # every staged one reaches it: more than wide keepers
    count[1, 1, :2] = torch.tensor([wide + 1, 100])
    stage, count, bound = stage.to(DEVICE), count.to(DEVICE), bound.to(DEVICE)
    scratch = torch.full((*shape, wide), -1, dtype=torch.int64, device=DEVICE)
    late = count.clone()
    triton_topk.filter_candidates(stage, bound, scratch, late)
    for r in range(late.numel()):
        c, b = int(count.view(-1)[r]), float(bound.view(-1)[r])
        if c > stage_wide:  # not all staged: the count stays, over wide, for the recheck
            assert int(late.view(-1)[r]) == c
            continue
        row = stage.view(-1, stage_wide)[r, :c]
        keepers = row[score.view(-1, stage_wide)[r, :c].to(DEVICE) >= b]
        assert int(late.view(-1)[r]) == keepers.numel()
        n = min(keepers.numel(), wide)
        assert torch.equal(scratch.view(-1, wide)[r, :n], keepers[:n])
        assert (scratch.view(-1, wide)[r, n:] == -1).all()  # nothing past them
    assert (late[1, 1, :2] > wide).all()  # those blocks go to the recheck


HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9
# four consumer warpgroups a program: their registers and the loader's fit in 64K
FOUR_CONSUMERS = dict(consumers=4, consumer_regs=120, loader_regs=24, q_reg=False, stages=3)


@pytest.mark.skipif(not HOPPER, reason="the warp-specialised kernel needs a Hopper GPU")
@pytest.mark.parametrize(
    "n,heads,half,n_keys,topk,same_keys",
    [
        (16384, 4, 256, 1024, 32, False),  # the benchmark's shape
        (1000, 2, 128, 256, 16, False),  # a last block of 104 rows
        (333, 3, 64, 128, 1, False),  # k = 1, one 64-wide slice of the head dimension
        (4096, 4, 256, 4096, 32, False),
        (700, 2, 256, 1024, 32, True),  # every score of a row tied: every block rechecked
    ],
)
@pytest.mark.parametrize(
    "tiles",
    [
        dict(compact=1, sample=1),  # places by a scan over each quad of lanes
        dict(compact=0, sample=1),  # places by a product with the triangle
        dict(compact=1, sample=2),  # pass one over half the sub-keys: a looser bound
        dict(compact=1, sample=4),  # ... a quarter: more candidates staged, then filtered
        # the skipped chunks staged by a bound that topk of the sampled maxima reach (more
        # staged than by the default's at top-32), and by one that most rows fall short of at
        # the filter (their blocks ranked by the recheck)
        dict(compact=1, sample=4, stage_k=32),
        dict(compact=1, sample=4, stage_k=4),
        dict(compact=1, sample=1, **FOUR_CONSUMERS),  # the query read from shared memory
        # each chunk's products waited for before the next's start, the bound by 12 halvings
        dict(compact=1, sample=1, overlap=False, bisect=12),
        dict(compact=1, sample=4, overlap=False),
    ],
)
def test_the_warp_specialised_half_kernel_gives_the_same_bits(n, heads, half, n_keys, topk,
                                                              same_keys, tiles):  # fmt: skip
    from memslot.kernels import gluon_topk

    if n_keys // gluon_topk.BLOCK_C_ < tiles["sample"]:
        pytest.skip("pass one would read no chunk (refused: see the refusal test)")
    if "stage_k" in tiles:
        tiles = dict(tiles, stage_k=min(tiles["stage_k"], topk))
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(n, heads, 2 * half, device="cuda", generator=g).to(torch.bfloat16)
    normed = triton_topk.normalise_query(q, None)  # the layout query_topk gives the kernel
    q1, q2 = normed[0].transpose(0, 1), normed[1].transpose(0, 1)
    k1, k2 = (
        torch.randn(heads, n_keys, half, device="cuda", generator=g).to(torch.bfloat16)
        for _ in range(2)
    )
    if same_keys:
        k1[:, 1:] = k1[:, :1]
    assert gluon_topk.eligible(q1, q2, k1, topk)
    triton_only, ws = (
        triton_topk.product_key_topk_forward(q1, q2, k1, k2, topk, save_for_backward=True, ws=w,
                                             ws_tiles=tiles if w else None)
        for w in (False, True)
    )  # fmt: skip
    for a, b in zip(triton_only, ws, strict=True):  # scores, slots, half indices, pair ranks
        assert torch.equal(a, b)


@pytest.mark.parametrize("bisect", [0, 3, 12])
def test_fused_topk_is_exact_with_a_sorted_or_a_bisected_bound(bisect):
    # a sorted bound (0) or bisection (few steps: a looser bound, more candidates, fallbacks):
    # the same exact top-k either way
    n, heads, n_keys, half, topk = 24 * BIG, 2, 96, 16, 8
    q1, q2, k1, k2 = random_keys(n, heads, n_keys, half, seed=bisect + 1)
    scores, slots, _, _ = triton_topk.product_key_topk_forward(
        q1, q2, k1, k2, topk, block_c=32, bisect=bisect
    )
    want_scores, want_slots = reference.brute_force_topk(q1, q2, k1, k2, topk)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(slots.sort(-1).values, want_slots.sort(-1).values)


@pytest.mark.parametrize("topk", [1, 3, 4, 9, 32])
def test_split_combine_ranks_the_pairs_bit_for_bit_as_the_whole_network(topk):
    # sums of half-rank 0 and of sub-rank 0 merged as the sorted lists they are, the rest by a
    # top-k network: the same scores, slots and half-ranks as one network over every pair
    # (ties too: the halves' top-k are rounded to a coarse grid so that many sums tie)
    n, heads, n_keys, half = 6 * BIG, 2, 64, 8
    q1, q2, k1, k2 = random_keys(n, heads, n_keys, half, seed=topk)
    q1, q2 = (torch.round(t * 2) / 2 for t in (q1, q2))
    k1, k2 = (torch.round(t * 2) / 2 for t in (k1, k2))
    whole = triton_topk.product_key_topk_forward(
        q1, q2, k1, k2, topk, save_for_backward=True, split=False
    )
    split = triton_topk.product_key_topk_forward(
        q1, q2, k1, k2, topk, save_for_backward=True, split=True
    )
    for a, b in zip(whole, split, strict=True):
        assert torch.equal(a, b)
    want_scores, want_slots = reference.brute_force_topk(q1, q2, k1, k2, topk)
    torch.testing.assert_close(split[0], want_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scan", [0, 1, 2, 3])
def test_fused_topk_places_candidates_alike_by_scan_or_triangle_product(scan, dtype):
    # 0: a prefix sum and plain stores; 1: places by a product with the strict triangle; 2: the
    # same with stores in the registers' layout (inline PTX: on a GPU only); 3: those with the
    # address and the candidate formed in the PTX
    if scan >= 2 and not CUDA:
        pytest.skip("inline PTX stores run on a GPU only")
    n, heads, n_keys, half, topk = 40 * BIG, 2, 200, 16, 8  # several chunks, a masked tail
    q1, q2, k1, k2 = random_keys(n, heads, n_keys, half, seed=scan + 9, dtype=dtype)
    got = triton_topk.product_key_topk_forward(q1, q2, k1, k2, topk, block_c=32, scan=scan)
    up = [t.float() for t in (q1, q2, k1, k2)]
    want_scores, want_slots = reference.brute_force_topk(*up, topk)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got[0], want_scores) < tol
    if dtype == torch.float32:
        assert torch.equal(got[1].sort(-1).values, want_slots.sort(-1).values)
    # every way of placing the candidates ranks them the same
    base = triton_topk.product_key_topk_forward(q1, q2, k1, k2, topk, block_c=32, scan=0)
    assert torch.equal(got[1], base[1]) and torch.equal(got[0], base[0])


def test_fused_topk_in_bf16_picks_slots_as_good_as_fp64():
    q1, q2, k1, k2 = random_keys(40 * BIG, 2, 64, 16, seed=7, dtype=torch.bfloat16)
    topk = 8
    scores, slots = triton_topk.product_key_topk(q1, q2, k1, k2, topk)
    assert scores.dtype == torch.float32  # one rounding of the fp32 sum
    up = [t.double() for t in (q1, q2, k1, k2)]
    want, _ = reference.brute_force_topk(*up, topk)
    assert rel_err(scores, want) < 1e-2
    # the fp64 score of every returned slot (bf16 inputs, exact arithmetic) is a top-k score
    n_keys = k1.shape[1]
    s1 = torch.einsum("nhd,hkd->nhk", up[0], up[2]).gather(-1, slots // n_keys)
    s2 = torch.einsum("nhd,hkd->nhk", up[1], up[3]).gather(-1, slots % n_keys)
    assert rel_err((s1 + s2).sort(-1, descending=True).values, want) < 1e-2


def test_fused_topk_gradients_match_the_reference():
    q1, q2, k1, k2 = random_keys(12 * BIG, 2, 24, 8, seed=3)
    grad = torch.randn(12 * BIG, 2, 5, device=DEVICE)
    grads = []
    for fn in (reference.product_key_topk, triton_topk.product_key_topk):
        leaves = [t.clone().requires_grad_() for t in (q1, q2, k1, k2)]
        scores, _ = fn(*leaves, 5)
        scores.backward(grad)
        grads.append([t.grad for t in leaves])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def query_topk_inputs(n, heads, n_keys, half, seed, dtype=torch.float32):
    """A whole query (n, heads, 2 * half) with halves of different scales, sub-keys and a norm
    weight."""
    q1, q2, k1, k2 = random_keys(n, heads, n_keys, half, seed, dtype)
    q = torch.cat([q1 * 4.0, q2 * 0.25], -1)
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(2, half, generator=g) + 0.5).to(DEVICE, dtype)
    return q, k1, k2, weight


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("n,heads,n_keys,half,topk", [(20 * BIG, 2, 40, 8, 5), (6, 1, 5, 3, 1)])
def test_query_topk_matches_the_reference_with_and_without_qk_norm(
    n, heads, n_keys, half, topk, norm, softmax
):
    # with softmax the combine kernel writes each row's weights and the backward goes through
    # the softmax first
    q, k1, k2, weight = query_topk_inputs(n, heads, n_keys, half, seed=n + half)
    weight = weight if norm else None
    grad = torch.randn(n, heads, topk, device=DEVICE)
    results = []
    for fn in (reference.query_topk, triton_topk.query_topk):
        leaves = [t.clone().requires_grad_() for t in (q, k1, k2)]
        w = weight.clone().requires_grad_() if norm else None
        scores, slots = fn(*leaves, topk, w, softmax=softmax)
        scores.backward(grad)
        results.append((scores, slots, [t.grad for t in leaves] + ([w.grad] if norm else [])))
    (want_s, want_slots, want_grads), (got_s, got_slots, got_grads) = results
    assert got_s.dtype == torch.float32
    torch.testing.assert_close(got_s, want_s, atol=1e-5, rtol=1e-5)
    if softmax:
        torch.testing.assert_close(got_s.sum(-1), torch.ones(n, heads, device=DEVICE))
        assert bool((got_s[..., :-1] >= got_s[..., 1:]).all())  # in the scores' order
    assert torch.equal(got_slots.sort(-1).values, want_slots.sort(-1).values)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_query_norm_pass_writes_the_normalised_halves_heads_first():
    n, heads, half = 24 * BIG, 3, 16
    q, _, _, weight = query_topk_inputs(n, heads, 8, half, seed=1)
    q1, q2 = q.chunk(2, dim=-1)
    want = torch.stack(
        [reference.rms_normalise(q1) * weight[0], reference.rms_normalise(q2) * weight[1]]
    )
    torch.testing.assert_close(triton_topk.normalise_query(q, weight), want.transpose(1, 2))
    plain = triton_topk.normalise_query(q, None)  # no weight: the halves as they are
    assert torch.equal(plain, torch.stack([q1, q2]).transpose(1, 2))


def test_fused_topk_writes_the_query_halves_the_scores_use():
    q1, q2, k1, k2 = random_keys(20 * BIG, 2, 40, 8, seed=6)
    normed = torch.full((2, 2, 20 * BIG, 8), float("nan"), device=DEVICE)
    triton_topk.product_key_topk_forward(q1, q2, k1, k2, 4, normed_out=normed)
    assert torch.equal(normed, torch.stack([q1, q2]).transpose(1, 2))


def test_query_topk_with_qk_norm_in_bf16_is_as_close_to_fp32_as_the_reference_in_bf16():
    # near-ties pick different slots in bf16 and fp32 (and so different gradients): the kernel's
    # bf16 scores and gradients must be no further from the fp32 reference than the reference's
    q, k1, k2, weight = query_topk_inputs(30 * BIG, 2, 64, 16, seed=8, dtype=torch.bfloat16)
    grad = torch.randn(30 * BIG, 2, 8, device=DEVICE)
    results = {}
    for name, fn, inputs in (
        ("kernel", triton_topk.query_topk, [q, k1, k2, weight]),
        ("reference bf16", reference.query_topk, [q, k1, k2, weight]),
        ("reference fp32", reference.query_topk, [t.float() for t in (q, k1, k2, weight)]),
    ):
        leaves = [t.clone().requires_grad_() for t in inputs]
        scores, _ = fn(*leaves[:3], 8, leaves[3])
        scores.backward(grad)
        results[name] = [scores.detach()] + [t.grad for t in leaves]
    exact = results["reference fp32"]
    assert all(t.dtype == torch.bfloat16 for t in results["kernel"][1:])
    assert rel_err(results["kernel"][0], exact[0]) < 1e-2
    for got, ref16, want in zip(results["kernel"], results["reference bf16"], exact, strict=True):
        assert rel_err(got, want) <= max(rel_err(ref16, want), 1e-2)


def test_fused_topk_on_an_empty_batch():
    q1, q2, k1, k2 = random_keys(0, 2, 16, 4, seed=0)
    scores, slots = triton_topk.product_key_topk(q1, q2, k1, k2, 3)
    assert scores.shape == (0, 2, 3) and slots.shape == (0, 2, 3)
    q = torch.cat([q1, q2], -1).requires_grad_()
    weight = torch.ones(2, 4, device=DEVICE, requires_grad=True)
    for softmax in (False, True):
        q.grad = weight.grad = None
        scores, slots = triton_topk.query_topk(q, k1, k2, 3, weight, softmax=softmax)
        assert scores.shape == (0, 2, 3) and slots.shape == (0, 2, 3)
        scores.sum().backward()
        assert q.grad.shape == (0, 2, 8) and torch.equal(weight.grad, torch.zeros_like(weight))


def bag_inputs(n, bag, n_slots, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n_slots, dim, generator=g).to(DEVICE, dtype)
    indices = torch.randint(0, n_slots, (n, bag), generator=g)
    if n and bag >= 3:
        indices[0, :3] = 7 % n_slots  # repeated slots inside one bag must accumulate
    weights = torch.rand(n, bag, generator=g).to(DEVICE)
    grad_out = torch.randn(n, dim, generator=g).to(DEVICE)
    return values, indices.to(DEVICE), weights, grad_out


BAG_CASES = [  # n, bag, n_slots, dim
    (6, 5, 40, 1),
    (9 * BIG, 8, 64, 65),
    (3, 4, 16, 4096),
    (5 * BIG, 1, 12, 33),
]
# METHOD.md: fp32 arithmetic far under 1e-3; one rounding to bf16 between 1e-3 and 1e-2
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,bag,n_slots,dim", BAG_CASES)
def test_embedding_bag_forward_matches_the_reference(n, bag, n_slots, dim, dtype):
    values, indices, weights, _ = bag_inputs(n, bag, n_slots, dim, dtype, seed=dim)
    out = triton_bag.embedding_bag_forward(values, indices, weights)
    want = reference.embedding_bag_forward(values.double(), indices, weights.double())
    assert out.dtype == torch.float32 and out.shape == (n, dim)
    # table rows are exact in every dtype; only the fp32 accumulation rounds
    assert rel_err(out, want) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("order", [False, True])
@pytest.mark.parametrize("n,bag,n_slots,dim", BAG_CASES)
def test_bag_forward_in_slot_order_matches_the_reference_gated_or_not(n, bag, n_slots, dim,
                                                                      order):  # fmt: skip
    values, indices, weights, _ = bag_inputs(n, bag, n_slots, dim, torch.bfloat16, seed=dim + 5)
    gate = torch.randn(n, dim, generator=torch.Generator().manual_seed(dim)).to(DEVICE)
    want = reference.embedding_bag_forward(values.double(), indices, weights.double())
    out, bag_out = triton_bag._bag_forward(values, indices, weights, torch.float32, gate,
                                           keep_bag=True, order=order)  # fmt: skip
    assert rel_err(bag_out, want) < TOLERANCE[torch.float32]
    assert rel_err(out, reference.silu_gated(gate, want, torch.float32)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("tiles", [(1024, 4), (128, 1)])  # keys and warps a program
@pytest.mark.parametrize("n_rows", [9, 2**31])  # int32 keys, int64 keys
@pytest.mark.parametrize("n,bag", [(0, 4), (3, 0), (7, 1), (5 * BIG, 5), (9, 65), (2, 128)])
def test_order_bags_puts_each_bags_pairs_in_slot_order(n, bag, n_rows, tiles):
    g = torch.Generator().manual_seed(n + bag)
    indices = torch.randint(0, 9, (n, bag), generator=g)  # many repeats inside a bag
    if n and bag and n_rows > 9:
        indices[0, 0] = n_rows - 1  # the largest slot there can be
    weights = torch.rand(n, bag, generator=g)
    slots, ordered = triton_bag.order_bags(indices.to(DEVICE), weights.to(DEVICE), n_rows,
                                           *tiles)  # fmt: skip
    want_slots, place = torch.sort(indices, dim=1, stable=True)  # equal slots in bag order
    assert slots.dtype == torch.int32 and slots.shape == (n, bag)
    assert torch.equal(slots.cpu().long(), want_slots)
    assert torch.equal(ordered.cpu(), torch.gather(weights, 1, place))


def test_order_bags_takes_strided_slots_and_weights():
    g = torch.Generator().manual_seed(4)
    indices = torch.randint(0, 50, (6, 5), generator=g)
    weights = torch.rand(5, 6, generator=g).t()  # (6, 5), a transposed view
    slots, ordered = triton_bag.order_bags(indices.t().contiguous().t().to(DEVICE),
                                           weights.to(DEVICE), 50)  # fmt: skip
    want_slots, place = torch.sort(indices, dim=1, stable=True)
    assert torch.equal(slots.cpu().long(), want_slots)
    assert torch.equal(ordered.cpu(), torch.gather(weights, 1, place))


def test_the_bag_forward_orders_bags_where_rows_repeat_across_them():
    row = 1024 * 2  # bf16 rows of the benchmark's model dim
    assert triton_bag.orders_bags(2 * 2**20, 2**20, row)  # the benchmark at 1M slots
    assert not triton_bag.orders_bags(2 * 2**20, 2**24, row)  # ... at 16M: few repeats
    assert not triton_bag.orders_bags(2**16, 2**14, row)  # a 32 MiB table: L2 holds most of it
    assert not triton_bag.orders_bags(10, 0, row)
    assert not triton_bag.orders_bags(2**32, 2**31, row)  # slots past int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,bag,n_slots,dim", BAG_CASES)
def test_embedding_bag_backward_matches_the_reference(n, bag, n_slots, dim, dtype):
    values, indices, weights, grad_out = bag_inputs(n, bag, n_slots, dim, dtype, seed=dim + 1)
    grad_w, slots, rows = triton_bag.embedding_bag_backward(grad_out, values, indices, weights)
    want_w, want_slots, want_rows = reference.embedding_bag_backward(
        grad_out.double(), values.double(), indices, weights.double()
    )
    assert torch.equal(slots, want_slots)
    assert rel_err(grad_w, want_w) < TOLERANCE[torch.float32]
    assert rel_err(rows, want_rows) < TOLERANCE[torch.float32]
    # rows emitted in the table's dtype are the fp32 rows rounded once
    _, rows_low = triton_bag.embedding_bag_grad_rows(grad_out, values, indices, weights, dtype)
    assert rows_low.dtype == dtype and rel_err(rows_low, want_rows) < TOLERANCE[dtype]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_gives_the_reference_gradients_sparse_and_dense(sparse, dtype):
    values, indices, weights, grad_out = bag_inputs(10 * BIG, 6, 50, 24, dtype, seed=11)
    grads = []
    for fn in (reference.embedding_bag, triton_bag.embedding_bag):
        v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
        fn(v, indices, w, sparse).backward(grad_out)
        assert v.grad.is_sparse == sparse and v.grad.dtype == dtype
        grads.append((v.grad.to_dense(), w.grad))
    tol = TOLERANCE[dtype]
    assert rel_err(grads[1][0], grads[0][0]) < tol
    assert rel_err(grads[1][1], grads[0][1]) < TOLERANCE[torch.float32]
    if sparse:
        assert torch.equal(grads[1][0].abs().sum(1) > 0, grads[0][0].abs().sum(1) > 0)


@pytest.mark.parametrize("dense", [False, True])
def test_value_gradient_of_slots_read_many_times_matches_the_reference(dense):
    # runs of ~100 pairs per slot cross many tiles of sorted pairs; short runs end on tile edges
    values, indices, weights, grad_out = bag_inputs(30 * BIG, 16, 5, 33, torch.float32, seed=4)
    indices[-1] = torch.arange(16, device=DEVICE) % 5  # (5 distinct, repeated)
    _, want_slots, want_rows = reference.embedding_bag_backward(
        grad_out.double(), values.double(), indices, weights.double()
    )
    for block_p in (1, 4):
        slots, rows = triton_bag.embedding_bag_grad_rows(
            grad_out, values, indices, weights, dense=dense, block_p=block_p
        )
        assert torch.equal(slots, want_slots)
        if dense:
            rows = rows[want_slots]
        assert rel_err(rows, want_rows) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("block_p,presorted", [(1, False), (4, False), (1, True), (2, True)])
@pytest.mark.parametrize("n,bag,n_slots,dim", BAG_CASES)
def test_fused_backward_gives_both_gradients_of_the_reference(
    n, bag, n_slots, dim, block_p, presorted, dense
):
    # grad_out as the layer's backward gives it: in bf16, the dtype the bag was rounded to
    values, indices, weights, grad_out = bag_inputs(n, bag, n_slots, dim, torch.bfloat16, dim + 2)
    grad_out = grad_out.to(torch.bfloat16)
    grad_w, slots, rows = triton_bag.embedding_bag_backward_fused(
        grad_out, values, indices, weights, torch.float32, dense, block_p, 1024,
        presorted=presorted,
    )  # fmt: skip
    want_w, want_slots, want_rows = reference.embedding_bag_backward(
        grad_out.double(), values.double(), indices, weights.double()
    )
    assert torch.equal(slots, want_slots)
    if dense:
        assert rows.shape == values.shape
        rows = rows[want_slots]
    assert rel_err(grad_w, want_w) < TOLERANCE[torch.float32]
    assert rel_err(rows, want_rows) < TOLERANCE[torch.float32]


def test_fused_backward_sums_long_runs_of_one_slot_in_a_fixed_order():
    values, indices, weights, grad_out = bag_inputs(30 * BIG, 16, 5, 33, torch.float32, seed=6)
    grad_out = grad_out.to(torch.bfloat16)
    want_w, want_slots, want_rows = reference.embedding_bag_backward(
        grad_out.double(), values.double(), indices, weights.double()
    )
    runs = [
        triton_bag.embedding_bag_backward_fused(
            grad_out, values, indices, weights, block_p=p, presorted=presorted
        )
        for p, presorted in ((1, False), (1, False), (4, False), (2, True))
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][2], runs[1][2])
    for grad_w, slots, rows in runs:
        assert torch.equal(slots, want_slots)
        assert rel_err(grad_w, want_w) < TOLERANCE[torch.float32]
        assert rel_err(rows, want_rows) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("sparse", [False, True])
def test_autograd_of_a_bag_rounded_to_bf16_gives_the_reference_gradients(sparse):
    # the layer's call: the output rounded to bf16 in the kernel, so grad_out arrives in bf16
    # and the backward takes the fused kernel
    values, indices, weights, grad_out = bag_inputs(10 * BIG, 6, 50, 24, torch.bfloat16, 12)
    outs, grads = [], []
    for fn in (reference.embedding_bag, triton_bag.embedding_bag):
        v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
        out = fn(v, indices, w, sparse, torch.bfloat16)
        assert out.dtype == torch.bfloat16
        out.backward(grad_out.to(torch.bfloat16))
        outs.append(out.detach())
        grads.append((v.grad.to_dense(), w.grad))
    assert rel_err(outs[1], outs[0]) < TOLERANCE[torch.bfloat16]  # fp32 sums, rounded once
    assert rel_err(grads[1][0], grads[0][0]) < TOLERANCE[torch.bfloat16]
    assert rel_err(grads[1][1], grads[0][1]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_bag_gives_the_reference_output_and_gradients(dtype, sparse):
    # the memory layer's read: silu(gate) * bag, with gradients for the rows, weights and gate
    values, indices, weights, grad_out = bag_inputs(10 * BIG, 6, 50, 40, dtype, seed=13)
    gate = torch.randn(10 * BIG, 40, generator=torch.Generator().manual_seed(14)).to(DEVICE, dtype)
    results = []
    for fn in (reference.embedding_bag, triton_bag.embedding_bag):
        v, w, g = (t.clone().requires_grad_() for t in (values, weights, gate))
        out = fn(v, indices, w, sparse, dtype, g)
        assert out.dtype == dtype
        out.backward(grad_out.to(dtype))
        results.append((out.detach(), v.grad.to_dense(), w.grad, g.grad))
    for got, want in zip(results[1], results[0], strict=True):
        assert rel_err(got, want) < TOLERANCE[dtype]


def test_value_gradient_is_bitwise_deterministic():
    # many repeats of few slots: any order-dependent accumulation would show in the low bits
    values, indices, weights, grad_out = bag_inputs(40 * BIG, 16, 5, 33, torch.float32, seed=2)
    runs = [
        triton_bag.embedding_bag_grad_rows(grad_out, values, indices, weights)[1] for _ in range(3)
    ]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_embedding_bag_on_an_empty_batch():
    values, indices, weights, grad_out = bag_inputs(0, 3, 8, 4, torch.float32, seed=0)
    v = values.clone().requires_grad_()
    out = triton_bag.embedding_bag(v, indices, weights)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(values))
    grad_w, slots, rows = triton_bag.embedding_bag_backward(grad_out, values, indices, weights)
    assert grad_w.shape == (0, 3) and slots.numel() == 0 and rows.shape == (0, 4)


@pytest.fixture()
def triton_backend_on_this_device():
    """Route this device's tensors to the Triton kernels (on a CPU: through the interpreter)."""
    saved = dict(kernels._BACKENDS.get(DEVICE, {}))
    kernels.register_backend(
        DEVICE,
        query_topk=triton_topk.query_topk,
        product_key_topk=triton_topk.product_key_topk,
        embedding_bag=triton_bag.embedding_bag,
    )
    yield
    kernels._BACKENDS.pop(DEVICE, None)
    if saved:
        kernels.register_backend(DEVICE, **saved)


def run_layer(layer, x, values, sparse):
    x = x.clone().requires_grad_()
    values = values.clone().requires_grad_()
    y, lookup = layer(x, values, sparse_grad=sparse)
    y.square().sum().backward()
    params = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for p in layer.parameters():
        p.grad = None
    return y.detach(), lookup, x.grad, values.grad.to_dense(), params


@pytest.mark.parametrize("sparse", [False, True])
def test_memory_layer_trains_through_the_kernels_like_the_reference(
    sparse, triton_backend_on_this_device
):
    from memslot.model.config import MemoryConfig
    from memslot.model.memory import ProductKeyMemory

    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=16, heads=2, topk=4, k_dim=16, layers=(0,))
    layer = ProductKeyMemory(32, 24, cfg, 0).to(DEVICE)
    x = torch.randn(2, 5 * BIG, 32, device=DEVICE)
    values = torch.randn(cfg.n_slots, 24, device=DEVICE)
    fast = run_layer(layer, x, values, sparse)
    backend = kernels._BACKENDS.pop(DEVICE)
    try:
        slow = run_layer(layer, x, values, sparse)
    finally:
        kernels.register_backend(DEVICE, **backend)
    assert torch.equal(fast[1].slots, slow[1].slots)
    for got, want in [fast[0], slow[0]], [fast[2], slow[2]], [fast[3], slow[3]]:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name in fast[4]:
        torch.testing.assert_close(fast[4][name], slow[4][name], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gate_beside_the_lookup_gives_the_same_output(dtype, triton_backend_on_this_device):
    # without autograd on a GPU the gate projection runs on a side stream beside the top-k:
    # the same output, bit for bit, as in line, and the same lookups
    from memslot.model.config import MemoryConfig
    from memslot.model.memory import ProductKeyMemory

    torch.manual_seed(1)
    cfg = MemoryConfig(n_keys=256, heads=4, topk=32, k_dim=128, layers=(0,))
    layer = ProductKeyMemory(256, 256, cfg, 0).to(DEVICE, dtype)
    values = torch.randn(cfg.n_slots, 256, device=DEVICE, dtype=dtype)
    x = torch.randn(3, 700, 256, device=DEVICE, dtype=dtype)
    outputs = {}
    try:
        for beside in (False, True):
            ProductKeyMemory.gate_beside_lookup = beside
            with torch.no_grad():
                y, lookup = layer(x, values)
            torch.cuda.synchronize()
            outputs[beside] = (y, lookup.slots, lookup.weights)
    finally:
        ProductKeyMemory.gate_beside_lookup = True
    for a, b in zip(outputs[False], outputs[True], strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_tensors_are_routed_to_the_triton_kernels():
    if os.environ.get("MEMSLOT_KERNELS", "").lower() == "reference":
        pytest.skip("MEMSLOT_KERNELS=reference keeps CUDA on the reference")
    probe = torch.zeros(1, device="cuda")
    assert kernels._pick("embedding_bag", probe) is triton_bag.embedding_bag
    assert kernels._pick("product_key_topk", probe) is triton_topk.product_key_topk
    assert kernels._pick("query_topk", probe) is triton_topk.query_topk


@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_demo_model_and_editor_answer_the_same_on_cuda_as_on_the_cpu(tiny_model_dir):
    from memslot.demo.corpus import prompts_for
    from memslot.demo.recipe import load_corpus
    from memslot.edit import Editor
    from memslot.model.checkpoint import load_model, load_slot_usage
    from memslot.model.generate import generate

    corpus = load_corpus(tiny_model_dir)
    usage, tokens = load_slot_usage(tiny_model_dir)
    prompts = [prompts_for(f)[0] for f in corpus.facts[:12]]
    fact = corpus.facts[0]
    other = next(
        f.answer for f in corpus.facts if f.relation == fact.relation and f.answer != fact.answer
    )
    answers = {}
    for device in ("cpu", "cuda"):
        model, tok = load_model(tiny_model_dir, device=device)
        texts = [generate(model, tok, p).text for p in prompts]
        ids = torch.tensor([[tok.bos_id] + tok.encode(prompts[0])], device=device)
        out = model(ids)
        result = Editor(model, tok, usage, usage_tokens=tokens).edit_facts([(prompts[0], other)])
        answers[device] = (texts, out, result)
    cpu, gpu = answers["cpu"], answers["cuda"]
    assert cpu[0] == gpu[0]  # the same greedy answers
    torch.testing.assert_close(gpu[1].logits.cpu(), cpu[1].logits, atol=1e-3, rtol=1e-3)
    for a, b in zip(cpu[1].lookups, gpu[1].lookups, strict=True):
        assert torch.equal(a.slots, b.slots.cpu())
    # the editor picks the same slots and succeeds alike
    assert cpu[2].success == gpu[2].success
    assert cpu[2].slots.tolist() == gpu[2].slots.cpu().tolist()


# the walk's tiles: (block_d, num_warps, programs (None: from the registers), stages); under
# the interpreter a few programs, so that stretches of runs end between programs and runs end
# inside a block of D
WALK_TILES = (
    [(16, 1, 3, 1), (32, 2, 1, 1), (64, 1, 7, 1)]
    if not CUDA
    else [(512, 1, None, 1), (256, 1, None, 1), (512, 1, None, 3), (1024, 4, 5, 1)]
)


def walk_backward(grad_out, values, indices, weights, tiles, dtype=torch.float32, dense=False):
    block_d, warps, programs, stages = tiles
    return triton_bag.embedding_bag_backward_walk(
        grad_out, values, indices, weights, dtype, dense, block_d, warps, stages=stages,
        programs=programs,
    )  # fmt: skip


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("tiles", WALK_TILES)
@pytest.mark.parametrize("n,bag,n_slots,dim", BAG_CASES)
def test_backward_walk_gives_both_gradients_of_the_reference(n, bag, n_slots, dim, tiles, dense):
    # value dims 1, 65, 4,096 and 33 with k = 1; slot 7 three times in the first bag
    values, indices, weights, grad_out = bag_inputs(n, bag, n_slots, dim, torch.bfloat16, dim + 3)
    grad_out = grad_out.to(torch.bfloat16)
    grad_w, slots, rows = walk_backward(grad_out, values, indices, weights, tiles, dense=dense)
    want_w, want_slots, want_rows = reference.embedding_bag_backward(
        grad_out.double(), values.double(), indices, weights.double()
    )
    assert torch.equal(slots, want_slots) and grad_w.shape == (n, bag)
    if dense:
        assert rows.shape == values.shape
        unread = torch.ones(n_slots, dtype=torch.bool, device=DEVICE)
        unread[want_slots] = False
        assert not rows[unread].any()
        rows = rows[want_slots]
    assert rows.shape == want_rows.shape and rows.dtype == torch.float32
    assert rel_err(grad_w, want_w) < TOLERANCE[torch.float32]
    assert rel_err(rows, want_rows) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("tiles", WALK_TILES)
def test_backward_walk_sums_long_runs_in_a_fixed_order(tiles):
    # 5 slots read ~100 times each (runs longer than a program's stretch, next to a slot read
    # once at the end); bit for bit the same on a rerun
    values, indices, weights, grad_out = bag_inputs(30 * BIG, 16, 6, 33, torch.float32, seed=7)
    indices[indices == 5] = 4
    indices[-1, -1] = 5
    grad_out = grad_out.to(torch.bfloat16)
    want_w, want_slots, want_rows = reference.embedding_bag_backward(
        grad_out.double(), values.double(), indices, weights.double()
    )
    runs = [walk_backward(grad_out, values, indices, weights, tiles) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    grad_w, slots, rows = runs[0]
    assert torch.equal(slots, want_slots)
    assert rel_err(grad_w, want_w) < TOLERANCE[torch.float32]
    assert rel_err(rows, want_rows) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_walk_rows_in_the_table_dtype_are_within_tolerance(dtype):
    # one bag of a single slot (a run of 8), the other runs short
    n, bag = 12 * BIG, 8
    values, indices, weights, grad_out = bag_inputs(n, bag, 20, 65, dtype, seed=9)
    indices[0] = 3
    grad_out = grad_out.to(torch.bfloat16)
    _, want_slots, want_rows = reference.embedding_bag_backward(
        grad_out.double(), values.double(), indices, weights.double()
    )
    for tiles in WALK_TILES:
        _, slots, rows = walk_backward(grad_out, values, indices, weights, tiles, dtype)
        assert torch.equal(slots, want_slots) and rows.dtype == dtype
        assert rel_err(rows, want_rows) < TOLERANCE[dtype]


def test_backward_walk_on_an_empty_batch():
    values, indices, weights, grad_out = bag_inputs(0, 3, 8, 4, torch.bfloat16, seed=0)
    grad16 = grad_out.to(torch.bfloat16)
    grad_w, slots, rows = walk_backward(grad16, values, indices, weights, WALK_TILES[0])
    assert grad_w.shape == (0, 3) and slots.numel() == 0 and rows.shape == (0, 4)
    _, _, dense = walk_backward(grad16, values, indices, weights, WALK_TILES[0], dense=True)
    assert torch.equal(dense, torch.zeros(8, 4, device=DEVICE))


@pytest.mark.parametrize("sparse", [False, True])
def test_autograd_takes_the_walk_or_per_slot_backward_alike(sparse, monkeypatch):
    # the layer's call (bf16 output, so a bf16 grad_out): both fused backwards against the
    # reference, and each bit for bit the same on a rerun
    values, indices, weights, grad_out = bag_inputs(10 * BIG, 6, 50, 24, torch.bfloat16, 15)
    keys = ("block_d", "num_warps", "programs", "stages")
    tiles = dict(zip(keys, WALK_TILES[0], strict=True))
    results = {}
    for name, setting in (("reference", None), ("per slot", None), ("walk", tiles)):
        monkeypatch.setattr(triton_bag, "WALK_BACKWARD", setting)
        fn = reference.embedding_bag if name == "reference" else triton_bag.embedding_bag
        grads = []
        for _ in range(2):
            v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
            fn(v, indices, w, sparse, torch.bfloat16).backward(grad_out.to(torch.bfloat16))
            grads.append((v.grad.to_dense(), w.grad))
        assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))
        results[name] = grads[0]
    for name in ("per slot", "walk"):
        assert rel_err(results[name][0], results["reference"][0]) < TOLERANCE[torch.bfloat16]
        assert rel_err(results[name][1], results["reference"][1]) < TOLERANCE[torch.float32]
