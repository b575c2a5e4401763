"""Benchmark of the memory-layer kernels: Triton on CUDA against the PyTorch reference.

On a CUDA GPU (the issue's shapes: 16,384 tokens, model dim 1,024, 4 heads, top-32, k_dim 512,
bf16) it checks each Triton kernel against the reference, then times: the device copy rate; the
fused product-key top-k; the embedding-bag forward and backward (time, effective TB/s on the
bytes each must move, ratio to the copy rate); a whole Memory+ layer forward and forward+backward
through the Triton kernels and through the reference, against a dense SwiGLU FFN (hidden 4x) of
the same model dim, at 1M and 16M slots; then the layer forwards and the FFN's again in turns
(``--turns`` rounds), the acceptance's ratios taken within each round. Prints a markdown table
last.

On a CPU it runs a small-shape comparison of the reference against PyTorch's native ops, so
``make bench`` works without a GPU.

    python bench/kernels.py            # full sizes on CUDA; small sizes on a CPU
    python bench/kernels.py --tokens 4096
    python bench/kernels.py --topk-sweep --profile --no-bag   # top-k tiles, per-kernel times
    python bench/kernels.py --bag-backward   # the bag backward's kernels and tiles only
    python bench/kernels.py --gather-rates   # the bag forward from L2-sized to 2 GiB tables
    python bench/kernels.py --no-bag --ws-tiles '{"sample": 2}'   # the layer with other tiles
    python bench/kernels.py --no-bag --n-keys 1024 --no-bag-order   # bags read as given
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from machine import cpu_model

from memslot.kernels import cuda as kernels_cuda
from memslot.kernels import reference
from memslot.model.config import MemoryConfig
from memslot.model.memory import ProductKeyMemory

ROWS: list[tuple[str, str, str, str]] = []  # (measurement, time, rate, note)


def row(what: str, ms: float, rate: str = "", note: str = "") -> None:
    ROWS.append((what, f"{ms:.3f} ms", rate, note))
    print(f"{what}: {ms:.3f} ms {rate} {note}", flush=True)


def check(ok: bool, what: str) -> None:
    """A failed check is printed, not raised: the timings after it still come back."""
    print(("  ok: " if ok else "  CHECK FAILED: ") + what, flush=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class SwiGLU(nn.Module):
    """The dense FFN a memory layer replaces: W2(silu(W1 x) * W3 x), hidden 4x."""

    def __init__(self, d: int):
        super().__init__()
        self.w1 = nn.Linear(d, 4 * d, bias=False)
        self.w3 = nn.Linear(d, 4 * d, bias=False)
        self.w2 = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def forward_backward(module, xg, *tensors, **kwargs):
    """A step for the timer: one forward+backward of ``module`` from ``xg`` (and ``tensors``,
    such as the layer's table), their and the module's gradients cleared first. The loss is the
    same after the FFN and the layer: the output (the first, for the layer) squared, summed."""

    def step():
        for t in (xg, *tensors, *module.parameters()):
            t.grad = None
        y = module(xg, *tensors, **kwargs)
        (y[0] if isinstance(y, tuple) else y).float().square().sum().backward()

    return step


# ---- CUDA --------------------------------------------------------------------------------------


def bench_ms(fn, rep_ms: int = 200) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def in_turns(timers: dict, rounds: int) -> dict[object, list[float]]:
    """Each of ``timers`` (name -> a function that times something, in ms) called once a round,
    in their order, for ``rounds`` rounds: what drifts over a run (clocks, temperature, a
    neighbour's load) reaches every measurement of a round alike, so a ratio taken within a
    round is steadier than one between measurements taken minutes apart."""
    times: dict[object, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    return times


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def turns_rows(
    times: dict[object, list[float]], base: object, what: dict, target: str = ""
) -> None:
    """A row for each of ``what`` (name -> label): its median over the rounds, and its ratio to
    ``base``'s median, with the range of the ratios round by round."""
    b = median(times[base])
    for name, label in what.items():
        t = times[name]
        by_round = [x / y for x, y in zip(t, times[base], strict=True)]
        row(label, median(t), f"{median(t) / b:.3f}x",
            f"{len(t)} rounds in turns: {min(by_round):.3f}-{max(by_round):.3f}x round by round; "
            f"{target}")  # fmt: skip


# (block_n, block_c, num_warps, num_stages, bisection steps for the bound (0: a sort))
TOPK_KEYS = ("block_n", "block_c", "num_warps", "num_stages", "bisect")
TOPK_VARIANTS = (  # the Triton half kernel's tiles (ws=False: not the Gluon kernel)
    [
        dict(zip(TOPK_KEYS, v, strict=True), ws=False)
        for v in [
            (64, 64, 4, 2, 12),
            (64, 64, 4, 3, 12),
            (64, 64, 4, 1, 12),
            (64, 64, 8, 2, 12),
            (128, 64, 8, 3, 12),
            (64, 128, 8, 2, 12),
            (64, 128, 4, 1, 12),
            (32, 128, 4, 2, 12),
            (64, 64, 4, 2, 0),
        ]
    ]
    + [  # candidate places: 0 a scan and plain stores, 1 a triangle product, 2 that + in-place stores
        dict(block_n=64, block_c=64, num_warps=4, num_stages=2, bisect=12, scan=scan, ws=False)
        for scan in (0, 1, 2)
    ]
    + [  # candidate places per row in scratch (64: a block with a row over 64 rescans the keys)
        dict(block_n=64, block_c=64, num_warps=4, num_stages=2, bisect=12, wide=wide, ws=False)
        for wide in (64, 128, 256)
    ]
    + [  # the stages of the half kernel: pass one only, passes one and two, the half kernel whole
        dict(block_n=64, block_c=64, num_warps=4, num_stages=2, bisect=12, stop=stop, ws=False)
        for stop in (1, 2, 3)
    ]
)


def topk_variants(n_keys: int) -> list[dict]:
    """Where each half's candidates are ranked: at the end of the half kernel (``later``
    False, two programs a multiprocessor) or by the combine kernel at a few of its tiles, and
    the stages of the best (``stop``), for ``--topk-sweep``."""
    base = dict(block_n=64, block_c=64, num_warps=4, num_stages=2, bisect=12, scan=3, split=True,
                ws=False)  # fmt: skip
    return [dict(base, later=False, combine_rows=16, combine_warps=4)] + [
        dict(base, later=True, combine_rows=rows, combine_warps=warps)
        for rows, warps in ((8, 4), (4, 4), (8, 8), (8, 2), (16, 4))
    ]


FUSED_VARIANTS = [  # keep_grad: L2 eviction hints that keep grad_out there (False: none);
    # presorted: the pairs' indices, weights and tokens gathered into sorted order first
    dict(block_p=p, block_d=d, num_warps=w, keep_grad=k, presorted=s)
    for p, d, w, k, s in [
        (1, 1024, 2, False, False),
        (1, 512, 1, True, False),
        (2, 512, 1, True, False),
        (1, 512, 1, True, True),
        (2, 512, 1, True, True),
        (4, 512, 1, True, True),
        (2, 1024, 2, True, True),
        (2, 512, 2, True, True),
    ]
]
ROWS_VARIANTS = [
    dict(block_p=p, block_d=d, num_warps=w)
    for p, d, w in [(1, 1024, 4), (1, 512, 4), (2, 1024, 4), (1, 1024, 2), (1, 1024, 1)]
]


def tile_sweep(what: str, fn, variants: list[dict]) -> dict:
    """Time fn(**variant) for each variant; a variant that does not compile is reported."""
    times = {}
    for v in variants:
        label = " ".join(f"{k}={x}" for k, x in v.items())
        try:
            times[label] = bench_ms(lambda v=v: fn(**v), 100)
        except Exception as e:  # a shape that does not compile must not stop the run
            print(f"    {what} {label} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        print(f"    {what} {label}: {times[label]:.3f} ms", flush=True)
    if times:
        print(f"    best {what}: {min(times, key=times.get)}", flush=True)
    return times


def copy_rate(device) -> tuple[float, float]:
    src = torch.randn(2**30 // 2, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms / 1e9, ms  # bytes read + written, TB/s


def registers() -> str:
    """Registers per thread and spills of the last half top-k kernel launched."""
    from memslot.kernels import triton_topk

    kernel = triton_topk.LAUNCHED.get("half")
    return f"{getattr(kernel, 'n_regs', '?')} registers, {getattr(kernel, 'n_spills', '?')} spills"


def bench_topk(n_keys, N, H, K, half, dev, dt, sweep, topk_sweep=False) -> None:
    from memslot.kernels import triton_topk

    g = torch.Generator(device=dev).manual_seed(n_keys)
    # the halves as the layer's query_topk lays them out: views of one (2, H, N, half) tensor
    normed = torch.randn(2, H, N, half, device=dev, generator=g).to(dt)
    q1, q2 = normed[0].transpose(0, 1), normed[1].transpose(0, 1)
    k1, k2 = (torch.randn(H, n_keys, half, device=dev, generator=g).to(dt) for _ in range(2))
    # check: the bf16 kernel's picks against an fp32 reference on the same bf16 inputs
    s, sl = triton_topk.product_key_topk(q1, q2, k1, k2, K)
    ws, wsl = reference.product_key_topk(*(t.float() for t in (q1, q2, k1, k2)), K)
    same = (sl.sort(-1).values == wsl.sort(-1).values).float().mean().item()
    print(f"  topk n_keys={n_keys}: score rel err {rel_err(s, ws):.2e}, slots equal {same:.4f}")
    check(rel_err(s, ws) < 1e-2, f"fused top-k scores vs fp32 reference, n_keys {n_keys}")
    want = wsl.sort(-1).values

    def runs_and_matches(v) -> bool:
        """Run top-k variant ``v`` once; False if it fails to run, else check its slots."""
        try:
            got = triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, **v)[1]
        except Exception as e:
            print(f"    top-k variant {v} failed: {type(e).__name__}: {str(e)[:160]}")
            return False
        same = (got.sort(-1).values == want).float().mean().item()
        check(same > 0.9999, f"top-k variant {v}: slots equal the fp32 reference's ({same:.6f})")
        return True

    if topk_sweep:
        variants = [v for v in topk_variants(n_keys) if runs_and_matches(v)]
        times = tile_sweep(
            "top-k variant",
            lambda **kw: triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, **kw),
            variants,
        )
        for v in variants:  # registers of each (a launch of each, no timing)
            triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, **v)
            print(f"    {' '.join(f'{k}={x}' for k, x in v.items())}: {registers()}")
        best = min(
            variants, key=lambda v: times.get(" ".join(f"{k}={x}" for k, x in v.items()), 1e9)
        )
        for base in (
            variants[0],
            best,
        ):  # the stages: pass one, passes one and two, the half kernel
            tile_sweep(
                "top-k stages",
                lambda **kw: triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, **kw),
                [dict(base, stop=stop) for stop in (1, 2, 3)],
            )
    if sweep:
        for v in TOPK_VARIANTS:
            if "stop" not in v:
                runs_and_matches(v)
        for bisect in (0, 12):  # how many candidates the bound lets through, per row
            out = triton_topk.product_key_topk_forward(
                q1, q2, k1, k2, K, bisect=bisect, stop=2, ws=False
            )
            count = out[3][..., 0].float()
            rows = count.transpose(0, 1).reshape(N, 2 * H)[: N // 64 * 64]
            blocks = rows.view(N // 64, 64, 2 * H).amax(1)  # the kernel falls back by block
            print(
                f"    candidates per row, bisect {bisect}: mean {count.mean():.1f}, "
                f"max {count.max():.0f}, rows over {2 * K}: {(count > 2 * K).float().mean():.2e}, "
                f"64-row blocks over: {(blocks > 2 * K).float().mean():.2e}"
            )
        tile_sweep(
            "top-k variant",
            lambda **kw: triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, **kw),
            TOPK_VARIANTS,
        )
    ms = bench_ms(lambda: triton_topk.product_key_topk_forward(q1, q2, k1, k2, K))
    ref_ms = bench_ms(lambda: reference.product_key_topk(q1, q2, k1, k2, K))
    here_ms = bench_ms(lambda: triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, later=False))
    triton_ms = bench_ms(lambda: triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, ws=False))
    ws = triton_topk.gluon_topk is not None and triton_topk.gluon_topk.eligible(q1, q2, k1, K)
    row(
        f"fused scoring + top-k, {N} tok x {H} heads, {n_keys} sub-keys",
        ms,
        "",
        f"reference {ref_ms:.3f} ms ({ref_ms / ms:.1f}x); target <= 0.5 ms at 1,024; "
        f"Triton half kernel {triton_ms:.3f} ms; ranked in the half kernel {here_ms:.3f} ms",
    )
    if ws:  # the warp-specialised half kernel's stages: pass one, both passes (and the filter
        # of a sampled bound), with the recheck
        stages = [
            bench_ms(lambda s=s: triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, stop=s))
            for s in (1, 2, 3)
        ]
        row(
            f"  warp-specialised half kernel (Gluon), {n_keys} sub-keys",
            stages[1],
            "",
            f"pass one {stages[0]:.3f} ms; with the recheck {stages[2]:.3f} ms",
        )
    leaves = [t.clone().requires_grad_() for t in (q1, q2, k1, k2)]
    grad = torch.randn(N, H, K, device=dev, generator=g)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        triton_topk.product_key_topk(*leaves, K)[0].backward(grad)

    row(f"  top-k forward+backward, {n_keys} sub-keys", bench_ms(fwd_bwd))

    # the layer's call: whole queries (strided halves of a projection), qk-norm of the halves
    q = torch.randn(N, H * 2 * half, device=dev, generator=g).to(dt).view(N, H, 2 * half)
    norm_w = (torch.rand(2, half, device=dev, generator=g) + 0.5).to(dt)
    print(f"    half kernel without qk-norm: {registers()}")
    triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, stop=2, ws=False)
    print(f"    half kernel through pass two only: {registers()}")
    s_fused, sl_fused = triton_topk.query_topk(q, k1, k2, K, norm_w)
    s_ref, sl_ref = reference.query_topk(*(t.float() for t in (q, k1, k2)), K, norm_w.float())
    same = (sl_fused.sort(-1).values == sl_ref.sort(-1).values).float().mean().item()
    print(
        f"  query top-k with qk-norm: score rel err {rel_err(s_fused, s_ref):.2e}, slots {same:.4f}"
    )
    check(rel_err(s_fused, s_ref) < 1e-2, f"query top-k with qk-norm vs fp32 reference, {n_keys}")
    leaves = [t.clone().requires_grad_() for t in (q, k1, k2, norm_w)]

    def unfused(q, k1, k2, w):  # what the layer ran before: PyTorch qk-norm, then the kernel
        q1, q2 = q.chunk(2, dim=-1)
        q1 = reference.rms_normalise(q1) * w[0]
        q2 = reference.rms_normalise(q2) * w[1]
        return triton_topk.product_key_topk(q1, q2, k1, k2, K)

    s_unf, sl_unf = unfused(q, k1, k2, norm_w)
    same_unf = (sl_unf.sort(-1).values == sl_ref.sort(-1).values).float().mean().item()
    print(f"    qk-norm in PyTorch (bf16) then the kernel: slots {same_unf:.4f}")
    for label, fn in (
        ("qk-norm pass, then top-k", lambda q, k1, k2, w: triton_topk.query_topk(q, k1, k2, K, w)),
        ("qk-norm in PyTorch", unfused),
    ):
        with torch.no_grad():
            fwd_ms = bench_ms(lambda fn=fn: fn(q, k1, k2, norm_w))

        def step(fn=fn):
            for t in leaves:
                t.grad = None
            fn(*leaves)[0].backward(grad)

        row(
            f"  query top-k, {label}, {n_keys} sub-keys",
            fwd_ms,
            "",
            f"forward+backward {bench_ms(step):.3f} ms",
        )


def bench_bag(n_slots, N, B, D, dev, dt, copy_tbs, sweep) -> None:
    from memslot.kernels import triton_bag

    S = n_slots
    g = torch.Generator(device=dev).manual_seed(1)
    values = (torch.randn(S, D, device=dev, generator=g) * 0.02).to(dt)
    indices = torch.randint(0, S, (N, B), device=dev, generator=g)
    weights = torch.rand(N, B, device=dev, generator=g)
    weights = weights / weights.sum(1, keepdim=True)
    grad_out = torch.randn(N, D, device=dev, generator=g)
    out = triton_bag.embedding_bag_forward(values, indices, weights)
    want = reference.embedding_bag_forward(values, indices, weights)
    print(f"  bag forward rel err {rel_err(out, want):.2e}")
    check(rel_err(out, want) < 1e-5, "embedding-bag forward vs reference")
    gw, slots, rows_ = triton_bag.embedding_bag_backward(grad_out, values, indices, weights)
    wgw, wslots, wrows = reference.embedding_bag_backward(grad_out, values, indices, weights)
    print(f"  bag backward rel err w {rel_err(gw, wgw):.2e} rows {rel_err(rows_, wrows):.2e}")
    check(
        torch.equal(slots, wslots) and rel_err(gw, wgw) < 1e-5 and rel_err(rows_, wrows) < 1e-5,
        "embedding-bag backward vs reference",
    )
    _, rows16 = triton_bag._grad_rows_in_table_dtype(grad_out, values, indices, weights, dt)
    print(f"  bag backward, {dt} rows from {dt} grad_out: rel err {rel_err(rows16, wrows):.2e}")
    check(rel_err(rows16, wrows) < 1e-2, f"{dt} value rows vs reference")
    U = slots.numel()
    del want, wgw, wslots, wrows, rows_, rows16

    esz = values.element_size()
    fwd_bytes = N * B * (D * esz + 8 + 4) + N * D * 4
    ms = bench_ms(lambda: triton_bag.embedding_bag_forward(values, indices, weights))
    ref_ms = bench_ms(lambda: reference.embedding_bag_forward(values, indices, weights))
    tbs = fwd_bytes / ms / 1e9
    row(
        f"embedding-bag forward, {S:,} x {D} {dt}, bag {B}",
        ms,
        f"{tbs:.2f} TB/s",
        f"{tbs / copy_tbs:.0%} of copy; reference {ref_ms:.3f} ms; target >= 95%",
    )
    # each bag's rows read in slot order (the default where rows repeat across bags) or as given
    ordered = triton_bag.orders_bags(N * B, S, D * values.element_size())
    ms_as_given, ms_in_order = (
        bench_ms(
            lambda o=o: triton_bag._bag_forward(values, indices, weights, torch.float32, order=o)
        )
        for o in (False, True)
    )
    ms_order = bench_ms(lambda: triton_bag.order_bags(indices, weights, S))
    row(
        "  forward, each bag's rows in slot order",
        ms_in_order,
        "",
        f"{ms_as_given / ms_in_order:.3f}x the bag as given ({ms_as_given:.3f} ms), the order "
        f"kernel {ms_order:.3f} ms included; the default here: {ordered}",
    )
    # the layer's read: silu(gate) * bag, rounded once to bf16, by the same kernel
    gate = torch.randn(N, D, device=dev, generator=g).to(dt)
    gated = triton_bag.embedding_bag_forward_gated(values, indices, weights, gate, dt)[0]
    err = rel_err(gated, reference.silu_gated(gate, out, dt))
    check(err < 1e-2, f"gated bag forward vs reference ({err:.1e})")
    ms_g = bench_ms(
        lambda: triton_bag.embedding_bag_forward_gated(values, indices, weights, gate, dt)
    )
    row("  forward gated: silu(gate) * bag, bf16 out", ms_g, "", f"{ms_g / ms:.2f}x the bag")
    del gated
    gw_bytes = N * B * (D * esz + 8 + 4) + N * D * 4
    ms_w = bench_ms(lambda: triton_bag.embedding_bag_grad_weights(grad_out, values, indices))
    row(
        "  backward: weight gradients",
        ms_w,
        f"{gw_bytes / ms_w / 1e9:.2f} TB/s",
        f"{gw_bytes / ms_w / 1e9 / copy_tbs:.0%} of copy",
    )
    rows_bytes = N * B * (8 + 4 + 8) + N * D * 4 + U * D * esz
    sort_ms = bench_ms(lambda: triton_bag._sorted_segments(indices, S))
    flat32 = indices.reshape(-1).to(torch.int32)
    only_ms = bench_ms(lambda: torch.sort(flat32, stable=True))
    print(f"    sort + segment of {N * B:,} pairs: {sort_ms:.3f} ms (the sort alone {only_ms:.3f})")
    if sweep:
        tile_sweep(
            "value rows fp32 grad",
            lambda **kw: triton_bag.embedding_bag_grad_rows(
                grad_out, values, indices, weights, dt, **kw
            ),
            ROWS_VARIANTS,
        )
        tile_sweep(
            "value rows bf16 grad",
            lambda **kw: triton_bag.embedding_bag_grad_rows(
                grad_out, values, indices, weights, dt, grad_dtype=dt, **kw
            ),
            ROWS_VARIANTS,
        )
    ms_r = bench_ms(
        lambda: triton_bag.embedding_bag_grad_rows(grad_out, values, indices, weights, dt)
    )
    row(
        f"  backward: value rows, sparse ({U:,} unique slots)",
        ms_r,
        f"{rows_bytes / ms_r / 1e9:.2f} TB/s",
        f"{rows_bytes / ms_r / 1e9 / copy_tbs:.0%} of copy (incl. sort)",
    )
    bwd_bytes = gw_bytes + rows_bytes
    ms_b = bench_ms(lambda: triton_bag.embedding_bag_backward(grad_out, values, indices, weights))
    ref_b = bench_ms(
        lambda: reference.embedding_bag_backward(grad_out, values, indices, weights), 100
    )
    row(
        "embedding-bag backward (weights + sparse rows, fp32 rows)",
        ms_b,
        f"{bwd_bytes / ms_b / 1e9:.2f} TB/s",
        f"{bwd_bytes / ms_b / 1e9 / copy_tbs:.0%} of copy; reference {ref_b:.3f} ms; target >= 70%",
    )

    def train_backward():  # what the layer's autograd runs: weights, sparse rows in the table dtype
        triton_bag.embedding_bag_grad_weights(grad_out, values, indices)
        triton_bag._grad_rows_in_table_dtype(grad_out, values, indices, weights, dt)

    ms_t = bench_ms(train_backward)
    row(
        f"  backward by two kernels (weights + sparse {dt} rows), fp32 grad_out",
        ms_t,
        f"{bwd_bytes / ms_t / 1e9:.2f} TB/s",
        f"{bwd_bytes / ms_t / 1e9 / copy_tbs:.0%} of copy (the layer's backward until this run)",
    )

    # as the layer trains it now: the bag's output rounded to the table's dtype, so grad_out
    # comes in that dtype, and one kernel gives both gradients from the sorted pairs
    grad16 = grad_out.to(dt)
    gw_f, slots_f, rows_f = triton_bag.embedding_bag_backward_fused(
        grad16, values, indices, weights, torch.float32
    )
    wgw, _, wrows = reference.embedding_bag_backward(grad16.float(), values, indices, weights)
    print(f"  fused backward rel err w {rel_err(gw_f, wgw):.2e} rows {rel_err(rows_f, wrows):.2e}")
    check(
        torch.equal(slots_f, slots) and rel_err(gw_f, wgw) < 1e-5 and rel_err(rows_f, wrows) < 1e-5,
        "fused backward vs reference (bf16 grad_out)",
    )
    del gw_f, slots_f, rows_f, wgw, wrows
    tile_sweep(
        "fused backward",
        lambda **kw: triton_bag.embedding_bag_backward_fused(
            grad16, values, indices, weights, dt, **kw
        ),
        FUSED_VARIANTS,
    )
    # bytes the fused backward must move: each unique slot's row read and its gradient written,
    # grad_out once, the pairs' indices and weights read and their weight gradients written,
    # and the sort (indices read as int32, sorted keys and order written, order read back)
    fused_bytes = 2 * U * D * esz + N * D * grad16.element_size() + N * B * (8 + 4 + 4) + N * B * 16
    ms_f = bench_ms(lambda: triton_bag._grad_both(grad16, values, indices, weights, dt))
    row(
        f"embedding-bag backward as trained (one kernel, weights + sparse {dt} rows, {dt} grad_out)",
        ms_f,
        f"{fused_bytes / ms_f / 1e9:.2f} TB/s",
        f"{fused_bytes / ms_f / 1e9 / copy_tbs:.0%} of copy on {fused_bytes / 1e9:.2f} GB; "
        f"target >= 70%",
    )
    dense_bytes = rows_bytes + S * D * esz
    ms_d = bench_ms(
        lambda: triton_bag.embedding_bag_grad_rows(
            grad_out, values, indices, weights, dt, dense=True
        )
    )
    row(
        "  backward: value rows, dense table gradient",
        ms_d,
        f"{dense_bytes / ms_d / 1e9:.2f} TB/s",
        f"{dense_bytes / ms_d / 1e9 / copy_tbs:.0%} of copy (zero fill + rows)",
    )


WALK_KEYS = ("block_d", "num_warps", "waves", "stages")
WALK_VARIANTS = [  # the walk over sorted pairs: block_d, warps, programs a multiprocessor as a
    # multiple of those that stay resident (waves), stages of Triton's pipeliner on the pair loop
    dict(zip(WALK_KEYS, t, strict=True))
    for t in [
        (512, 1, 2, 1),
        (512, 1, 1, 1),
        (512, 1, 4, 1),
        (512, 1, 2, 3),
        (256, 1, 4, 1),
        (1024, 2, 2, 1),
    ]
]


def walk_sweep(args, dev, dt) -> dict | None:
    """The bag backward's rows of ``bench_bag_backward``: checks, the tile sweep, profiles."""
    from memslot.kernels import triton_bag

    N, D, B, S = args.tokens, args.dim, args.heads * args.topk, args.n_keys[0] ** 2
    props = torch.cuda.get_device_properties(dev)

    print(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)  # fmt: skip
    copy_tbs, copy_ms = copy_rate(dev)
    row("device copy 1 GiB -> 1 GiB", copy_ms, f"{copy_tbs:.2f} TB/s", "copy rate (read+write)")
    g = torch.Generator(device=dev).manual_seed(1)
    values = (torch.randn(S, D, device=dev, generator=g) * 0.02).to(dt)
    indices = torch.randint(0, S, (N, B), device=dev, generator=g)
    weights = torch.rand(N, B, device=dev, generator=g)
    weights = weights / weights.sum(1, keepdim=True)
    grad16 = torch.randn(N, D, device=dev, generator=g).to(dt)
    wgw, wslots, wrows = reference.embedding_bag_backward(grad16.float(), values, indices, weights)
    U = wslots.numel()
    esz = values.element_size()
    fused_bytes = 2 * U * D * esz + N * D * grad16.element_size() + N * B * (8 + 4 + 4) + N * B * 16
    default = triton_bag.WALK_TILES

    def checked(what, fn):
        gw, slots, rows = fn()
        again = fn()
        same = all(torch.equal(a, b) for a, b in zip((gw, slots, rows), again, strict=True))
        ew, er = rel_err(gw, wgw), rel_err(rows, wrows)
        ok = torch.equal(slots, wslots) and ew < 1e-5 and er < 1e-2 and same
        check(ok, f"{what}: w {ew:.1e}, {dt} rows {er:.1e}, bitwise rerun {same}")
        return ok

    def as_trained(seg):
        triton_bag.WALK_BACKWARD = seg
        return bench_ms(lambda: triton_bag._grad_both(grad16, values, indices, weights, dt))

    def rate(ms):
        tbs = fused_bytes / ms / 1e9
        return f"{tbs:.2f} TB/s", f"{tbs / copy_tbs:.0%} of copy on {fused_bytes / 1e9:.2f} GB"

    # fp32 rows of both kernels against the reference
    for what, fn in (
        ("per-slot backward, fp32 rows", triton_bag.embedding_bag_backward_fused),
        ("walk backward, fp32 rows", triton_bag.embedding_bag_backward_walk),
    ):
        gw, slots, rows = fn(grad16, values, indices, weights, torch.float32)
        ew, er = rel_err(gw, wgw), rel_err(rows, wrows)
        check(torch.equal(slots, wslots) and ew < 1e-5 and er < 1e-5, f"{what}: {ew:.1e} {er:.1e}")
        del gw, slots, rows
    checked("per-slot backward", lambda: triton_bag.embedding_bag_backward_fused(
        grad16, values, indices, weights, dt))  # fmt: skip
    ms_old = as_trained(None)
    times, variants = {}, {}
    for v in WALK_VARIANTS + [dict(default, hints=False)]:
        label = " ".join(f"{k}={x}" for k, x in v.items())
        variants[label] = v
        try:
            fn = lambda v=v: triton_bag.embedding_bag_backward_walk(  # noqa: E731
                grad16, values, indices, weights, dt, **v
            )
            if not checked(f"walk {label}", fn):
                continue
            times[label] = bench_ms(fn)
        except Exception as e:  # a tile that does not compile must not stop the run
            print(f"    walk {label} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        print(f"    walk {label}: {times[label]:.3f} ms, {rate(times[label])[1]}", flush=True)
    best = min(times, key=times.get) if times else None
    print(f"    best walk: {best}", flush=True)
    ms_new = as_trained(default)
    row("bag backward as trained, one program per unique slot (old)", ms_old, *rate(ms_old))
    row(f"bag backward as trained, walk {default} (new)", ms_new, *rate(ms_new))
    if best is not None:
        row(f"  walk, best tile: {best}", times[best], *rate(times[best]))
    sort_ms = bench_ms(lambda: triton_bag._sorted_runs(indices, S))
    row("  sort + run numbers of the pairs", sort_ms)
    profile("walk backward", lambda: triton_bag._grad_both(grad16, values, indices, weights, dt))
    triton_bag.WALK_BACKWARD = None
    profile(
        "per-slot backward", lambda: triton_bag._grad_both(grad16, values, indices, weights, dt)
    )
    return None if best is None else variants[best]


def bench_bag_backward(args) -> None:
    """The bag backward as the layer trains it (bf16 grad_out, both gradients, sparse bf16
    rows): one program per unique slot against the walk's tiles, then the layer's
    forward+backward at the first n_keys with each (``--bag-backward``)."""
    from memslot.kernels import triton_bag

    dev, dt = torch.device("cuda"), torch.bfloat16
    N, D, H, K, KD = args.tokens, args.dim, args.heads, args.topk, args.k_dim
    kept = triton_bag.WALK_BACKWARD
    best = walk_sweep(args, dev, dt)
    torch.cuda.empty_cache()
    default = triton_bag.WALK_TILES

    ffn = SwiGLU(D).to(dev, dt)
    x = torch.randn(1, N, D, device=dev, dtype=dt)
    xg = x.clone().requires_grad_()
    ffn_fb = bench_ms(forward_backward(ffn, xg))
    row("dense SwiGLU FFN forward+backward", ffn_fb)
    cfg = MemoryConfig(n_keys=args.n_keys[0], heads=H, topk=K, k_dim=KD, layers=(0,))
    torch.manual_seed(0)
    layer = ProductKeyMemory(D, D, cfg, 0).to(dev, dt)
    table = (torch.randn(cfg.n_slots, D, device=dev, dtype=dt) * 0.02).requires_grad_()
    step = forward_backward(layer, xg, table, sparse_grad=True)

    kernels_cuda.register()
    settings = [("per-slot backward (old)", None), (f"walk {default} (new)", default)]
    if best is not None and best != default:
        settings.append((f"walk, best tile {best}", best))
    for what, seg in settings:
        triton_bag.WALK_BACKWARD = seg
        t = bench_ms(step, 300)
        row(f"Memory+ layer forward+backward, {cfg.n_slots:,} slots, {what}", t, "",
            f"{t / ffn_fb:.2f}x FFN")  # fmt: skip
    triton_bag.WALK_BACKWARD = default
    profile("layer forward+backward, walk", step)
    triton_bag.WALK_BACKWARD = kept


def bench_gather_rates(args) -> None:
    """How fast rows can be gathered from where they live (``--gather-rates``): the bag forward
    from bf16 tables of 16K rows (32 MB: in L2, like the grad_out rows the bag backward reads
    once a pair) up to 1M rows (2 GB: from DRAM), against the copy rate."""
    from memslot.kernels import triton_bag

    dev, dt = torch.device("cuda"), torch.bfloat16
    N, D, B = args.tokens, args.dim, args.heads * args.topk
    props = torch.cuda.get_device_properties(dev)
    print(f"device {props.name}, L2 {props.L2_cache_size / 2**20:.0f} MiB", flush=True)
    copy_tbs, copy_ms = copy_rate(dev)
    row("device copy 1 GiB -> 1 GiB", copy_ms, f"{copy_tbs:.2f} TB/s", "copy rate (read+write)")
    g = torch.Generator(device=dev).manual_seed(0)
    weights = torch.rand(N, B, device=dev, generator=g)
    for rows in (16384, 65536, 262144, 1 << 20):
        table = torch.randn(rows, D, device=dev, generator=g).to(dt)
        idx = torch.randint(0, rows, (N, B), device=dev, generator=g)
        out = triton_bag.embedding_bag_forward(table, idx, weights, dt)
        want = reference.embedding_bag_forward(table.float(), idx, weights, torch.float32)
        check(rel_err(out, want) < 1e-2, f"bag forward from {rows:,} rows")
        ms = bench_ms(lambda table=table, idx=idx: triton_bag.embedding_bag_forward(
            table, idx, weights, dt))  # fmt: skip
        tbs = (N * B * D + N * D) * table.element_size() / ms / 1e9
        row(
            f"bag forward gathering from {rows:,} x {D} bf16 rows ({rows * D * 2 / 2**20:.0f} MiB)",
            ms,
            f"{tbs:.2f} TB/s",
            f"{100 * tbs / copy_tbs:.0f}% of copy",
        )
        del table, idx
        torch.cuda.empty_cache()


def gpu_bench(args) -> None:
    cuda = kernels_cuda

    check(cuda.register(), "Triton backend registered for CUDA")
    dev = torch.device("cuda")
    dt = torch.bfloat16
    N, D, H, K, KD = args.tokens, args.dim, args.heads, args.topk, args.k_dim
    half = KD // 2
    B = H * K
    props = torch.cuda.get_device_properties(dev)
    print(
        f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}; tokens {N}, dim {D}, heads {H}, top-{K}, "
        f"k_dim {KD}, {dt}",
        flush=True,
    )
    copy_tbs, copy_ms = copy_rate(dev)
    row("device copy 1 GiB -> 1 GiB", copy_ms, f"{copy_tbs:.2f} TB/s", "copy rate (read+write)")

    for n_keys in args.n_keys:
        bench_topk(n_keys, N, H, K, half, dev, dt, args.sweep, args.topk_sweep)
    if not args.no_bag:
        bench_bag(args.n_keys[0] ** 2, N, B, D, dev, dt, copy_tbs, args.sweep)
    torch.cuda.empty_cache()
    if args.no_layer:
        return

    ffn = SwiGLU(D).to(dev, dt)
    x = torch.randn(1, N, D, device=dev, dtype=dt)
    with torch.no_grad():
        ffn_fwd = bench_ms(lambda: ffn(x))
    xg = x.clone().requires_grad_()
    ffn_fb = bench_ms(forward_backward(ffn, xg))
    row(f"dense SwiGLU FFN forward, d {D}, hidden {4 * D}", ffn_fwd)
    row("dense SwiGLU FFN forward+backward", ffn_fb)

    layer_fwd, forwards = {}, {}
    for n_keys in args.n_keys:
        cfg = MemoryConfig(n_keys=n_keys, heads=H, topk=K, k_dim=KD, layers=(0,))
        torch.manual_seed(0)
        layer = ProductKeyMemory(D, D, cfg, 0).to(dev, dt)
        table = (torch.randn(cfg.n_slots, D, device=dev, dtype=dt) * 0.02).requires_grad_()

        def fwd(layer=layer, table=table):
            with torch.no_grad():
                return layer(x, table)[0]

        step = forward_backward(layer, xg, table, sparse_grad=True)

        times, outputs = {}, {}
        for path in ("triton", "reference"):
            cuda.register() if path == "triton" else cuda.unregister()
            outputs[path] = fwd()
            times[path] = (bench_ms(fwd), bench_ms(step, 300))
        cuda.register()
        y_fast, y_ref = outputs["triton"], outputs["reference"]
        if cfg.n_slots <= 2**20:  # an fp32 copy of the layer as the judge of both bf16 paths
            layer32 = ProductKeyMemory(D, D, cfg, 0).to(dev)
            layer32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
            cuda.unregister()
            with torch.no_grad():
                y32 = layer32(x.float(), table.detach().float())[0]
            cuda.register()
            print(
                f"  layer vs fp32 layer: triton {rel_err(y_fast, y32):.2e}, "
                f"reference {rel_err(y_ref, y32):.2e}"
            )
            del layer32, y32
        print(
            f"  layer n_keys={n_keys}: output rel err triton vs reference {rel_err(y_fast, y_ref):.2e}"
        )
        layer_fwd[n_keys] = times["triton"][0]
        table.grad = None
        forwards[n_keys] = fwd  # kept (with its layer and table) for the turns below
        if args.profile and n_keys == args.n_keys[0]:
            profile("layer forward", fwd)
            profile("layer forward+backward", step)
        for label, i, ffn_ms in (("forward", 0, ffn_fwd), ("forward+backward", 1, ffn_fb)):
            t, r = times["triton"][i], times["reference"][i]
            row(
                f"Memory+ layer {label}, {cfg.n_slots:,} slots (Triton)",
                t,
                "",
                f"{t / ffn_ms:.2f}x FFN; reference {r:.2f} ms ({r / t:.1f}x slower)",
            )
        del layer, table, step
        torch.cuda.empty_cache()
    if len(args.n_keys) > 1:
        a, b = args.n_keys[0], args.n_keys[-1]
        print(f"layer forward {b * b:,} / {a * a:,} slots: {layer_fwd[b] / layer_fwd[a]:.2f}x")
        ROWS.append(
            (
                f"layer forward {b * b:,} slots / {a * a:,} slots",
                f"{layer_fwd[b] / layer_fwd[a]:.2f}x",
                "",
                "target <= 1.3x",
            )
        )
    if args.turns:  # the acceptance's ratios, each within rounds of the same run

        def ffn_forward():
            with torch.no_grad():
                return ffn(x)

        timers = {"FFN": lambda: bench_ms(ffn_forward)}
        timers |= {n: (lambda f=f: bench_ms(f)) for n, f in forwards.items()}
        times = in_turns(timers, args.turns)
        turns_rows(times, "FFN", {n: f"Memory+ layer forward, {n * n:,} slots, against the FFN"
                                  for n in forwards}, "target <= 2.0x at 1M")  # fmt: skip
        if len(args.n_keys) > 1:
            a, b = args.n_keys[0], args.n_keys[-1]
            turns_rows(times, a, {b: f"layer forward {b * b:,} slots against {a * a:,}"},
                       "target <= 1.3x")  # fmt: skip


def profile(what: str, fn, reps: int = 5) -> None:
    """Device time per kernel over ``reps`` calls of fn (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / reps / 1e3
    print(f"  profile of {what}: {total:.3f} ms of kernels per call")
    for e in events[:24]:
        print(
            f"    {e.device_time_total / reps / 1e3:8.3f} ms  x{e.count // reps:<3d} {e.key[:110]}"
        )


# ---- CPU ---------------------------------------------------------------------------------------


def cpu_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def cpu_bench(args) -> None:
    print(f"CPU {cpu_model()}, torch {torch.__version__}; small shapes")
    N, D, H, K, n_keys, KD = 512, 256, 4, 8, 64, 64
    g = torch.Generator().manual_seed(0)
    q1, q2 = (torch.randn(N, H, KD // 2, generator=g) for _ in range(2))
    k1, k2 = (torch.randn(H, n_keys, KD // 2, generator=g) for _ in range(2))
    row(
        f"product-key top-k, reference, {N} tok x {H} heads, {n_keys} sub-keys",
        cpu_ms(lambda: reference.product_key_topk(q1, q2, k1, k2, K)),
    )
    row(
        f"top-k by brute force over {n_keys**2} slots",
        cpu_ms(lambda: reference.brute_force_topk(q1, q2, k1, k2, K)),
    )
    S = n_keys**2
    values = torch.randn(S, D, generator=g)
    indices = torch.randint(0, S, (N, H * K), generator=g)
    weights = torch.rand(N, H * K, generator=g)
    for name, fn in (
        ("reference", reference.embedding_bag),
        ("native", reference.embedding_bag_native),
    ):
        row(
            f"embedding-bag forward, {name}, {S} x {D} fp32",
            cpu_ms(lambda fn=fn: fn(values, indices, weights)),
        )

        def step(fn=fn):
            v = values.clone().requires_grad_()
            fn(v, indices, weights.requires_grad_(), True).sum().backward()

        row(f"embedding-bag forward+backward, {name}", cpu_ms(step))
    x = torch.randn(1, N, D, generator=g)
    cfg = MemoryConfig(n_keys=n_keys, heads=H, topk=K, k_dim=KD, layers=(0,))
    layer, ffn = ProductKeyMemory(D, D, cfg, 0), SwiGLU(D)
    with torch.no_grad():
        row(f"Memory+ layer forward, {S} slots", cpu_ms(lambda: layer(x, values)))
        row(f"dense SwiGLU FFN forward, d {D}", cpu_ms(lambda: ffn(x)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--k-dim", type=int, default=512)
    p.add_argument("--n-keys", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--sweep", action="store_true", help="time tile variants of each kernel too")
    p.add_argument("--topk-sweep", action="store_true", help="time the top-k's new variants")
    p.add_argument("--no-bag", action="store_true", help="skip the bag's timings")
    p.add_argument("--no-layer", action="store_true", help="skip the whole-layer timings")
    p.add_argument("--profile", action="store_true", help="per-kernel times of the 1M layer")
    p.add_argument(
        "--turns", type=int, default=5,
        help="rounds of the layer forwards and the FFN's timed in turns (0: none)",
    )  # fmt: skip
    p.add_argument(
        "--bag-backward", action="store_true", help="only the bag backward's kernels and tiles"
    )
    p.add_argument(
        "--gather-rates",
        action="store_true",
        help="only the bag forward from small to large tables",
    )
    p.add_argument(
        "--no-bag-order",
        action="store_true",
        help="the bag forward reads each bag's rows as given, never in slot order",
    )
    p.add_argument(
        "--ws-tiles",
        type=json.loads,
        default=None,
        help="the warp-specialised top-k's tiles as JSON, over its defaults at each sub-key "
        "count, e.g. '{\"sample\": 2}'",
    )
    args = p.parse_args()
    if args.no_bag_order:
        from memslot.kernels import triton_bag

        triton_bag.ORDER_BAGS_FROM = float("inf")
    if args.ws_tiles is not None:
        from memslot.kernels import triton_topk

        triton_topk.WS_TILES = args.ws_tiles
    if torch.cuda.is_available() and kernels_cuda.triton_available():
        if args.bag_backward:
            bench_bag_backward(args)
        elif args.gather_rates:
            bench_gather_rates(args)
        else:
            gpu_bench(args)
    else:
        cpu_bench(args)
    print("\n| measurement | time | rate | notes |\n|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
