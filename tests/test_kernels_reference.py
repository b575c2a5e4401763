"""The pure-PyTorch kernels: exactness of product keys, embedding-bag forward and backward."""

import pytest
import torch

from memslot import kernels
from memslot.kernels import reference


def random_keys(n, heads, n_keys, half, seed):
    g = torch.Generator().manual_seed(seed)
    q1 = torch.randn(n, heads, half, generator=g)
    q2 = torch.randn(n, heads, half, generator=g)
    k1 = torch.randn(heads, n_keys, half, generator=g)
    k2 = torch.randn(heads, n_keys, half, generator=g)
    return q1, q2, k1, k2


@pytest.mark.parametrize(
    "n,heads,n_keys,half,topk,seed",
    [(50, 4, 16, 8, 4, 0), (20, 2, 32, 16, 8, 1), (7, 1, 5, 3, 1, 2), (30, 3, 9, 4, 9, 3)],
)
def test_product_key_topk_equals_brute_force_over_all_slots(n, heads, n_keys, half, topk, seed):
    q1, q2, k1, k2 = random_keys(n, heads, n_keys, half, seed)
    scores, slots = reference.product_key_topk(q1, q2, k1, k2, topk)
    want_scores, want_slots = reference.brute_force_topk(q1, q2, k1, k2, topk)
    assert slots.shape == (n, heads, topk) and slots.dtype == torch.int64
    torch.testing.assert_close(scores, want_scores)
    # same set of slots (order among exactly equal scores is not specified)
    assert torch.equal(slots.sort(-1).values, want_slots.sort(-1).values)
    assert int(slots.max()) < n_keys * n_keys


def test_product_key_scores_are_the_sum_of_half_scores():
    q1, q2, k1, k2 = random_keys(10, 2, 8, 4, 5)
    scores, slots = reference.product_key_topk(q1, q2, k1, k2, 3)
    i1, i2 = slots // 8, slots % 8
    for n in range(10):
        for h in range(2):
            for j in range(3):
                s = q1[n, h] @ k1[h, i1[n, h, j]] + q2[n, h] @ k2[h, i2[n, h, j]]
                assert torch.allclose(scores[n, h, j], s, atol=1e-5)


def test_query_topk_ranks_the_normalised_halves_of_the_query():
    # qk-norm on the query side: each half over its rms, times its row of the norm weight
    q1, q2, k1, k2 = random_keys(12, 3, 10, 6, 4)
    weight = torch.rand(2, 6) + 0.5
    q1, q2 = q1 * 3.0, q2 * 0.1
    scores, slots = reference.query_topk(torch.cat([q1, q2], -1), k1, k2, 4, weight)
    rms1, rms2 = ((q.pow(2).mean(-1, keepdim=True) + reference.RMS_EPS).sqrt() for q in (q1, q2))
    want_scores, want_slots = reference.brute_force_topk(
        q1 / rms1 * weight[0], q2 / rms2 * weight[1], k1, k2, 4
    )
    torch.testing.assert_close(scores, want_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(slots.sort(-1).values, want_slots.sort(-1).values)
    # without a weight, the halves are ranked as they come
    plain = reference.query_topk(torch.cat([q1, q2], -1), k1, k2, 4)
    assert torch.equal(plain[1], reference.product_key_topk(q1, q2, k1, k2, 4)[1])


def naive_bag(values, indices, weights):
    return (values[indices].float() * weights.float().unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("dim", [1, 5, 65])
def test_embedding_bag_forward_and_backward_match_autograd_of_gather_and_sum(dim):
    g = torch.Generator().manual_seed(dim)
    values = torch.randn(40, dim, generator=g, dtype=torch.float64)
    indices = torch.randint(0, 40, (12, 6), generator=g)
    indices[0, :3] = 7  # repeated slots inside one bag must accumulate
    weights = torch.rand(12, 6, generator=g, dtype=torch.float64)
    grad_out = torch.randn(12, dim, generator=g, dtype=torch.float64)

    v1, w1 = values.clone().requires_grad_(), weights.clone().requires_grad_()
    naive = (v1[indices] * w1.unsqueeze(-1)).sum(1)
    naive.backward(grad_out)

    out = reference.embedding_bag_forward(values.float(), indices, weights.float())
    torch.testing.assert_close(out, naive.detach().float(), atol=1e-5, rtol=1e-5)

    grad_w, slots, grad_rows = reference.embedding_bag_backward(grad_out, values, indices, weights)
    torch.testing.assert_close(grad_w.double(), w1.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(slots, torch.unique(indices))
    torch.testing.assert_close(grad_rows.double(), v1.grad[slots], atol=1e-5, rtol=1e-5)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots] = False
    assert torch.all(v1.grad[untouched] == 0)


@pytest.mark.parametrize("sparse", [False, True])
def test_autograd_function_gives_the_same_gradients_as_the_native_path(sparse):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(64, 16, generator=g)
    indices = torch.randint(0, 64, (10, 8), generator=g)
    weights = torch.rand(10, 8, generator=g)
    grad_out = torch.randn(10, 16, generator=g)
    grads = []
    for fn in (reference.embedding_bag, reference.embedding_bag_native):
        v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
        fn(v, indices, w, sparse).backward(grad_out)
        assert v.grad.is_sparse == sparse
        grads.append((v.grad.to_dense(), w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-5)


def test_bf16_table_accumulates_in_fp32():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(32, 24, generator=g).to(torch.bfloat16)
    indices = torch.randint(0, 32, (9, 5), generator=g)
    weights = torch.rand(9, 5, generator=g)
    out = kernels.embedding_bag(values, indices, weights)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_bag(values, indices, weights), atol=1e-5, rtol=1e-5)


def test_empty_batch():
    values = torch.randn(8, 4)
    out = reference.embedding_bag_forward(
        values.double(), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
    )
    assert out.shape == (0, 4)


def test_dispatch_routes_a_registered_backend_and_falls_back_to_the_reference():
    calls = []

    def fake_topk(q1, q2, k1, k2, topk):
        calls.append(topk)
        return reference.product_key_topk(q1, q2, k1, k2, topk)

    q1, q2, k1, k2 = random_keys(3, 1, 4, 2, 0)
    kernels.register_backend("meta", product_key_topk=fake_topk)
    try:
        kernels.product_key_topk(q1, q2, k1, k2, 2)  # CPU tensors: reference, not the backend
        assert calls == []
        assert kernels._pick("product_key_topk", q1.to("meta")) is fake_topk
    finally:
        kernels._BACKENDS.pop("meta")
    assert kernels._pick("product_key_topk", q1) is reference.product_key_topk
