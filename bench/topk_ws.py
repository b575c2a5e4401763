"""The warp-specialised half top-k (Gluon, Hopper) against the Triton half kernel.

    PYTHONPATH=. python3 bench/topk_ws.py [--quick]
    PYTHONPATH=. python3 bench/topk_ws.py --compare '[{}, {"bisect": 6}]'  # these tiles only
    PYTHONPATH=. python3 bench/topk_ws.py --profile '[null, {"sample": 2}]'  # time by kernel
    PYTHONPATH=. python3 bench/topk_ws.py --filter-sweep  # the filter kernel's tiles
    PYTHONPATH=. ncu --clock-control none -k regex:_half_topk_ws -c 1 --set full \
        python3 bench/topk_ws.py --once '{"sample": 4}' --n-keys 4096   # one call, for a profiler

On one GPU: checks that the fused top-k gives the same bits through both (scores, slots and
what the backward keeps, including blocks the recheck ranks), then times the whole top-k
of queries laid out as ``query_topk`` writes them, at 16,384 tokens x 4 heads, top-32, half
256, 1,024 and 4,096 sub-keys, for each kernel and several tiles of the Gluon one, and the
Gluon kernel's pass one alone. Medians of ``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from memslot.kernels import gluon_topk, triton_topk

# four consumer warpgroups a program, the query slices read from shared memory (the registers
# of four warpgroups and a loader warp fit in a multiprocessor's 64K)
C4 = dict(consumers=4, consumer_regs=120, loader_regs=24, q_reg=False, stages=3)


def bench_ms(fn, rep_ms: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def operands(N, H, half, n_keys, seed=0, same_keys=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(N, H, 2 * half, device="cuda", generator=g).to(torch.bfloat16)
    normed = triton_topk.normalise_query(q, None)  # (2, H, N, half), as query_topk has it
    q1, q2 = normed[0].transpose(0, 1), normed[1].transpose(0, 1)
    k1, k2 = (torch.randn(H, n_keys, half, device="cuda", generator=g).to(torch.bfloat16)
              for _ in range(2))  # fmt: skip
    if same_keys:  # every score of a row equal: every row past WIDE, every block rechecked
        k1[:, 1:] = k1[:, :1]
    return q1, q2, k1, k2


def check_same(N, H, half, n_keys, K, seed=0, same_keys=False, **ws_tiles) -> bool:
    q1, q2, k1, k2 = operands(N, H, half, n_keys, seed, same_keys)
    if not gluon_topk.eligible(q1, q2, k1, K, ws_tiles.get("block_c", gluon_topk.BLOCK_C_)):
        print(f"  not eligible: N={N} H={H} half={half} n_keys={n_keys} K={K}")
        return False
    a = triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, save_for_backward=True,
                                             ws=False)  # fmt: skip
    b = triton_topk.product_key_topk_forward(q1, q2, k1, k2, K, save_for_backward=True,
                                             ws=True, ws_tiles=ws_tiles)  # fmt: skip
    torch.cuda.synchronize()
    same = all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    scores_same = torch.equal(a[0], b[0])
    slots_same = (a[1] == b[1]).float().mean().item()
    print(f"  same bits N={N} H={H} half={half} n_keys={n_keys} K={K} same_keys={same_keys} "
          f"{ws_tiles}: {same} (scores {scores_same}, slots {slots_same:.5f})", flush=True)  # fmt: skip
    return same


def stage_times(ops, K, kwargs) -> dict[int, float]:
    """ms of the whole top-k (0), pass one (1), both passes (2) and the half kernels (3)."""
    return {
        stop: bench_ms(
            lambda stop=stop: triton_topk.product_key_topk_forward(*ops, K, stop=stop, **kwargs)
        )
        for stop in (0, 1, 2, 3)
    }


def compare(tiles_list: list[dict], rounds: int = 3) -> bool:
    """Each tile's same-bits check at the benchmark's shape, then the whole top-k and pass one
    alone of every tile, taken in turns ``rounds`` times (medians of each round)."""
    N, H, half, K = 16384, 4, 256, 32
    ok = True
    rows = []
    for n_keys in (1024, 4096):
        # at 4,096 sub-keys pass one over a quarter unless the tile says (the default there)
        tiles = [dict(t) if n_keys < 4096 or "sample" in t else dict(t, sample=4)
                 for t in tiles_list]  # fmt: skip
        for t in tiles:
            ok &= check_same(N, H, half, n_keys, K, **t)
        ops = operands(N, H, half, n_keys)
        times = {i: {0: [], 1: []} for i in range(len(tiles))}
        for _ in range(rounds):
            for i, t in enumerate(tiles):
                for stop in (0, 1):
                    times[i][stop].append(bench_ms(
                        lambda t=t, stop=stop, ops=ops: triton_topk.product_key_topk_forward(
                            *ops, K, stop=stop, ws=True, ws_tiles=t)))  # fmt: skip
        for i, t in enumerate(tiles):
            cells = [" / ".join(f"{ms:.3f}" for ms in times[i][stop]) for stop in (0, 1)]
            rows.append(f"| {n_keys} | {t or 'plain tiles'} | " + " | ".join(cells) + " |")
    print(f"checks: {'all same' if ok else 'DIFFER'}")
    print("| sub-keys | tiles | whole top-k ms (in turns) | pass one ms |")
    print("|---|---|---|---|")
    print("\n".join(rows), flush=True)
    return ok


def profile_kernels(tiles_list: list[dict | None], calls: int = 20) -> None:
    """Each kernel's device time in the whole top-k (``kernels.profile``: torch.profiler)."""
    from kernels import profile  # bench/kernels.py, beside this file

    for n_keys in (1024, 4096):
        ops = operands(16384, 4, 256, n_keys)
        for tiles in tiles_list:

            def run(tiles=tiles, ops=ops):
                return triton_topk.product_key_topk_forward(*ops, 32, ws=True, ws_tiles=tiles)

            for _ in range(5):
                run()
            profile(f"the top-k, {n_keys} sub-keys, tiles {tiles}", run, reps=calls)


def staged_by(ops, K, sample, wide=128):
    """What the Gluon kernel alone leaves with pass one over 1 / sample of the chunks: (the
    staged candidates (2, H, N, wide * sample), their counts, each row's bound)."""
    H, N = ops[0].shape[1], ops[0].shape[0]
    stage = torch.empty(2, H, N, wide * sample, dtype=torch.int64, device="cuda")
    staged = torch.empty(2, H, N, dtype=torch.int32, device="cuda")
    bound = torch.empty(2, H, N, device="cuda")
    gluon_topk.half_topk_ws(*ops, stage, staged, K, stage.shape[-1], bound=bound,
                            sample=sample)  # fmt: skip
    return stage, staged, bound


def filter_sweep() -> bool:
    """The filter kernel's tiles (rows, places, warps) on what the Gluon kernel stages at 4,096
    sub-keys with pass one over a quarter; each tile's output checked against the default's."""
    N, H, half, n_keys, K, wide = 16384, 4, 256, 4096, 32, 128
    stage, staged, bound = staged_by(operands(N, H, half, n_keys), K, 4, wide)
    want_s = torch.full((2, H, N, wide), -1, dtype=torch.int64, device="cuda")
    want_n = staged.clone()
    triton_topk.filter_candidates(stage, bound, want_s, want_n)
    print(f"staged a row: mean {staged.float().mean().item():.1f}, max {staged.max().item()}; "
          f"kept: mean {want_n.float().mean().item():.1f}, max {want_n.max().item()}")  # fmt: skip
    filled = torch.arange(wide, device="cuda") < want_n.clamp(max=wide)[..., None]
    late, scratch = staged.clone(), torch.empty_like(want_s)
    copy_ms = bench_ms(lambda: late.copy_(staged))  # each call starts from the staged counts
    ok, rows_out = True, []
    tiles = [(rows, piece, warps) for rows in (1, 2, 4, 8, 16, 32)
             for piece in (32, 64, 128, 256, 512) for warps in (1, 2, 4)
             if rows * piece <= 32 * 32 * warps]  # at most 32 places a thread  # fmt: skip
    for rows, piece, warps in tiles:

        def run(rows=rows, piece=piece, warps=warps):
            late.copy_(staged)
            triton_topk.filter_candidates(stage, bound, scratch, late, rows, piece, warps)

        scratch.fill_(-1)
        run()
        same = torch.equal(late, want_n) and torch.equal(scratch[filled], want_s[filled])
        ok &= same
        rows_out.append((bench_ms(run) - copy_ms, rows, piece, warps, same))
    print("| rows | places | warps | ms | same output |")
    print("|---|---|---|---|---|")
    ranked = sorted(rows_out)
    default = (2, 64, 1)  # filter_candidates' own tiles, shown wherever they rank
    for ms, rows, piece, warps, same in ranked[:10] + [r for r in ranked[10:] if r[1:4] == default]:
        print(f"| {rows} | {piece} | {warps} | {ms:.4f} | {same} |")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="checks and the main tiles only")
    ap.add_argument("--once", type=json.loads, metavar="TILES",
                    help="only the whole top-k, these Gluon tiles (JSON), a few times")  # fmt: skip
    ap.add_argument("--n-keys", type=int, default=1024, help="sub-keys for --once")
    ap.add_argument("--compare", type=json.loads, metavar="TILES_LIST",
                    help="only these Gluon tiles (a JSON list; at 4,096 sub-keys with sample 4 "
                         "unless a tile names one): their same-bits checks and times, in turns")  # fmt: skip
    ap.add_argument("--profile", type=json.loads, metavar="TILES_LIST",
                    help="device time of each kernel of the whole top-k for these Gluon tiles "
                         "(a JSON list; null: the defaults), at 1,024 and 4,096 sub-keys")  # fmt: skip
    ap.add_argument("--filter-sweep", action="store_true",
                    help="the filter kernel's tiles on the stage of 4,096 sub-keys, sample 4")  # fmt: skip
    args = ap.parse_args()
    import triton

    if args.compare is not None:
        sys.exit(0 if compare(args.compare) else 1)
    if args.profile is not None:
        profile_kernels(args.profile)
        return
    if args.filter_sweep:
        sys.exit(0 if filter_sweep() else 1)

    if args.once is not None:  # nothing else launched: a profiler's kernel filter finds these
        ops = operands(16384, 4, 256, args.n_keys)
        for _ in range(3):
            triton_topk.product_key_topk_forward(*ops, 32, ws=True, ws_tiles=args.once)
        torch.cuda.synchronize()
        print(f"ran the top-k 3 times, {args.n_keys} sub-keys, tiles {args.once}")
        return

    print(torch.cuda.get_device_name(), "triton", triton.__version__, flush=True)
    ok = True
    for shape in [
        dict(N=16384, H=4, half=256, n_keys=1024, K=32),
        dict(N=1000, H=2, half=128, n_keys=256, K=16),
        dict(N=333, H=3, half=64, n_keys=128, K=1),
        dict(N=4096, H=4, half=256, n_keys=4096, K=32),
    ]:
        ok &= check_same(**shape)
    ok &= check_same(N=700, H=2, half=256, n_keys=1024, K=32, same_keys=True)
    ok &= check_same(N=16384, H=4, half=256, n_keys=1024, K=32, stages=3)
    ok &= check_same(N=5000, H=4, half=256, n_keys=1024, K=32, q_reg=False)
    ok &= check_same(N=1000, H=2, half=128, n_keys=64, K=16, q_reg=False)
    ok &= check_same(N=1000, H=2, half=256, n_keys=1024, K=32, consumers=1, stages=2)
    for tiles in (dict(compact=0), dict(sample=2), dict(sample=4), C4, dict(C4, sample=2),
                  dict(C4, sample=4)):  # fmt: skip
        ok &= check_same(N=16384, H=4, half=256, n_keys=1024, K=32, **tiles)
        ok &= check_same(N=4096, H=4, half=256, n_keys=4096, K=32, **tiles)
        ok &= check_same(N=700, H=2, half=256, n_keys=1024, K=32, same_keys=True, **tiles)
    print(f"checks: {'all same' if ok else 'DIFFER'}", flush=True)

    N, H, half, K = 16384, 4, 256, 32
    # plain tiles (query in registers, 4 stages, places by quad scans, pass one over every
    # chunk), then the places by the triangle, pass one over half the chunks, the query read
    # from shared memory, four consumers a program
    variants = [dict(), dict(overlap=False), dict(sample=2), C4, dict(C4, sample=2)]
    if not args.quick:
        variants += [dict(sample=4), dict(C4, sample=4), dict(compact=0), dict(q_reg=False),
                     dict(C4, stages=2), dict(stages=3), dict(q_reg=False, stages=3),
                     dict(consumers=1, stages=2), dict(consumers=1, stages=2, q_reg=False)]  # fmt: skip
    print("| sub-keys | kernel | whole top-k ms | pass one ms | passes ms | half kernels ms |")
    print("|---|---|---|---|---|---|")
    for n_keys in (1024, 4096):
        q1, q2, k1, k2 = operands(N, H, half, n_keys)
        for sample in (1, 2, 4):  # candidates a row pass two stages, then those the filter keeps
            v = dict(sample=sample)
            staged = staged_by((q1, q2, k1, k2), K, sample)[1]
            print(f"| {n_keys} | {v}: staged a row: mean {staged.float().mean().item():.1f}, "
                  f"max {staged.max().item()} | | | |", flush=True)  # fmt: skip
            count = triton_topk.product_key_topk_forward(
                q1, q2, k1, k2, K, ws=True, stop=2, ws_tiles=v)[2]  # fmt: skip
            over = count > 2 * K  # past the CAP places the combine kernel ranks at once
            blocks = over.reshape(2, H, -1, 8).any(-1).float().mean().item()
            wide = (count > 128).reshape(2, H, -1, 64).any(-1).float().mean().item()
            print(f"| {n_keys} | {v}: candidates a row after the filter: mean "
                  f"{count.float().mean().item():.1f}, max {count.max().item()}; rows past "
                  f"{2 * K}: {over.float().mean().item():.4f}, 8-row combine programs with "
                  f"one: {blocks:.3f}, 64-row blocks with one past 128 (rechecked): "
                  f"{wide:.4f} | | | |", flush=True)  # fmt: skip
        t = stage_times((q1, q2, k1, k2), K, dict(ws=False))
        print(f"| {n_keys} | Triton | {t[0]:.3f} | {t[1]:.3f} | {t[2]:.3f} | {t[3]:.3f} |",
              flush=True)  # fmt: skip
        for v in variants:
            if n_keys // 64 // v.get("sample", 1) < 1:
                continue
            try:
                t = stage_times((q1, q2, k1, k2), K, dict(ws=True, ws_tiles=v))
            except Exception as e:  # a tile that does not compile must not stop the run
                print(f"| {n_keys} | Gluon {v} | failed: {type(e).__name__}: {str(e)[:200]} |")
                continue
            print(f"| {n_keys} | Gluon {v or 'plain tiles'} | {t[0]:.3f} | {t[1]:.3f} | "
                  f"{t[2]:.3f} | {t[3]:.3f} |", flush=True)  # fmt: skip
        # the whole top-k of plain tiles and of pass one over a half or a quarter, taken in
        # turns three times (the clock moves between rows of the table above)
        tiles = {"plain tiles": dict(), "sample 2": dict(sample=2), "sample 4": dict(sample=4),
                 "sample 4, four consumers": dict(C4, sample=4)}  # fmt: skip
        turns = {name: [] for name in tiles}
        ops = (q1, q2, k1, k2)
        for _ in range(3):
            for name, v in tiles.items():
                turns[name].append(bench_ms(
                    lambda v=v, ops=ops: triton_topk.product_key_topk_forward(
                        *ops, K, ws=True, ws_tiles=v)))  # fmt: skip
        for name, ms in turns.items():
            print(f"| {n_keys} | Gluon {name}, whole top-k in turns | "
                  f"{' / '.join(f'{t:.3f}' for t in ms)} | | | |", flush=True)  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
