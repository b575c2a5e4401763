"""bench/stage_bound.py: the Gluon top-k's sampled bounds replayed on the CPU, counted right."""

import os
import sys

import pytest
import torch

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)

import stage_bound  # noqa: E402


def test_raise_bound_finds_a_value_that_k_group_maxima_reach_within_the_halvings():
    g = torch.Generator().manual_seed(0)
    group_max = torch.randn(500, 64, generator=g)
    for k in (1, 5, 32, 64):
        lo = stage_bound.raise_bound(group_max, group_max.min(1).values, k)
        reached = (group_max >= lo[:, None]).sum(1)
        assert (reached >= k).all()  # a bound: k maxima reach it
        kth = group_max.topk(k, 1).values[:, -1]
        width = group_max.max(1).values - group_max.min(1).values
        # within one step of the k-th largest maximum after 6 halvings
        assert (kth - lo <= width / 2**stage_bound.HALVINGS + 1e-6).all()


@pytest.mark.parametrize("sample", [1, 2, 4])
def test_staged_and_kept_stage_every_score_at_the_filters_bound(sample):
    g = torch.Generator().manual_seed(sample)
    scores = torch.randn(512, 1024, generator=g)
    topk = 32
    kth = scores.topk(topk, 1).values[:, -1]
    for stage_k in sorted({topk, 20, 8} if sample > 1 else {topk}):
        staged, kept, bound = stage_bound.staged_and_kept(scores, topk, sample, stage_k)
        assert torch.equal(kept, (scores >= bound[:, None]).sum(1))
        assert (staged >= kept).all()  # every score at the filter's bound was staged
        if stage_k == topk:  # the bound from K maxima: no row is short of its top-k
            assert (bound <= kth).all() and (kept >= topk).all()
    if sample > 1:  # a lower stage_k stages fewer candidates
        more = stage_bound.staged_and_kept(scores, topk, sample, topk)[0]
        fewer = stage_bound.staged_and_kept(scores, topk, sample, 20)[0]
        assert fewer.float().mean() < more.float().mean()


def test_count_reports_the_short_rows_and_the_blocks_they_send_to_the_recheck():
    low = stage_bound.count(rows=256, n_keys=1024, topk=32, sample=4, stage_k=2, part=100)
    assert low["short_rows"] > 0 and 0 < low["short_blocks"] <= 1
    assert low["staged"] <= low["staged_max"] and low["kept"] <= low["kept_max"]
    whole = stage_bound.count(rows=256, n_keys=1024, topk=32, sample=4, stage_k=32, part=100)
    assert whole["short_rows"] == 0 and whole["short_blocks"] == 0.0
    assert whole["staged"] > low["staged"]
    # the same seed gives the same counts
    assert stage_bound.count(256, 1024, 32, 4, 32, part=100) == whole
