"""Registers the Triton kernels as the backend for CUDA tensors, when they can run.

Imported by ``memslot.kernels`` at import time. Nothing here imports Triton unless CUDA is
available, so CPU-only installs (and CI) never need it. ``MEMSLOT_KERNELS=reference`` in the
environment keeps CUDA tensors on the pure-PyTorch reference.
"""

from __future__ import annotations

import os

import torch


def triton_available() -> bool:
    """Whether Triton imports (the optional ``gpu`` extra)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install: either way, no Triton
        return False
    return True


def register() -> bool:
    """Route CUDA tensors to the Triton kernels; False (and nothing registered) if unavailable."""
    if os.environ.get("MEMSLOT_KERNELS", "").lower() == "reference":
        return False
    if not torch.cuda.is_available() or not triton_available():
        return False
    from memslot.kernels import register_backend, triton_bag, triton_topk

    register_backend(
        "cuda",
        query_topk=triton_topk.query_topk,
        product_key_topk=triton_topk.product_key_topk,
        embedding_bag=triton_bag.embedding_bag,
    )
    return True


def unregister() -> None:
    """Send CUDA tensors back to the reference (benchmarks compare the two paths)."""
    from memslot.kernels import _BACKENDS

    _BACKENDS.pop("cuda", None)
