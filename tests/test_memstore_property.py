"""Property: over any random history, every version reads back exactly as an in-memory model.

The model is a plain list of full tables, one per version. Commits, rollbacks and a final
compaction are drawn by hypothesis; reads are checked through every read path (whole table,
rows of random slots, diff), before and after reopening the store.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memslot.memstore import CompactedError, Store

N_SLOTS, DIM = 11, 3

commit_op = st.tuples(
    st.just("commit"),
    st.lists(st.integers(0, N_SLOTS - 1), min_size=1, max_size=N_SLOTS, unique=True),
    st.integers(0, 2**31 - 1),  # seed of the rows
)
rollback_op = st.tuples(st.just("rollback"), st.floats(0, 1), st.just(0))
history = st.lists(st.one_of(commit_op, commit_op, rollback_op), min_size=1, max_size=12)


def rows_for(seed: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    rows = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)
    rows[0, 0] = -0.0 if seed % 5 == 0 else rows[0, 0]  # signed zeros must survive too
    return rows


def assert_reads_match_model(store: Store, model: list[torch.Tensor], first: int, data) -> None:
    for version in range(first, len(model)):
        assert torch.equal(store.load_table(version), model[version])
        slots = data.draw(st.lists(st.integers(0, N_SLOTS - 1), max_size=6), label="read slots")
        assert torch.equal(store.read_rows(slots, version), model[version][slots])
        store.verify(version)
    v1, v2 = (
        data.draw(st.integers(first, len(model) - 1)),
        data.draw(st.integers(first, len(model) - 1)),
    )
    differs = (model[v1].view(torch.uint8) != model[v2].view(torch.uint8)).any(dim=1)
    diff = store.diff(v1, v2, rows=True)
    assert diff.slots == differs.nonzero().flatten().tolist()
    assert torch.equal(diff.before, model[v1][differs])
    assert torch.equal(diff.after, model[v2][differs])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=history, data=st.data())
def test_every_version_reads_back_exactly_as_the_model(dtype, ops, data):
    table = torch.randn(N_SLOTS, DIM, generator=torch.Generator().manual_seed(0)).to(dtype)
    model = [table.clone()]
    # Two rows per base chunk so histories cross chunk boundaries.
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch("memslot.memstore.store.CHUNK_TARGET_BYTES", 2 * DIM * dtype.itemsize),
    ):
        path = Path(tmp) / "store"
        store = Store.create(path, table)
        for op, arg, seed in ops:
            if op == "commit":
                rows = rows_for(seed, len(arg), dtype)
                store.commit(arg, rows, expected_parent=store.head)
                nxt = model[-1].clone()
                nxt[arg] = rows
            else:
                target = int(arg * (len(model) - 1))
                if target == store.head:
                    continue
                store.rollback(target)
                nxt = model[target].clone()
            model.append(nxt)
        assert store.head == len(model) - 1
        assert_reads_match_model(store, model, 0, data)

        keep = data.draw(st.integers(0, store.head), label="compact keep_from")
        store.compact(keep)
        store.close()
        with Store.open(path) as reopened:
            assert_reads_match_model(reopened, model, keep, data)
            if keep > 0:
                with pytest.raises(CompactedError):
                    reopened.load_table(keep - 1)
