"""The memory layer's lookup and read in one call, the top-k of one chunk of tokens able to
overlap the bag of the chunk before (``bench/kernels.py --overlap`` measures it; the layer does
not use it).

The fused top-k is latency-bound (two programs a multiprocessor, the keys from L2) and the bag
forward is bound by device memory, so the two could share the chip: the current stream runs the
qk-norm, top-k and softmax of chunk after chunk, and a side stream, waiting on each chunk's
event, runs the gated bag of that chunk, by a grid of ``bag_programs`` programs when given so
that it leaves room to the next chunk's top-k. On an H200 at the layer's shapes the two kernels
did not run side by side (a whole top-k and a whole bag on two streams took about the sum of
their times, whatever the bag's grid), and chunking cost more than the overlap gave back.
"""

from __future__ import annotations

import torch

from memslot.kernels import triton_bag, triton_topk

_SIDE_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}


def side_stream(device: torch.device, priority: int = 0) -> torch.cuda.Stream:
    """One side stream per device and priority (0 normal, -1 high), made once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, priority)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=index, priority=priority)
    return _SIDE_STREAMS[key]


def chunk_bounds(N: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` row ranges of about equal size covering [0, N), none empty."""
    chunks = max(1, min(chunks, N))
    cuts = [N * i // chunks for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def lookup_bag_forward(
    q: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    topk: int,
    norm_weight: torch.Tensor | None,
    values: torch.Tensor,
    gate: torch.Tensor,
    out_dtype: torch.dtype,
    chunks: int = 4,
    bag_programs: int | None = None,
    overlap: bool = True,
    priority: int = 0,
    carveout: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(memory (N, Dv) = silu(gate) * the bag in ``out_dtype``, scores (N, H, k) fp32, slots
    (N, H, k) int64, weights (N, H, k) fp32 = softmax of the scores) for queries q (N, H, k_dim)
    against sub-keys keys1, keys2 (H, n_keys, k_dim/2), the halves of q rms-normalised by
    ``norm_weight`` first when given: the same values, bit for bit, as ``query_topk``, the
    softmax and the gated bag forward on the whole batch. Inference only (no autograd).

    With ``overlap`` each chunk's bag runs on a side stream of ``priority`` behind its top-k
    (event per chunk, the current stream waits for the side stream at the end); otherwise all
    runs in order on the current stream. ``bag_programs`` bounds the bag's grid and
    ``carveout`` sets its kernel's shared-memory carveout (see
    ``triton_bag.embedding_bag_forward_grid``).
    """
    N, H, _ = q.shape
    device = q.device
    keys1, keys2 = (k.to(q.dtype).contiguous() for k in (keys1, keys2))
    gate = gate.contiguous()
    memory = torch.empty(N, values.shape[1], dtype=out_dtype, device=device)
    scores = torch.empty(N, H, topk, dtype=torch.float32, device=device)
    slots = torch.empty(N, H, topk, dtype=torch.int64, device=device)
    weights = torch.empty(N, H, topk, dtype=torch.float32, device=device)
    main = torch.cuda.current_stream(device)
    side = side_stream(device, priority) if overlap else main
    if overlap:
        side.wait_stream(main)  # the inputs and the outputs' allocation
    for a, b in chunk_bounds(N, chunks):
        nq = triton_topk.normalise_query(q[a:b], norm_weight)  # (2, H, n, half)
        q1, q2 = nq[0].transpose(0, 1), nq[1].transpose(0, 1)
        triton_topk.product_key_topk_forward(
            q1, q2, keys1, keys2, topk, out=(scores[a:b], slots[a:b])
        )
        weights[a:b] = torch.softmax(scores[a:b], dim=-1)
        if overlap:
            ready = torch.cuda.Event()
            ready.record(main)
            side.wait_event(ready)
        with torch.cuda.stream(side):
            triton_bag.embedding_bag_forward_grid(
                values, slots[a:b].view(b - a, -1), weights[a:b].view(b - a, -1),
                memory[a:b], gate[a:b], programs=bag_programs, carveout=carveout,
            )  # fmt: skip
    if overlap:
        main.wait_stream(side)  # what the side stream read stays alive until here
    return memory, scores, slots, weights
