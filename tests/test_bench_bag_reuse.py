"""bench/bag_reuse.py: the grad_out rows a grouped bag backward would read, counted right."""

import os
import sys

import torch

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)

import bag_reuse  # noqa: E402


def test_rows_per_pair_counts_each_tokens_row_once_per_group_of_slots_it_reaches():
    slots = torch.tensor([[0, 1, 5], [0, 4, 8]])  # token 0 reads slots 0, 1, 5; token 1 0, 4, 8
    assert bag_reuse.rows_per_pair(slots, 0) == 1.0  # by slot: a row for every pair
    assert bag_reuse.rows_per_pair(slots, 2) == 5 / 6  # groups of 4: {0, 1} and {0, 1, 2}
    assert bag_reuse.rows_per_pair(slots, 3) == 3 / 6  # groups of 8: {0} and {0, 1}
    assert bag_reuse.rows_per_pair(slots, 4) == 2 / 6  # one group: each token's row once
    assert bag_reuse.rows_per_pair(slots.to(torch.int32), 3) == 3 / 6
    assert bag_reuse.rows_per_pair(torch.empty(0, 3, dtype=torch.int64), 3) == 0.0


def test_topk_lookups_are_the_reference_top_k_of_each_head_in_one_bag():
    heads, topk, n_keys = 2, 4, 16
    slots = bag_reuse.topk_lookups(tokens=5, heads=heads, topk=topk, n_keys=n_keys, k_dim=8,
                                   seed=0)  # fmt: skip
    assert slots.shape == (5, heads * topk)
    assert slots.min() >= 0 and slots.max() < n_keys**2
    for head in slots.reshape(5, heads, topk).reshape(-1, topk):
        assert head.unique().numel() == topk  # a head's top-k are distinct slots
    # the same seed gives the same lookups; another seed others
    again = bag_reuse.topk_lookups(5, heads, topk, n_keys, 8, 0)
    assert torch.equal(slots, again)
    assert not torch.equal(slots, bag_reuse.topk_lookups(5, heads, topk, n_keys, 8, 1))
