"""How many candidates the Gluon top-k stages with a sampled bound, by ``stage_k`` (CPU).

    python bench/stage_bound.py                     # 131,072 rows, about a minute
    python bench/stage_bound.py --rows 16384 --sample 2 --stage-k 32 20

From 4,096 sub-keys pass one of ``gluon_topk``'s half kernel reads 1 / sample of the chunks of
64 sub-keys and keeps, for each of the 64 groups of sub-keys c = g (mod 64), its largest
score; it bisects (6 halvings) for a bound that K of those maxima reach, and one that stage_k
reach. Pass two stages the other chunks' scores at or above the stage_k bound, adds them to
the group maxima, raises the K bound over every chunk's maxima and stages the sampled chunks'
scores at or above the higher of the two bounds; the filter keeps the staged scores at or
above it. A row keeping fewer than K has its 64-row block ranked again by the recheck kernel.

This replays that on Gaussian scores (what random queries and sub-keys give) with the
kernel's arithmetic, and prints a markdown table: staged candidates a row (what pass two
stores and the filter reads), kept ones (what the combine ranks), and the rows and 64-row
blocks left short of K.
"""

from __future__ import annotations

import argparse

import torch

BLOCK_C = 64  # sub-keys a chunk: the number of groups whose maxima the bound is taken from
HALVINGS = 6  # the kernel's bisection steps (``half_topk_ws``'s bisect)


def raise_bound(group_max: torch.Tensor, lo: torch.Tensor, k: int) -> torch.Tensor:
    """``gluon_topk._raise_bound``: a value that k of each row's group maxima reach, by
    HALVINGS halvings of [lo, largest maximum]; k of them must reach lo."""
    hi = group_max.max(1).values
    for _ in range(HALVINGS):
        mid = lo + (hi - lo) * 0.5
        reach = (group_max >= mid[:, None]).sum(1) >= k
        lo = torch.where(reach, mid, lo)
        hi = torch.where(reach, hi, mid)
    return lo


def staged_and_kept(
    scores: torch.Tensor, topk: int, sample: int, stage_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For scores (rows, n_keys): each row's staged and kept candidates, and the filter's
    bound, as the kernel and the filter find them (pass one over the first 1 / sample chunks)."""
    rows, n_keys = scores.shape
    chunks = scores.view(rows, n_keys // BLOCK_C, BLOCK_C)
    n_bound = chunks.shape[1] // sample
    group_max = chunks[:, :n_bound].amax(1)  # pass one: (rows, BLOCK_C)
    lo = raise_bound(group_max, group_max.min(1).values, topk)
    staged_bound = raise_bound(group_max, lo, stage_k) if stage_k < topk else lo
    if n_bound < chunks.shape[1]:  # pass two: the skipped chunks first, then the bound raised
        rest = chunks[:, n_bound:]
        lo = torch.maximum(raise_bound(torch.maximum(group_max, rest.amax(1)), lo, topk),
                           staged_bound)  # fmt: skip
        staged = (rest >= staged_bound[:, None, None]).sum((1, 2))
    else:
        staged = torch.zeros(rows, dtype=torch.int64)
    staged += (chunks[:, :n_bound] >= lo[:, None, None]).sum((1, 2))
    kept = (scores >= lo[:, None]).sum(1)  # every score at the filter's bound was staged
    return staged, kept, lo


def count(rows: int, n_keys: int, topk: int, sample: int, stage_k: int, seed: int = 1,
          part: int = 16384) -> dict:  # fmt: skip
    """Means and maxima over ``rows`` rows of Gaussian scores, ``part`` rows at a time."""
    g = torch.Generator().manual_seed(seed)
    staged, kept = [], []
    for start in range(0, rows, part):
        s = torch.randn(min(part, rows - start), n_keys, generator=g)
        a, b, _ = staged_and_kept(s, topk, sample, stage_k)
        staged.append(a)
        kept.append(b)
    staged, kept = torch.cat(staged).float(), torch.cat(kept)
    short = kept < topk
    blocks = short[: rows // 64 * 64].view(-1, 64).any(1)
    return {
        "staged": staged.mean().item(),
        "staged_max": int(staged.max().item()),
        "kept": kept.float().mean().item(),
        "kept_max": int(kept.max().item()),
        "short_rows": int(short.sum().item()),
        "short_blocks": blocks.float().mean().item() if blocks.numel() else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=131072)
    p.add_argument("--n-keys", type=int, default=4096)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--sample", type=int, default=4)
    p.add_argument("--stage-k", type=int, nargs="+", default=[32, 24, 20, 18, 16])
    a = p.parse_args()
    if a.n_keys % BLOCK_C or a.n_keys // BLOCK_C < a.sample or not 1 <= a.topk <= BLOCK_C:
        p.error(f"n_keys must be a multiple of {BLOCK_C} with at least sample chunks, and "
                f"topk in [1, {BLOCK_C}]")  # fmt: skip
    print(f"{a.rows:,} rows of Gaussian scores, {a.n_keys:,} sub-keys, top-{a.topk}, pass one "
          f"over 1/{a.sample} of the chunks, {HALVINGS} halvings\n")  # fmt: skip
    print("| stage_k | staged a row: mean (max) | kept a row: mean (max) | rows short of K | "
          "64-row blocks rechecked |")  # fmt: skip
    print("|---|---|---|---|---|")
    for k in a.stage_k:
        if not 1 <= k <= a.topk:
            continue
        c = count(a.rows, a.n_keys, a.topk, a.sample, k)
        print(f"| {k} | {c['staged']:.1f} ({c['staged_max']}) | {c['kept']:.1f} "
              f"({c['kept_max']}) | {c['short_rows']:,} of {a.rows:,} | "
              f"{c['short_blocks']:.2%} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
