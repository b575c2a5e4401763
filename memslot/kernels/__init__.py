"""The one dispatch point for memory-layer kernels.

The model calls ``query_topk`` (``product_key_topk`` of a query's two halves, qk-norm included)
and ``embedding_bag`` from here. Tensors on CUDA go to the Triton kernels when a backend has
been registered for them; everything else runs the pure-PyTorch reference in ``reference.py``,
which is also the oracle the fast kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memslot.kernels import reference

# device type -> {"query_topk": fn, "product_key_topk": fn, "embedding_bag": fn}; filled by
# optional backends.
_BACKENDS: dict[str, dict[str, Callable]] = {}


def register_backend(device_type: str, **kernels: Callable) -> None:
    """Route the named kernels for tensors of ``device_type`` (e.g. "cuda") to ``kernels``."""
    _BACKENDS.setdefault(device_type, {}).update(kernels)


def _pick(name: str, tensor: torch.Tensor) -> Callable:
    return _BACKENDS.get(tensor.device.type, {}).get(name) or getattr(reference, name)


def _cpu_fp32(values: torch.Tensor) -> bool:
    return values.device.type == "cpu" and values.dtype == torch.float32


def product_key_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, slots), each (N, H, topk); see ``reference.product_key_topk``."""
    return _pick("product_key_topk", q1)(q1, q2, keys1, keys2, topk)


def query_topk(
    q: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    topk: int,
    norm_weight: torch.Tensor | None = None,
    softmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, slots), each (N, H, topk), of whole queries q (N, H, k_dim), their halves
    rms-normalised by ``norm_weight`` (2, k_dim/2) when given; with ``softmax`` (weights,
    slots), the weights each row's softmax over its scores in fp32. See
    ``reference.query_topk``."""
    return _pick("query_topk", q)(q, keys1, keys2, topk, norm_weight, softmax)


def embedding_bag(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
    out_dtype: torch.dtype = torch.float32,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of value rows, (N, D), accumulated in fp32 and rounded once to
    ``out_dtype``; with ``gate`` (N, D), silu(gate) times that sum, gated in fp32 before the
    rounding. See ``reference.embedding_bag``."""
    if _cpu_fp32(values) and "embedding_bag" not in _BACKENDS.get("cpu", {}):
        return reference.embedding_bag_native(
            values, indices, weights, sparse_grad, out_dtype, gate
        )
    return _pick("embedding_bag", values)(values, indices, weights, sparse_grad, out_dtype, gate)


def _register_optional_backends() -> None:
    # Triton on CUDA when both are present; a failure here must never break CPU users.
    try:
        from memslot.kernels import cuda
    except ImportError:  # pragma: no cover - the module itself has no optional imports
        return
    cuda.register()


_register_optional_backends()
