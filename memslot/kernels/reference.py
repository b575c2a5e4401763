"""Pure-PyTorch memory-layer kernels: the CPU path and the oracle for the Triton kernels.

Two operations make up the hot path of a product-key memory:

* ``product_key_topk``: score each half of a query against its n_keys sub-keys, keep the top-k
  of each half, then rank the k x k sums again and keep the top-k. Because a sum can only be in
  the global top-k if each of its halves is in its half's top-k, this equals brute-force top-k
  over all n_keys**2 slots at a cost of O(n_keys) instead of O(n_keys**2).
* ``embedding_bag``: a weighted sum of value rows per token, with a backward that produces
  gradients for the weights and for only the value rows that were read (sparse or dense).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def product_key_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k slots of a product-key memory.

    q1, q2: (N, H, half) query halves; keys1, keys2: (H, n_keys, half) sub-keys.
    Returns scores (N, H, topk) in descending order and slot indices (N, H, topk), int64,
    where slot = i1 * n_keys + i2.
    """
    n_keys = keys1.shape[1]
    s1 = torch.einsum("nhd,hkd->nhk", q1, keys1)  # (N, H, n_keys)
    s2 = torch.einsum("nhd,hkd->nhk", q2, keys2)  # (N, H, n_keys)
    t1, i1 = s1.topk(topk, dim=-1)  # (N, H, k)
    t2, i2 = s2.topk(topk, dim=-1)  # (N, H, k)
    cand = (t1.unsqueeze(-1) + t2.unsqueeze(-2)).flatten(-2)  # (N, H, k*k)
    scores, flat = cand.topk(topk, dim=-1)  # (N, H, k)
    slots = i1.gather(-1, flat // topk) * n_keys + i2.gather(-1, flat % topk)
    return scores, slots


RMS_EPS = 1e-6  # the epsilon of qk-norm, here and in the fused kernel


def rms_normalise(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """x / rms(x) over the last dim."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def query_topk(
    q: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    topk: int,
    norm_weight: torch.Tensor | None = None,
    softmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k slots of whole queries: ``product_key_topk`` of the two halves of q.

    q: (N, H, k_dim); keys1, keys2: (H, n_keys, k_dim/2). With ``norm_weight`` (2, k_dim/2), each
    half is rms-normalised and scaled by its row of it first (the query side of qk-norm). With
    ``softmax`` the first result is each row's softmax over its top-k scores, in fp32 (the
    memory layer's weights), instead of the scores.
    """
    q1, q2 = q.chunk(2, dim=-1)  # (N, H, k_dim/2) each
    if norm_weight is not None:
        q1 = rms_normalise(q1) * norm_weight[0]
        q2 = rms_normalise(q2) * norm_weight[1]
    scores, slots = product_key_topk(q1, q2, keys1, keys2, topk)
    if softmax:
        return F.softmax(scores.float(), dim=-1), slots
    return scores, slots


def brute_force_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over every one of the n_keys**2 slot scores (the definition product keys must meet)."""
    s1 = torch.einsum("nhd,hkd->nhk", q1, keys1)
    s2 = torch.einsum("nhd,hkd->nhk", q2, keys2)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (N, H, n_keys**2)
    return full.topk(topk, dim=-1)


def embedding_bag_forward(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """out[n] = sum_b weights[n, b] * values[indices[n, b]], accumulated in fp32.

    values: (S, D); indices: (N, B) int64; weights: (N, B). Returns (N, D) in fp32, rounded
    once to ``out_dtype`` when another is asked for.
    """
    if values.dtype == torch.float32:
        out = F.embedding_bag(
            indices, values, mode="sum", per_sample_weights=weights.to(torch.float32)
        )
    else:
        rows = values[indices].to(torch.float32)  # (N, B, D)
        out = torch.einsum("nbd,nb->nd", rows, weights.to(torch.float32))
    return out.to(out_dtype)


def embedding_bag_grad_weights(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """grad_weights[n, b] = <values[indices[n, b]], grad_out[n]>, (N, B) fp32."""
    rows = values[indices].to(torch.float32)  # (N, B, D)
    return torch.einsum("nbd,nd->nb", rows, grad_out.to(torch.float32))


def embedding_bag_grad_rows(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    dense: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value-table gradient: (slots (U,) sorted unique int64, rows (U, D)) or, with ``dense``,
    (slots, the whole (S, D) gradient with zeros on unread rows). Rows are summed in fp32 in
    the sorted slot order of ``index_add_`` and rounded once to ``dtype``."""
    g = grad_out.to(torch.float32)  # (N, D)
    contrib = weights.to(torch.float32).unsqueeze(-1) * g.unsqueeze(1)  # (N, B, D)
    slots, inverse = torch.unique(indices.reshape(-1), sorted=True, return_inverse=True)
    rows = torch.zeros(slots.numel(), values.shape[1], dtype=torch.float32, device=g.device)
    rows.index_add_(0, inverse, contrib.reshape(-1, values.shape[1]))
    if not dense:
        return slots, rows.to(dtype)
    table = torch.zeros(values.shape, dtype=dtype, device=values.device)
    return slots, table.index_copy_(0, slots, rows.to(dtype))


def embedding_bag_backward(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``embedding_bag_forward``.

    Returns (grad_weights (N, B) fp32, slots (U,) sorted unique int64, grad_rows (U, D) fp32):
    the value-table gradient is non-zero only on the rows that were read, so it is returned as
    those rows. Summation order is fixed by ``index_add_`` over the sorted slot order, so the
    result does not depend on thread scheduling.
    """
    grad_weights = embedding_bag_grad_weights(grad_out, values, indices)
    slots, grad_rows = embedding_bag_grad_rows(grad_out, values, indices, weights)
    return grad_weights, slots, grad_rows


class BagKernels(NamedTuple):
    """The kernels behind a differentiable embedding bag (this module's, or Triton's)."""

    forward: Callable[..., torch.Tensor]  # (values, indices, weights, out_dtype) -> (N, D)
    grad_weights: Callable[..., torch.Tensor]  # (grad_out, values, indices) -> (N, B) fp32
    grad_rows: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # see embedding_bag_grad_rows
    # both gradients at once, (grad_out, values, indices, weights, dtype, dense) ->
    # (grad_w, slots, rows), or None if the backend has only the two kernels above
    grad_both: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


REFERENCE_BAG = BagKernels(
    embedding_bag_forward, embedding_bag_grad_weights, embedding_bag_grad_rows
)


def bag_grads(
    kernels: BagKernels,
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    need: tuple[bool, bool],
    sparse_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(value-table gradient (sparse or dense) or None, weight gradient or None) of a bag whose
    output's gradient is grad_out; ``need`` says which of the two are wanted."""
    need_rows, need_w = need
    dense = not sparse_grad
    slots = rows = grad_w = None
    if need_rows and need_w and kernels.grad_both is not None:
        grad_w, slots, rows = kernels.grad_both(
            grad_out, values, indices, weights, values.dtype, dense
        )
    else:
        if need_rows:
            slots, rows = kernels.grad_rows(
                grad_out, values, indices, weights, values.dtype, dense=dense
            )
        if need_w:
            grad_w = kernels.grad_weights(grad_out, values, indices)
    grad_values = rows
    if rows is not None and sparse_grad:
        grad_values = torch.sparse_coo_tensor(
            slots.unsqueeze(0), rows, values.shape, is_coalesced=True, check_invariants=False
        )
    if grad_w is not None:
        grad_w = grad_w.to(weights.dtype)
    return grad_values, grad_w


class EmbeddingBag(torch.autograd.Function):
    """Weighted embedding bag with an explicit backward (sparse or dense value gradient), on
    whichever ``BagKernels`` it is given; the output in ``out_dtype``."""

    @staticmethod
    def forward(ctx, values, indices, weights, sparse_grad: bool, kernels: BagKernels,
                out_dtype: torch.dtype):  # fmt: skip  # noqa: D102
        ctx.save_for_backward(values, indices, weights)
        ctx.sparse_grad, ctx.kernels = sparse_grad, kernels
        return kernels.forward(values, indices, weights, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        values, indices, weights = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        grad_values, grad_w = bag_grads(
            ctx.kernels, grad_out, values, indices, weights, need, ctx.sparse_grad
        )
        return grad_values, None, grad_w, None, None, None


def silu_gated(gate: torch.Tensor, bag: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * bag in fp32, rounded once to ``out_dtype`` (differentiable)."""
    return (F.silu(gate.float()) * bag.float()).to(out_dtype)


def embedding_bag(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
    out_dtype: torch.dtype = torch.float32,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable weighted embedding bag; see ``embedding_bag_forward``. With ``gate``
    (N, D), silu(gate) * the bag instead (the memory layer's gated read)."""
    if gate is not None:
        bag = EmbeddingBag.apply(
            values, indices, weights, sparse_grad, REFERENCE_BAG, torch.float32
        )
        return silu_gated(gate, bag, out_dtype)
    return EmbeddingBag.apply(values, indices, weights, sparse_grad, REFERENCE_BAG, out_dtype)


def embedding_bag_native(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
    out_dtype: torch.dtype = torch.float32,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same operation through PyTorch's built-in ``F.embedding_bag`` autograd.

    Faster on the CPU for fp32 tables (its backward never materialises the (N, B, D) rows); the
    explicit ``embedding_bag`` above is its oracle in the tests.
    """
    bag = F.embedding_bag(
        indices, values, mode="sum", per_sample_weights=weights.to(values.dtype), sparse=sparse_grad
    )
    if gate is not None:
        return silu_gated(gate, bag, out_dtype)
    return bag.to(out_dtype)
