"""Specification of the versioned store (memslot.memstore), one behaviour per test.

Random-history properties live in test_memstore_property.py and the kill -9 durability test in
test_memstore_crash.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memslot.memstore import (
    CompactedError,
    ConflictError,
    CorruptionError,
    Diff,
    Store,
    StoreError,
    StoreInUseError,
    ValidationError,
    Version,
    VersionNotFoundError,
)
from memslot.memstore.db import open_db
from memslot.memstore.layout import (
    COLUMN_FAMILIES,
    as_bytes_view,
    checksum_text,
    pack_u64,
    row_crcs,
    row_key,
    rows_checksum_text,
)

N_SLOTS, DIM = 37, 8  # odd sizes so the last base chunk is short
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four rows per base chunk, so small tables still span several chunks."""
    monkeypatch.setattr("memslot.memstore.store.CHUNK_TARGET_BYTES", 4 * DIM * 4)


def random_table(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N_SLOTS, DIM, generator=generator).to(dtype)


def random_rows(n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=generator).to(dtype)


@pytest.fixture
def table() -> torch.Tensor:
    return random_table()


@pytest.fixture
def store(tmp_path: Path, table: torch.Tensor):
    with Store.create(tmp_path / "store", table) as opened:
        yield opened


def raw_contents(store_path: Path) -> dict[str, dict[bytes, bytes]]:
    """Every key and value of every column family, read beside the writer."""
    db = open_db(store_path, read_only=True)
    try:
        contents = {"default": dict(db.items())}
        for name in COLUMN_FAMILIES:
            contents[name] = dict(db.get_column_family(name).items())
        return contents
    finally:
        db.close()


def overwrite_raw(store_path: Path, column_family: str, key: bytes, value: bytes) -> None:
    db = open_db(store_path)
    try:
        db.get_column_family(column_family).put(key, value)
    finally:
        db.close()


# --------------------------------------------------------------------------------- creation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_create_stores_the_table_as_version_0_with_its_shape_and_dtype(tmp_path, dtype):
    table = random_table(dtype)
    with Store.create(tmp_path / "s", table, author="alice", message="shipped") as store:
        assert store.shape == (N_SLOTS, DIM)
        assert store.dtype == dtype
        assert store.head == 0
        assert torch.equal(store.load_table(0), table)
        record = store.show(0)
        assert (record.version, record.parent, record.kind) == (0, None, "create")
        assert (record.author, record.message) == ("alice", "shipped")
    with Store.open(tmp_path / "s") as reopened:
        assert reopened.dtype == dtype and torch.equal(reopened.load_table(), table)


def test_create_refuses_a_path_that_already_holds_a_store(tmp_path, table):
    Store.create(tmp_path / "s", table).close()
    with pytest.raises(StoreError, match="already holds a store"):
        Store.create(tmp_path / "s", table)


@pytest.mark.parametrize(
    "bad_table, problem",
    [
        (torch.zeros(4, 2, 2), "2-D"),
        (torch.zeros(4, 2, dtype=torch.int32), "not supported"),
        (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[1.0], [float("inf")]]), "row 1"),
    ],
)
def test_create_rejects_invalid_tables_and_leaves_no_store(tmp_path, bad_table, problem):
    with pytest.raises(ValidationError, match=problem):
        Store.create(tmp_path / "s", bad_table)
    with pytest.raises(StoreError, match="no store"):
        Store.open(tmp_path / "s")


def test_values_are_raw_bytes_never_pickles(store, table):
    store.commit([3], random_rows(1), expected_parent=0)
    row_value = raw_contents(store.path)["rows"][row_key(3, 1)]
    assert len(row_value) == 4 + DIM * 4  # CRC-32 + the row's bytes
    assert row_value[4:] == random_rows(1).numpy().tobytes()


# ---------------------------------------------------------------------------------- commits


def test_commit_writes_a_new_version_with_its_record(store, table):
    rows = random_rows(2)
    version = store.commit(
        [5, 2],
        rows,
        expected_parent=0,
        author="bob",
        message="fix",
        kind="edit",
        meta={"ticket": 7},
    )
    assert isinstance(version, Version)
    assert (version.version, version.parent, version.slots) == (1, 0, (5, 2))
    assert (version.author, version.message, version.kind, version.meta) == (
        "bob",
        "fix",
        "edit",
        {"ticket": 7},
    )
    assert version.checksum == rows_checksum_text(row_crcs(as_bytes_view(rows), DIM * 4))
    assert version.time.endswith("+00:00")  # UTC
    assert store.head == 1
    assert store.show(1) == version
    assert torch.equal(store.read_rows([5, 2]), rows)
    assert torch.equal(store.read_rows([5, 2], version=0), table[[5, 2]])


def test_commit_accepts_slots_as_a_tensor(store):
    store.commit(torch.tensor([1, 4]), random_rows(2), expected_parent=0)
    assert store.show(1).slots == (1, 4)


def test_commit_with_a_stale_parent_raises_conflict_and_writes_nothing(store):
    store.commit([1], random_rows(1), expected_parent=0)
    before = raw_contents(store.path)
    with pytest.raises(ConflictError, match="head is 1") as caught:
        store.commit([2], random_rows(1, seed=9), expected_parent=0)
    assert (caught.value.expected_parent, caught.value.head) == (0, 1)
    assert raw_contents(store.path) == before


INVALID_COMMITS = {
    "wrong shape": ([1, 2], torch.zeros(2, DIM + 1), "shape"),
    "rows for fewer slots": ([1, 2], torch.zeros(1, DIM), "shape"),
    "wrong dtype": ([1], torch.zeros(1, DIM, dtype=torch.float64), "dtype"),
    "NaN": ([1, 2], torch.tensor([[0.0] * DIM, [float("nan")] * DIM]), r"slot\(s\) \[2\]"),
    "Inf": ([3], torch.full((1, DIM), float("-inf")), "NaN or Inf"),
    "slot out of range": ([N_SLOTS], torch.zeros(1, DIM), "out of range"),
    "negative slot": ([-1], torch.zeros(1, DIM), "out of range"),
    "duplicate slots": ([4, 4], torch.zeros(2, DIM), "more than once"),
    "empty commit": ([], torch.zeros(0, DIM), "empty commit"),
    "float slots": ([1.0], torch.zeros(1, DIM), "ints"),
    "rows not a tensor": ([1], [[0.0] * DIM], "torch.Tensor"),
}


@pytest.mark.parametrize("case", list(INVALID_COMMITS))
def test_invalid_commit_raises_validation_error_and_leaves_store_byte_for_byte_unchanged(
    store, case
):
    store.commit([0], random_rows(1), expected_parent=0)
    before = raw_contents(store.path)
    slots, rows, problem = INVALID_COMMITS[case]
    with pytest.raises(ValidationError, match=problem):
        store.commit(slots, rows, expected_parent=1)
    assert raw_contents(store.path) == before
    assert store.head == 1 and [v.version for v in store.log()] == [1, 0]


def test_non_serialisable_meta_is_rejected(store):
    with pytest.raises(ValidationError, match="JSON"):
        store.commit([0], random_rows(1), expected_parent=0, meta={"x": object()})
    assert store.head == 0


# ------------------------------------------------------------------------------------ reads


def test_read_rows_returns_each_slots_newest_row_at_or_below_the_version(store, table):
    first, second = random_rows(1, seed=1), random_rows(1, seed=2)
    store.commit([6], first, expected_parent=0)
    store.commit([7], random_rows(1, seed=3), expected_parent=1)
    store.commit([6], second, expected_parent=2)
    assert torch.equal(store.read_rows([6], 0), table[[6]])
    assert torch.equal(store.read_rows([6], 1), first)
    assert torch.equal(store.read_rows([6], 2), first)
    assert torch.equal(store.read_rows([6], 3), second)
    assert torch.equal(store.read_rows([6, 0, 6]), torch.cat([second, table[[0]], second]))
    assert store.read_rows([]).shape == (0, DIM)


def test_read_rows_reads_each_base_chunk_once_whatever_the_slot_order(store, table, monkeypatch):
    written = random_rows(1, seed=4)
    store.commit([9], written, expected_parent=0)
    reads: list[int] = []
    base_chunk = Store._base_chunk

    def counted(self, chunk_index):
        reads.append(chunk_index)
        return base_chunk(self, chunk_index)

    monkeypatch.setattr(Store, "_base_chunk", counted)
    slots = [36, 0, 9, 13, 1, 36, 12, 35, 2]  # chunks of 4 rows: 9, 0, -, 3, 0, 9, 3, 8, 0
    want = table[slots].clone()
    want[2] = written[0]  # slot 9 comes from its written row, not from chunk 2
    assert torch.equal(store.read_rows(slots), want)
    assert reads == [0, 3, 8, 9]  # each chunk once, in ascending order, chunk 2 never
    assert torch.equal(store.read_rows(slots, version=0), table[slots])


def test_load_table_streams_into_a_preallocated_tensor(store, table):
    rows = random_rows(3)
    store.commit([0, 17, N_SLOTS - 1], rows, expected_parent=0)
    out = torch.empty(N_SLOTS, DIM)
    result = store.load_table(1, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = table.clone()
    expected[[0, 17, N_SLOTS - 1]] = rows
    assert torch.equal(out, expected)
    assert torch.equal(store.load_table(0), table)


def test_load_table_rejects_an_out_tensor_of_the_wrong_kind(store):
    with pytest.raises(ValidationError, match="contiguous CPU tensor"):
        store.load_table(out=torch.empty(N_SLOTS, DIM, dtype=torch.float16))
    with pytest.raises(ValidationError, match="contiguous CPU tensor"):
        store.load_table(out=torch.empty(DIM, N_SLOTS).t())


def test_reading_a_version_that_does_not_exist_says_which_versions_do(store):
    with pytest.raises(VersionNotFoundError, match="from 0 to 0"):
        store.read_rows([1], 5)
    with pytest.raises(VersionNotFoundError):
        store.show(-1)


def test_everything_survives_close_and_reopen(tmp_path, table):
    path = tmp_path / "s"
    with Store.create(path, table) as store:
        store.commit([1], random_rows(1), expected_parent=0)
        store.tag("edited", 1)
        expected_log = store.log()
    with Store.open(path) as store:
        assert store.head == 1 and store.log() == expected_log
        assert store.tags() == {"edited": 1}
        assert torch.equal(store.read_rows([1]), random_rows(1))


def test_a_closed_store_says_so(store):
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.commit([1], random_rows(1), expected_parent=0)


# ---------------------------------------------------------------------------------- history


def test_log_lists_newest_first_and_pages_with_before(store):
    for parent in range(5):
        store.commit([parent], random_rows(1, seed=parent), expected_parent=parent)
    assert [v.version for v in store.log()] == [5, 4, 3, 2, 1, 0]
    assert [v.version for v in store.log(limit=2)] == [5, 4]
    assert [v.version for v in store.log(limit=2, before=4)] == [3, 2]
    assert [v.version for v in store.log(limit=10, before=1)] == [0]
    assert store.log(before=0) == []


def test_changed_slots_are_the_slots_of_the_commits_in_the_range(store):
    store.commit([3, 1], random_rows(2), expected_parent=0)
    store.commit([9], random_rows(1), expected_parent=1)
    store.commit([1], random_rows(1), expected_parent=2)
    assert store.changed_slots(0, 3) == [1, 3, 9]
    assert store.changed_slots(1, 3) == [1, 9]
    assert store.changed_slots(2, 2) == []


def test_diff_lists_exactly_the_slots_whose_rows_differ(store, table):
    store.commit([1, 2], random_rows(2), expected_parent=0)
    store.commit([2], table[[2]], expected_parent=1)  # slot 2 back to its version-0 row
    store.commit([5], table[[5]], expected_parent=2)  # rewritten with the same row
    diff = store.diff(0, 3)
    assert isinstance(diff, Diff)
    assert (diff.v1, diff.v2, diff.slots, diff.before, diff.after) == (0, 3, [1], None, None)
    assert store.diff(1, 2).slots == [2]
    assert store.diff(3, 0).slots == [1]


def test_diff_with_rows_returns_before_and_after(store, table):
    rows = random_rows(2)
    store.commit([4, 8], rows, expected_parent=0)
    diff = store.diff(0, 1, rows=True)
    assert diff.slots == [4, 8]
    assert torch.equal(diff.before, table[[4, 8]])
    assert torch.equal(diff.after, rows)


def test_diff_treats_negative_zero_as_a_change(tmp_path):
    with Store.create(tmp_path / "s", torch.zeros(4, 2)) as store:
        store.commit([1], torch.tensor([[-0.0, 0.0]]), expected_parent=0)
        assert store.diff(0, 1).slots == [1]


def test_rollback_restores_the_targets_rows_bit_exactly_as_a_new_version(store, table):
    store.commit([1, 2], random_rows(2, seed=1), expected_parent=0)
    store.commit([2, 30], random_rows(2, seed=2), expected_parent=1)
    at_1 = store.load_table(1)
    rolled = store.rollback(1, author="ops", message="bad edit")
    assert (rolled.version, rolled.parent, rolled.kind) == (3, 2, "rollback")
    assert rolled.meta == {"target": 1}
    assert set(rolled.slots) == {2, 30}
    assert torch.equal(store.load_table(3), at_1)
    assert torch.equal(store.load_table(2)[[2, 30]], random_rows(2, seed=2))  # history kept
    store.rollback(0)
    assert torch.equal(store.load_table(), table)


def test_rollback_checks_its_expected_parent_and_refuses_a_no_op(store):
    store.commit([1], random_rows(1), expected_parent=0)
    with pytest.raises(ConflictError):
        store.rollback(0, expected_parent=0)
    with pytest.raises(ValidationError, match="already the head"):
        store.rollback(1)
    assert store.head == 1


# ------------------------------------------------------------------------- tags and resolver


def test_tags_name_versions_and_can_be_deleted(store):
    store.commit([1], random_rows(1), expected_parent=0)
    store.tag("release-1", 1)
    store.tag("shipped", "head~1")
    assert store.tags() == {"release-1": 1, "shipped": 0}
    assert store.resolve("release-1") == 1
    assert torch.equal(store.read_rows([1], "release-1"), random_rows(1))
    store.delete_tag("release-1")
    assert store.tags() == {"shipped": 0}
    with pytest.raises(VersionNotFoundError, match="release-1"):
        store.resolve("release-1")
    with pytest.raises(VersionNotFoundError, match="no tag"):
        store.delete_tag("release-1")


@pytest.mark.parametrize("name", ["", "head", "12", "has space", "a~1"])
def test_tag_names_that_would_be_ambiguous_are_rejected(store, name):
    with pytest.raises(ValidationError, match="tag name"):
        store.tag(name, 0)


def test_resolver_accepts_ints_digit_strings_head_and_head_offsets(store):
    for parent in range(3):
        store.commit([parent], random_rows(1), expected_parent=parent)
    assert [store.resolve(spec) for spec in (2, "2", "head", "head~0", "head~3")] == [2, 2, 3, 3, 0]
    for bad in ("head~4", 4, -1, "nope", 1.5, True):
        with pytest.raises(VersionNotFoundError):
            store.resolve(bad)


# ------------------------------------------------------------------------------- compaction


def test_compaction_keeps_later_versions_exact_and_refuses_older_reads(store):
    for parent in range(6):
        slots = [parent % 3, 10 + parent]
        store.commit(slots, random_rows(2, seed=parent), expected_parent=parent)
    tables = {v: store.load_table(v) for v in range(7)}
    stats = store.compact(4)
    assert stats["oldest_readable"] == store.oldest_readable == 4
    assert stats["rows_dropped"] == 8  # every row written at versions 1..4
    assert stats["rows_folded"] == 7  # slots 0, 1, 2, 10, 11, 12, 13 move into the base
    for version in range(4, 7):
        assert torch.equal(store.load_table(version), tables[version])
        assert torch.equal(store.read_rows(list(range(N_SLOTS)), version), tables[version])
        store.verify(version)
    with pytest.raises(CompactedError, match="oldest readable version is 4"):
        store.read_rows([0], 3)
    with pytest.raises(CompactedError):
        store.load_table(0)
    assert [v.version for v in store.log(limit=100)] == list(range(6, -1, -1))  # records stay
    assert store.compact(2)["rows_dropped"] == 0  # already compacted further
    store.close()
    with Store.open(store.path) as reopened:
        assert reopened.oldest_readable == 4
        assert torch.equal(reopened.load_table(5), tables[5])


# --------------------------------------------------------------------------------- checksums


def test_every_version_verifies_against_its_record(store):
    store.commit([1, 2], random_rows(2), expected_parent=0)
    for version in (0, 1):
        store.verify(version)


def test_the_commit_checksum_covers_every_row_and_their_order(store):
    rows = random_rows(3)
    record = store.commit([4, 8, 9], rows, expected_parent=0)
    row_bytes = DIM * 4
    changed = rows.clone()
    changed[2, 5] += 1.0
    assert rows_checksum_text(row_crcs(as_bytes_view(changed), row_bytes)) != record.checksum
    swapped = rows[[1, 0, 2]].contiguous()
    assert rows_checksum_text(row_crcs(as_bytes_view(swapped), row_bytes)) != record.checksum


def test_records_with_a_whole_commit_crc_still_verify(store):
    # Records written before the commit checksum was derived from the row CRCs carry a CRC-32
    # over all the rows' bytes; verify checks those too.
    rows = random_rows(2)
    record = store.commit([1, 2], rows, expected_parent=0)
    store.close()
    for checksum, should_verify in ((checksum_text(as_bytes_view(rows)), True), ("crc32:0", False)):
        legacy = Version(**{**record.__dict__, "checksum": checksum})
        overwrite_raw(store.path, "commits", pack_u64(1), legacy.to_bytes())
        with Store.open(store.path) as reopened:
            if should_verify:
                reopened.verify(1)
            else:
                with pytest.raises(CorruptionError, match="version 1"):
                    reopened.verify(1)


def test_a_corrupted_commit_row_raises_corruption_error_not_wrong_numbers(store):
    store.commit([3], random_rows(1), expected_parent=0)
    store.close()
    value = bytearray(raw_contents(store.path)["rows"][row_key(3, 1)])
    value[-1] ^= 0x01
    overwrite_raw(store.path, "rows", row_key(3, 1), bytes(value))
    with Store.open(store.path) as damaged:
        with pytest.raises(CorruptionError, match="slot 3"):
            damaged.read_rows([3])
        with pytest.raises(CorruptionError):
            damaged.load_table()
        with pytest.raises(CorruptionError):
            damaged.verify(1)
        assert torch.equal(damaged.read_rows([2]), random_table()[[2]])  # others still serve


def test_a_corrupted_base_chunk_raises_corruption_error(store):
    store.close()
    value = bytearray(raw_contents(store.path)["base"][pack_u64(1)])
    value[-1] ^= 0x80  # last row of chunk 1, i.e. slot 7
    overwrite_raw(store.path, "base", pack_u64(1), bytes(value))
    with Store.open(store.path) as damaged:
        with pytest.raises(CorruptionError, match="base chunk 1"):
            damaged.read_rows([7])
        with pytest.raises(CorruptionError, match="base chunk 1"):
            damaged.load_table()
        assert damaged.read_rows([6]).shape == (1, DIM)  # its own row checksum still holds


def flip_a_bit_on_disk(store_path: Path, needle: bytes) -> None:
    """Flush the store to SST files, then flip one bit of `needle` where it lies on disk."""
    db = open_db(store_path)
    try:
        for name in COLUMN_FAMILIES:
            db.get_column_family(name).flush()
    finally:
        db.close()
    for path in sorted((store_path / "db").glob("*.sst")):
        data = bytearray(path.read_bytes())
        at = data.find(needle)
        if at >= 0:
            data[at + len(needle) // 2] ^= 0x10
            path.write_bytes(bytes(data))
            return
    raise AssertionError("the row bytes were not found in any SST file")


@pytest.mark.parametrize("where", ["base", "commit"])
def test_bit_rot_in_the_files_on_disk_is_a_corruption_error_on_every_read(store, table, where):
    rows = random_rows(1)
    store.commit([11], rows, expected_parent=0)
    store.close()
    damaged_slot, needle = (9, table[9]) if where == "base" else (11, rows[0])
    flip_a_bit_on_disk(store.path, needle.numpy().tobytes())
    with Store.open(store.path) as damaged:
        with pytest.raises(CorruptionError):
            damaged.load_table()
        with pytest.raises(CorruptionError):
            damaged.read_rows([damaged_slot])
        with pytest.raises(CorruptionError):
            damaged.verify(0 if where == "base" else 1)
        if where == "commit":  # a compaction must not mistake a damaged block for the end
            with pytest.raises(CorruptionError):
                damaged.compact(1)
            assert (damaged.head, damaged.oldest_readable) == (1, 0)


# ------------------------------------------------------------------------- backup and export


def test_backup_is_a_store_with_the_same_history(store, tmp_path):
    store.commit([1], random_rows(1), expected_parent=0)
    store.tag("t", 1)
    store.backup(tmp_path / "backup")
    store.commit([2], random_rows(1, seed=5), expected_parent=1)  # after the backup
    with Store.open(tmp_path / "backup") as backup:
        assert backup.head == 1 and backup.tags() == {"t": 1}
        assert backup.log() == store.log(before=2)
        assert torch.equal(backup.load_table(), store.load_table(1))
    with pytest.raises(StoreError, match="not empty"):
        store.backup(tmp_path / "backup")


def test_export_then_import_commits_the_differing_rows_as_a_new_version(store, tmp_path):
    store.commit([1, 2], random_rows(2), expected_parent=0)
    store.export_version(1, tmp_path / "v1.safetensors")
    store.rollback(0)
    imported = store.import_version(tmp_path / "v1.safetensors", expected_parent=2, author="a")
    assert (imported.version, imported.kind, imported.slots) == (3, "import", (1, 2))
    assert imported.meta["source_version"] == "1"
    assert torch.equal(store.load_table(3), store.load_table(1))
    with pytest.raises(ValidationError, match="nothing to import"):
        store.import_version(tmp_path / "v1.safetensors", expected_parent=3)
    with pytest.raises(ConflictError):
        store.import_version(tmp_path / "v1.safetensors", expected_parent=0)


def test_import_rejects_a_table_of_another_shape_or_dtype(store, tmp_path):
    save_file({"values": torch.zeros(N_SLOTS, DIM, dtype=torch.float16)}, tmp_path / "x")
    with pytest.raises(ValidationError, match="float16"):
        store.import_version(tmp_path / "x", expected_parent=0)
    save_file({"other": torch.zeros(N_SLOTS, DIM)}, tmp_path / "y")
    with pytest.raises(ValidationError, match="values"):
        store.import_version(tmp_path / "y", expected_parent=0)
    assert store.head == 0


# ------------------------------------------------------------------------ one writer, readers


def test_read_only_open_works_beside_the_writer_and_refuses_writes(store):
    store.commit([1], random_rows(1), expected_parent=0)
    with Store.open(store.path, read_only=True) as reader:
        assert reader.head == 1
        assert torch.equal(reader.read_rows([1]), random_rows(1))
        with pytest.raises(StoreError, match="read-only"):
            reader.commit([2], random_rows(1), expected_parent=1)


def test_a_second_writer_in_this_process_is_told_the_store_is_in_use(store):
    with pytest.raises(StoreInUseError, match=f"in use by process {os.getpid()}"):
        Store.open(store.path)


def test_a_second_writer_process_is_told_which_process_holds_the_store(store):
    store.commit([1], random_rows(1), expected_parent=0)
    script = textwrap.dedent(
        """
        import sys
        from memslot.memstore import Store, StoreInUseError
        try:
            Store.open(sys.argv[1])
        except StoreInUseError as error:
            print("in-use", error.pid, error)
        with Store.open(sys.argv[1], read_only=True) as reader:
            print("reader-head", reader.head)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(store.path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert f"in-use {os.getpid()} store {store.path} is in use by process {os.getpid()}" in (
        result.stdout
    )
    assert "LOCK" not in result.stdout
    assert "reader-head 1" in result.stdout
