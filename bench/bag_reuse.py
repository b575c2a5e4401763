"""How many grad_out rows the bag backward must gather, by how its pairs are grouped (CPU).

    python bench/bag_reuse.py                    # the acceptance's shapes, about a minute
    python bench/bag_reuse.py --tokens 2048      # quicker

The backward's value-row gradient sums, for each slot, weight x grad_out[token] over the
(token, slot) pairs that read it. Walked in slot order (the Triton walk), every pair gathers
its token's grad_out row again: 2.1M rows of 2 KB (4.3 GB) at 16,384 tokens x 128 lookups,
more than the value rows read and the gradient rows written together, and all of it through
L2. A kernel that takes the pairs of a group of nearby slots together (the slots sharing
``slot >> shift``) needs each token's row once per group it reaches. This counts, for each
shift, the grad_out rows such a kernel reads per pair, for two kinds of lookups:

* uniform: every pair's slot drawn uniformly from the table (``bench/kernels.py``'s bag rows,
  which the acceptance's bag backward figure comes from);
* product-key top-k: the memory layer's own lookups, from random queries and sub-keys through
  the reference top-k (slot = i1 x n_keys + i2: a token-head's top-k share few i1).

Prints a markdown table: grad_out rows a pair and the bytes through L2 of a backward that
reads each value row once, writes each gradient row once and grad_out as counted.
"""

from __future__ import annotations

import argparse

import torch

from memslot.kernels import reference


def rows_per_pair(slots: torch.Tensor, shift: int) -> float:
    """grad_out rows read per pair when pairs are taken by groups of slots with equal
    ``slot >> shift``, each token's row read once per group it reaches: the number of distinct
    (slot >> shift, token) over the number of pairs. slots: (N, B), token n's B lookups."""
    n, b = slots.shape
    if n * b == 0:
        return 0.0
    token = torch.arange(n, dtype=torch.int64).repeat_interleave(b)
    key = (slots.reshape(-1).to(torch.int64) >> shift) * n + token
    return key.unique().numel() / (n * b)


def topk_lookups(tokens: int, heads: int, topk: int, n_keys: int, k_dim: int,
                 seed: int) -> torch.Tensor:  # fmt: skip
    """(tokens, heads x topk) slots of the reference product-key top-k on random inputs."""
    g = torch.Generator().manual_seed(seed)
    half = k_dim // 2
    k1, k2 = (torch.randn(heads, n_keys, half, generator=g) for _ in range(2))
    out = []
    for start in range(0, tokens, 2048):  # scores of 2,048 tokens at a time
        n = min(2048, tokens - start)
        q1, q2 = (torch.randn(n, heads, half, generator=g) for _ in range(2))
        out.append(reference.product_key_topk(q1, q2, k1, k2, topk)[1].reshape(n, -1))
    return torch.cat(out) if out else torch.empty(0, heads * topk, dtype=torch.int64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=1024, help="value dim (for the bytes)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--n-keys", type=int, default=1024)
    p.add_argument("--k-dim", type=int, default=512)
    p.add_argument("--shifts", type=int, nargs="+", default=[0, 6, 8, 10, 12, 14])
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    n_slots, bag = args.n_keys**2, args.heads * args.topk
    g = torch.Generator().manual_seed(args.seed)
    lookups = {
        "uniform": torch.randint(0, n_slots, (args.tokens, bag), generator=g),
        "product-key top-k": topk_lookups(
            args.tokens, args.heads, args.topk, args.n_keys, args.k_dim, args.seed
        ),
    }
    row_gb = args.dim * 2 / 1e9  # a bf16 row
    print(f"{args.tokens:,} tokens x {bag} lookups ({args.heads} heads x top-{args.topk}) "
          f"from {n_slots:,} slots, value dim {args.dim}, bf16\n")  # fmt: skip
    print(
        "| lookups | pairs grouped by | grad_out rows a pair | grad_out GB | "
        "+ value and gradient rows, GB | against the walk |"
    )
    print("|---|---|---|---|---|---|")
    for name, slots in lookups.items():
        pairs = slots.numel()
        unique = slots.unique().numel()
        rows_gb = 2 * unique * row_gb  # each value row read once, each gradient row written once
        walk = pairs * row_gb + rows_gb
        for shift in args.shifts:
            r = rows_per_pair(slots, shift)
            gathered = r * pairs * row_gb
            total = gathered + rows_gb
            group = "slot (the walk)" if shift == 0 else f"slot >> {shift}, then token"
            print(f"| {name} ({unique:,} unique slots, {pairs / unique:.2f} pairs a slot) | "
                  f"{group} | {r:.3f} | {gathered:.2f} | {total:.2f} | "
                  f"{total / walk:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
