"""The versioned value table: commits, reads at any version, history, compaction, backups.

Vocabulary (DESIGN.md, "The store (memstore)"): a *version* is an integer 0, 1, 2, ...; a
*commit* writes rows for some slots plus a record, atomically, and becomes the new *head*;
*rollback* is a commit that restores an older version's rows; *compaction* drops row history
older than a retention version. Guarantees, each backed by a test:

- a commit is all-or-nothing: rows, record and head pointer go in one WriteBatch with a synced
  WAL, so after a crash the head is the last acknowledged version or the one being written;
- a commit names the head it expects (compare-and-set); a stale one gets ConflictError;
- invalid input raises ValidationError before anything is written;
- every version at or after ``oldest_readable`` reads exactly as it did when committed;
  row bytes are checksummed and a mismatch raises CorruptionError.

A Store object is safe to share between threads of one process: writes are serialised by a
lock, and reads of a fixed version are unaffected by concurrent commits.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import re
import shutil
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rocksdict import Checkpoint, Rdict, ReadOptions, WriteBatch
from safetensors import safe_open
from safetensors.torch import save_file

from memslot.memstore.db import db_path, holds_store, open_db, remove_writer_pid, synced_writes
from memslot.memstore.errors import (
    CompactedError,
    ConflictError,
    CorruptionError,
    StoreError,
    ValidationError,
    VersionNotFoundError,
)
from memslot.memstore.layout import (
    CF_BASE,
    CF_COMMITS,
    CF_ROWS,
    CF_TAGS,
    CHUNK_TARGET_BYTES,
    COLUMN_FAMILIES,
    FORMAT_VERSION,
    META_FORMAT,
    META_HEAD,
    META_OLDEST_READABLE,
    ROWS_CHECKSUM_PREFIX,
    SUPPORTED_DTYPES,
    as_bytes_view,
    checksum_text,
    dtype_name,
    nonfinite_rows,
    open_chunk,
    open_chunk_row,
    open_row,
    pack_u64,
    parse_row_key,
    row_crcs,
    row_key,
    row_keys,
    rows_checksum_text,
    seal_chunk,
    seal_rows,
    unpack_u64,
)
from memslot.memstore.records import Diff, Version, utc_now

EXPORT_TENSOR_NAME = "values"  # the one tensor in an exported safetensors file
_CREATE_BATCH_BYTES = 64 << 20  # bound memory while writing a large version-0 table
_HEAD_OFFSET = re.compile(r"head~(\d+)")
_TAG_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,200}")

SlotsLike = Sequence[int] | torch.Tensor | np.ndarray
_Method = TypeVar("_Method", bound=Callable[..., Any])


def _reports_disk_damage(method: _Method) -> _Method:
    """Turn RocksDB's own checksum failures (damaged files on disk) into CorruptionError."""

    @functools.wraps(method)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:  # rocksdict raises plain Exception with RocksDB's status text
            if not str(exc).startswith("Corruption:"):
                raise
            raise CorruptionError(
                f"RocksDB found damaged data on disk ({exc}): the store is damaged. Restore it "
                "from a backup (Store.backup) and do not serve it."
            ) from exc

    return checked  # type: ignore[return-value]


class Store:
    """A versioned (n_slots, dim) value table in RocksDB. Use Store.create or Store.open."""

    def __init__(self, path: Path, db: Rdict, *, read_only: bool) -> None:
        self._path = path
        self._db: Rdict | None = db
        self._read_only = read_only
        self._write_lock = threading.Lock()
        self._cf = {name: db.get_column_family(name) for name in COLUMN_FAMILIES}
        self._cf_handle = {name: db.get_column_family_handle(name) for name in COLUMN_FAMILIES}
        raw_format, raw_head = db.get(META_FORMAT), db.get(META_HEAD)
        if raw_format is None or raw_head is None:
            self.close()
            raise StoreError(
                f"store {path} is incomplete: its creation did not finish. Delete the folder "
                "and create the store again."
            )
        fmt = json.loads(raw_format)
        if fmt.get("format") != FORMAT_VERSION:
            self.close()
            raise StoreError(
                f"store {path} has format {fmt.get('format')}, this memslot reads format "
                f"{FORMAT_VERSION}: upgrade memslot or export/import the table."
            )
        self._shape = (int(fmt["n_slots"]), int(fmt["dim"]))
        self._dtype = SUPPORTED_DTYPES[fmt["dtype"]]
        self._chunk_rows = int(fmt["chunk_rows"])
        self._row_bytes = self._shape[1] * self._dtype.itemsize
        self._head = unpack_u64(raw_head)
        self._oldest_readable = unpack_u64(db[META_OLDEST_READABLE])
        self._synced = synced_writes()

    # ----------------------------------------------------------------------------- lifecycle

    @classmethod
    def create(
        cls,
        path: str | Path,
        table: torch.Tensor,
        *,
        author: str = "memslot",
        message: str = "initial table",
    ) -> Store:
        """Create a store whose version 0 is `table` (fp32, fp16 or bf16, shape (N, D))."""
        path = Path(path)
        if holds_store(path):
            raise StoreError(
                f"{path} already holds a store: open it with Store.open, or choose another path."
            )
        _check_table(table)
        table = table.detach().to("cpu").contiguous()
        n_slots, dim = table.shape
        row_bytes = dim * table.dtype.itemsize
        chunk_rows = max(1, CHUNK_TARGET_BYTES // row_bytes)
        path.mkdir(parents=True, exist_ok=True)
        db = open_db(path, create=True)
        try:
            table_bytes = as_bytes_view(table)
            cf_base = db.get_column_family_handle(CF_BASE)
            chunk_bytes = chunk_rows * row_bytes
            batch, crc = WriteBatch(raw_mode=True), 0
            for chunk_index, start in enumerate(range(0, len(table_bytes), chunk_bytes)):
                rows = table_bytes[start : start + chunk_bytes]
                crc = zlib.crc32(rows, crc)
                batch.put(pack_u64(chunk_index), seal_chunk(rows, row_bytes), cf_base)
                if batch.size_in_bytes() >= _CREATE_BATCH_BYTES:
                    db.write(batch)
                    batch = WriteBatch(raw_mode=True)
            # The head pointer goes last, in the synced batch: a crash before it leaves a store
            # that says it is incomplete rather than one with a partial table.
            fmt = {
                "format": FORMAT_VERSION,
                "n_slots": n_slots,
                "dim": dim,
                "dtype": dtype_name(table.dtype),
                "chunk_rows": chunk_rows,
            }
            record = Version(
                0, None, utc_now(), author, message, "create", (), f"crc32:{crc:08x}", {}
            )
            batch.put(pack_u64(0), record.to_bytes(), db.get_column_family_handle(CF_COMMITS))
            batch.put(META_FORMAT, json.dumps(fmt).encode())
            batch.put(META_OLDEST_READABLE, pack_u64(0))
            batch.put(META_HEAD, pack_u64(0))
            db.write(batch, synced_writes())
        except BaseException:
            db.close()
            remove_writer_pid(path)
            shutil.rmtree(db_path(path), ignore_errors=True)
            raise
        return cls(path, db, read_only=False)

    @classmethod
    def open(cls, path: str | Path, *, read_only: bool = False) -> Store:
        """Open a store. Read-only opens see the store as of the open and may run beside the
        single writer; a second writer gets StoreInUseError."""
        path = Path(path)
        return cls(path, open_db(path, read_only=read_only), read_only=read_only)

    def close(self) -> None:
        """Close the database and release the writer lock (idempotent)."""
        if self._db is None:
            return
        # Column-family objects keep the database (and its LOCK) alive until they are dropped.
        self._cf.clear()
        self._cf_handle.clear()
        self._db.close()
        self._db = None
        if not self._read_only:
            remove_writer_pid(self._path)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self._read_only else "read-write"
        return (
            f"Store({str(self._path)!r}, shape={self._shape}, dtype={self._dtype}, "
            f"head={self._head}, {mode})"
        )

    # ---------------------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def head(self) -> int:
        return self._head

    @property
    def oldest_readable(self) -> int:
        """The oldest version whose rows can still be read (raised by compaction)."""
        return self._oldest_readable

    @property
    def read_only(self) -> bool:
        return self._read_only

    # ------------------------------------------------------------------------------- commits

    def commit(
        self,
        slots: SlotsLike,
        rows: torch.Tensor,
        *,
        expected_parent: int,
        author: str = "",
        message: str = "",
        kind: str = "write",
        meta: dict | None = None,
    ) -> Version:
        """Write `rows` into `slots` as a new version whose parent must be `expected_parent`.

        Rows, record and head go in one synced WriteBatch: when this returns, the version is
        durable; if it raises, nothing was written.
        """
        self._check_writable()
        slot_list = self._check_slots(slots, for_commit=True)
        rows = self._check_rows(rows, slot_list)
        _check_text_fields(author=author, message=message, kind=kind)
        meta = _check_meta(meta)
        with self._write_lock:
            self._check_parent(expected_parent)
            return self._write_commit(slot_list, rows, author, message, kind, meta)

    def _write_commit(
        self,
        slots: list[int],
        rows: torch.Tensor,
        author: str,
        message: str,
        kind: str,
        meta: dict,
    ) -> Version:
        version = self._head + 1
        # Keys and sealed rows are built in bulk (numpy) and the record's checksum is derived
        # from the row CRCs: Python-side work is ~1 ms of a 1,000-row commit, the rest is the
        # synced write.
        values, crcs = seal_rows(as_bytes_view(rows), self._row_bytes)
        batch = WriteBatch(raw_mode=True)
        cf_rows = self._cf_handle[CF_ROWS]
        for key, value in zip(row_keys(slots, version), values, strict=True):
            batch.put(key, value, cf_rows)
        record = Version(
            version,
            self._head,
            utc_now(),
            author,
            message,
            kind,
            tuple(slots),
            rows_checksum_text(crcs),
            meta,
        )
        batch.put(pack_u64(version), record.to_bytes(), self._cf_handle[CF_COMMITS])
        batch.put(META_HEAD, pack_u64(version))
        self._live_db().write(batch, self._synced)
        self._head = version
        return record

    def rollback(
        self,
        target: int | str,
        *,
        expected_parent: int | None = None,
        author: str = "",
        message: str = "",
    ) -> Version:
        """Commit a new version whose rows equal `target`'s for every slot changed after it.

        History stays append-only: the versions after `target` remain readable.
        """
        self._check_writable()
        with self._write_lock:
            parent = self._head if expected_parent is None else expected_parent
            self._check_parent(parent)
            target_version = self._readable(target)
            if target_version == self._head:
                raise ValidationError(
                    f"version {target_version} is already the head: nothing to roll back. "
                    "Pick an older version (see store.log())."
                )
            slots = self.changed_slots(target_version, self._head)
            rows = self.read_rows(slots, target_version)
            return self._write_commit(
                slots,
                rows,
                author,
                message or f"rollback to version {target_version}",
                "rollback",
                {"target": target_version},
            )

    # --------------------------------------------------------------------------------- reads

    @_reports_disk_damage
    def read_rows(self, slots: SlotsLike, version: int | str | None = None) -> torch.Tensor:
        """Rows of `slots` at `version` (default head), shape (len(slots), dim).

        One seek each for the rows written since the base, in ascending slot order; the rest
        come from their base chunks, each read once and dropped once its rows are copied, so
        memory stays at one chunk however many chunks the slots reach.
        """
        read_version = self._readable(self._head if version is None else version)
        slot_list = self._check_slots(slots, for_commit=False)
        out = torch.empty((len(slot_list), self._shape[1]), dtype=self._dtype)
        out_bytes = as_bytes_view(out)
        row_bytes = self._row_bytes
        order = sorted(range(len(slot_list)), key=slot_list.__getitem__)
        from_base: list[int] = []  # places whose slot was not written since the base, ascending
        rows_iter = self._cf[CF_ROWS].iter()
        try:
            for i in order:
                row = self._written_row(rows_iter, slot_list[i], read_version)
                if row is None:
                    from_base.append(i)
                else:
                    out_bytes[i * row_bytes : (i + 1) * row_bytes] = row
        finally:
            del rows_iter  # a traceback must not keep the database open after close()
        chunk, chunk_index = b"", -1
        for i in from_base:
            index, row_in_chunk = divmod(slot_list[i], self._chunk_rows)
            if index != chunk_index:
                chunk, chunk_index = self._base_chunk(index), index
            out_bytes[i * row_bytes : (i + 1) * row_bytes] = open_chunk_row(
                chunk, index, row_in_chunk, row_bytes
            )
        return out

    def _written_row(self, rows_iter: Any, slot: int, version: int) -> memoryview | None:
        """The newest row of `slot` written at or below `version`, or None if none was written
        since the base (the base chunk holds it)."""
        # Keys sort by slot, then by version descending: seeking to (slot, version) lands on
        # the newest row written at or below `version`, if the slot was written since the base.
        rows_iter.seek(row_key(slot, version))
        if rows_iter.valid():
            found_slot, written_at = parse_row_key(rows_iter.key())
            if found_slot == slot:
                return open_row(rows_iter.value(), slot, written_at)
        else:
            rows_iter.status()  # an invalid iterator may mean a failed read, not "no rows"
        return None

    def _base_chunk(self, chunk_index: int) -> bytes:
        value = self._cf[CF_BASE].get(pack_u64(chunk_index))
        if value is None:
            raise CorruptionError(
                f"base chunk {chunk_index} is missing: the store is damaged. Restore it from a "
                "backup (Store.backup)."
            )
        return value

    @_reports_disk_damage
    def load_table(
        self, version: int | str | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The whole table at `version` (default head), streamed into `out` if given.

        Copies the base chunks in order, then overlays, for each slot written since the base,
        its newest row at or below `version`.
        """
        read_version = self._readable(self._head if version is None else version)
        if out is None:
            out = torch.empty(self._shape, dtype=self._dtype)
        else:
            self._check_out(out)
        out_bytes = as_bytes_view(out)
        row_bytes, chunk_bytes = self._row_bytes, self._chunk_rows * self._row_bytes
        n_chunks = math.ceil(self._shape[0] / self._chunk_rows)
        read_options = ReadOptions()
        read_options.fill_cache(False)  # a full scan would only evict the rows readers need
        # Every chunk is checked below by the 64-bit sum over its rows (any single flipped bit
        # changes it). RocksDB's block checksums would check the same bytes a second time and
        # took 40% of the load; row reads, compactions and backups still verify them.
        read_options.set_verify_checksums(False)
        seen = 0
        for key, value in _scan(self._cf[CF_BASE], read_options=read_options):
            chunk_index = unpack_u64(key)
            data = open_chunk(value, chunk_index, row_bytes)
            start = chunk_index * chunk_bytes
            if chunk_index >= n_chunks or len(data) != min(chunk_bytes, len(out_bytes) - start):
                raise CorruptionError(
                    f"base chunk {chunk_index} has the wrong size: the store is damaged. "
                    "Restore it from a backup (Store.backup)."
                )
            out_bytes[start : start + len(data)] = data
            seen += 1
        if seen != n_chunks:
            raise CorruptionError(
                f"the base table has {seen} of its {n_chunks} chunks: the store is damaged. "
                "Restore it from a backup (Store.backup)."
            )
        self._overlay_rows(out_bytes, read_version)
        return out

    def _overlay_rows(self, out_bytes: memoryview, version: int) -> None:
        # One seek per slot written since the base: each lands on the slot's newest row at or
        # below `version`, or on a later slot whose rows may all be newer (then seek again).
        row_bytes, n_slots = self._row_bytes, self._shape[0]
        rows_iter = self._cf[CF_ROWS].iter()
        try:
            rows_iter.seek(row_key(0, version))
            while rows_iter.valid():
                slot, written_at = parse_row_key(rows_iter.key())
                if written_at > version:
                    rows_iter.seek(row_key(slot, version))
                    continue
                row = open_row(rows_iter.value(), slot, written_at)
                out_bytes[slot * row_bytes : (slot + 1) * row_bytes] = row
                if slot + 1 >= n_slots:
                    break
                rows_iter.seek(row_key(slot + 1, version))
            rows_iter.status()  # the loop also ends when a read fails: raise that, if so
        finally:
            del rows_iter  # a traceback must not keep the database open after close()

    def verify(self, version: int | str | None = None) -> None:
        """Check that `version`'s rows still match the checksum in its record."""
        read_version = self._readable(self._head if version is None else version)
        record = self.show(read_version)
        if record.slots:
            data = as_bytes_view(self.read_rows(list(record.slots), read_version))
            if record.checksum.startswith(ROWS_CHECKSUM_PREFIX):
                actual = rows_checksum_text(row_crcs(data, self._row_bytes))
            else:  # records written before per-row checksums were combined
                actual = checksum_text(data)
        else:  # version 0 holds every slot
            actual = checksum_text(as_bytes_view(self.load_table(read_version)))
        if actual != record.checksum:
            raise CorruptionError(
                f"version {read_version} does not match its checksum {record.checksum}: the "
                "store is damaged. Restore it from a backup (Store.backup)."
            )

    # ------------------------------------------------------------------------------- history

    @_reports_disk_damage
    def show(self, version: int | str) -> Version:
        """The commit record of one version (records outlive compaction)."""
        resolved = self.resolve(version)
        raw = self._cf[CF_COMMITS].get(pack_u64(resolved))
        if raw is None:
            raise CorruptionError(
                f"the record of version {resolved} is missing: the store is damaged. Restore "
                "it from a backup (Store.backup)."
            )
        return Version.from_bytes(raw)

    @_reports_disk_damage
    def log(self, limit: int = 20, before: int | str | None = None) -> list[Version]:
        """Up to `limit` records, newest first; `before` pages on from below that version."""
        if limit < 0:
            raise ValidationError(f"limit must be 0 or more, got {limit}.")
        if before is None:
            top = self._head
        elif isinstance(before, int) and not isinstance(before, bool) and before == self._head + 1:
            top = self._head  # "everything below the next version" is a natural page start
        else:
            top = self.resolve(before) - 1
        return [self.show(v) for v in range(top, max(top - limit, -1), -1)]

    @_reports_disk_damage
    def changed_slots(self, from_version: int | str, to_version: int | str) -> list[int]:
        """Slots written by the commits in (from_version, to_version], from their records."""
        start, end = self.resolve(from_version), self.resolve(to_version)
        if start > end:
            raise ValidationError(
                f"from_version {start} is after to_version {end}: pass the older version first."
            )
        slots: set[int] = set()
        for key, raw in _scan(self._cf[CF_COMMITS], from_key=pack_u64(start + 1)):
            if unpack_u64(key) > end:
                break
            slots.update(json.loads(raw)["slots"])
        return sorted(slots)

    def diff(self, v1: int | str, v2: int | str, *, rows: bool = False) -> Diff:
        """Slots whose rows differ (bit for bit) between v1 and v2, with rows if asked."""
        first, second = self._readable(v1), self._readable(v2)
        candidates = self.changed_slots(min(first, second), max(first, second))
        before = self.read_rows(candidates, first)
        after = self.read_rows(candidates, second)
        # Compare bytes, not floats: -0.0 vs 0.0 is a change, and the store holds no NaN.
        differs = (before.view(torch.uint8) != after.view(torch.uint8)).any(dim=1)
        flags = differs.tolist()
        slots = [slot for slot, changed in zip(candidates, flags, strict=True) if changed]
        if not rows:
            return Diff(first, second, slots, None, None)
        return Diff(first, second, slots, before[differs], after[differs])

    # ----------------------------------------------------------------------- tags and specs

    def resolve(self, spec: int | str) -> int:
        """A version number from an int, a digit string, a tag, "head" or "head~N"."""
        if isinstance(spec, str):
            text = spec.strip()
            if text == "head":
                return self._head
            match = _HEAD_OFFSET.fullmatch(text)
            if match:
                offset = int(match.group(1))
                if offset > self._head:
                    raise VersionNotFoundError(
                        f"'{text}' goes back before version 0 (head is {self._head})."
                    )
                return self._head - offset
            if text.isdigit():
                return self.resolve(int(text))
            raw = self._cf[CF_TAGS].get(text.encode())
            if raw is None:
                known = ", ".join(sorted(self.tags())) or "none"
                raise VersionNotFoundError(
                    f"'{text}' is not a version number, 'head', 'head~N' or a tag (tags: {known})."
                )
            return unpack_u64(raw)
        try:
            version = operator.index(spec)
        except TypeError:
            raise VersionNotFoundError(
                f"{spec!r} is not a version: pass an int, a tag name, 'head' or 'head~N'."
            ) from None
        if isinstance(spec, bool) or not 0 <= version <= self._head:
            raise VersionNotFoundError(
                f"version {spec!r} does not exist: versions run from 0 to {self._head}."
            )
        return version

    def tag(self, name: str, version: int | str) -> None:
        """Point tag `name` at `version` (moving it if it exists)."""
        self._check_writable()
        if (
            not isinstance(name, str)
            or not _TAG_NAME.fullmatch(name)
            or name == "head"
            or name.isdigit()
        ):
            raise ValidationError(
                f"{name!r} cannot be a tag name: use 1-200 letters, digits, '_', '.', '-' or "
                "'/', not all digits and not 'head'."
            )
        resolved = self.resolve(version)
        with self._write_lock:
            self._cf[CF_TAGS].put(name.encode(), pack_u64(resolved), self._synced)

    def delete_tag(self, name: str) -> None:
        """Remove a tag; the version it named is untouched."""
        self._check_writable()
        if self._cf[CF_TAGS].get(name.encode()) is None:
            raise VersionNotFoundError(f"there is no tag {name!r} (tags: {self.tags()}).")
        with self._write_lock:
            self._cf[CF_TAGS].delete(name.encode(), self._synced)

    @_reports_disk_damage
    def tags(self) -> dict[str, int]:
        return {key.decode(): unpack_u64(raw) for key, raw in _scan(self._cf[CF_TAGS])}

    # ---------------------------------------------------------------------------- compaction

    @_reports_disk_damage
    def compact(self, keep_from: int | str) -> dict:
        """Drop row history older than `keep_from`; every version >= keep_from reads as before.

        For each slot, the newest row at or below keep_from is folded into the base chunks and
        all its older rows are deleted, in one synced batch. Records are kept, so `log` and
        `show` still list the compacted versions; reading their rows raises CompactedError.
        """
        self._check_writable()
        with self._write_lock:
            keep = self.resolve(keep_from)
            stats = {
                "keep_from": keep,
                "rows_folded": 0,
                "rows_dropped": 0,
                "chunks_rewritten": 0,
                "oldest_readable": self._oldest_readable,
            }
            if keep <= self._oldest_readable:
                return stats
            folded: dict[int, bytes | memoryview] = {}
            dropped: list[bytes] = []
            for key, value in _scan(self._cf[CF_ROWS]):
                slot, written_at = parse_row_key(key)
                if written_at > keep:
                    continue
                if slot not in folded:  # newest first within a slot
                    folded[slot] = open_row(value, slot, written_at)
                dropped.append(key)
            by_chunk: dict[int, list[int]] = {}
            for slot in folded:
                by_chunk.setdefault(slot // self._chunk_rows, []).append(slot)
            batch = WriteBatch(raw_mode=True)
            row_bytes = self._row_bytes
            for chunk_index, slots in by_chunk.items():
                data = bytearray(open_chunk(self._base_chunk(chunk_index), chunk_index, row_bytes))
                for slot in slots:
                    offset = (slot - chunk_index * self._chunk_rows) * row_bytes
                    data[offset : offset + row_bytes] = folded[slot]
                batch.put(
                    pack_u64(chunk_index),
                    seal_chunk(memoryview(data), row_bytes),
                    self._cf_handle[CF_BASE],
                )
            for key in dropped:
                batch.delete(key, self._cf_handle[CF_ROWS])
            batch.put(META_OLDEST_READABLE, pack_u64(keep))
            self._live_db().write(batch, self._synced)
            self._oldest_readable = keep
            self._cf[CF_ROWS].compact_range(None, None)  # reclaim the dropped rows' space now
            stats.update(
                rows_folded=len(folded),
                rows_dropped=len(dropped),
                chunks_rewritten=len(by_chunk),
                oldest_readable=keep,
            )
            return stats

    # --------------------------------------------------------------- backup, export, import

    def backup(self, dest_dir: str | Path) -> None:
        """A consistent RocksDB checkpoint at `dest_dir`; Store.open(dest_dir) opens it."""
        dest = Path(dest_dir)
        if dest.exists() and any(dest.iterdir()):
            raise StoreError(f"backup destination {dest} is not empty: choose a new folder.")
        dest.mkdir(parents=True, exist_ok=True)
        Checkpoint(self._live_db()).create_checkpoint(str(db_path(dest)))

    def export_version(self, version: int | str, path: str | Path) -> None:
        """Write the table at `version` to a safetensors file (tensor "values")."""
        resolved = self._readable(version)
        table = self.load_table(resolved)
        save_file(
            {EXPORT_TENSOR_NAME: table},
            str(path),
            metadata={
                "memslot.version": str(resolved),
                "memslot.store": str(self._path),
            },
        )

    def import_version(
        self, path: str | Path, *, expected_parent: int, author: str = "", message: str = ""
    ) -> Version:
        """Commit the rows of a safetensors table that differ from the head, as kind "import"."""
        self._check_writable()
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            if names != [EXPORT_TENSOR_NAME]:
                raise ValidationError(
                    f"{path} holds tensors {names}; expected exactly one named "
                    f"'{EXPORT_TENSOR_NAME}' (as written by Store.export_version)."
                )
            table = handle.get_tensor(EXPORT_TENSOR_NAME)
            source_version = (handle.metadata() or {}).get("memslot.version")
        if tuple(table.shape) != self._shape or table.dtype != self._dtype:
            raise ValidationError(
                f"{path} holds a {tuple(table.shape)} {table.dtype} table; this store holds "
                f"{self._shape} {self._dtype}. Convert it before importing."
            )
        with self._write_lock:
            self._check_parent(expected_parent)
            current = self.load_table(self._head)
            differs = (current.view(torch.uint8) != table.view(torch.uint8)).any(dim=1)
            slots = differs.nonzero().flatten().tolist()
            if not slots:
                raise ValidationError(
                    f"{path} equals the head (version {self._head}): nothing to import."
                )
            rows = self._check_rows(table[differs], slots)
            meta = {"source": str(path)}
            if source_version is not None:
                meta["source_version"] = source_version
            return self._write_commit(
                slots, rows, author, message or f"import {path}", "import", meta
            )

    # ---------------------------------------------------------------------------- validation

    def _live_db(self) -> Rdict:
        if self._db is None:
            raise StoreError(f"store {self._path} is closed: open it again with Store.open.")
        return self._db

    def _check_writable(self) -> None:
        self._live_db()
        if self._read_only:
            raise StoreError(
                f"store {self._path} was opened read-only: open it with read_only=False "
                "(in the one process that writes) to change it."
            )

    def _check_parent(self, expected_parent: int) -> None:
        if isinstance(expected_parent, bool) or not isinstance(expected_parent, int):
            raise ValidationError(
                f"expected_parent must be an int version, got {expected_parent!r}: pass the "
                "head you read (store.head)."
            )
        if expected_parent != self._head:
            raise ConflictError(
                f"expected parent version {expected_parent} but the head is {self._head}: "
                "another commit landed first. Re-read the rows at the head and retry with "
                f"expected_parent={self._head}.",
                expected_parent=expected_parent,
                head=self._head,
            )

    def _readable(self, version: int | str) -> int:
        resolved = self.resolve(version)
        if resolved < self._oldest_readable:
            raise CompactedError(
                f"version {resolved} was compacted: its rows are gone and only its record "
                f"remains (oldest readable version is {self._oldest_readable}). Read version "
                f"{self._oldest_readable} or later, or open a backup taken before compaction."
            )
        return resolved

    def _check_slots(self, slots: SlotsLike, *, for_commit: bool) -> list[int]:
        if isinstance(slots, torch.Tensor | np.ndarray):
            if slots.ndim != 1 or not _is_integer_array(slots):
                raise ValidationError(
                    f"slots must be a 1-D integer tensor or a list of ints, got a {slots.ndim}-D "
                    f"{slots.dtype} array."
                )
            slot_list = slots.tolist()
        elif isinstance(slots, list) and set(map(type, slots)) <= {int}:
            slot_list = list(slots)  # plain ints: nothing to convert (the common case)
        else:
            try:
                slot_list = [_as_slot(slot) for slot in slots]
            except TypeError as exc:
                raise ValidationError(f"slots must be ints: {exc}") from None
        n_slots = self._shape[0]
        if slot_list and (min(slot_list) < 0 or max(slot_list) >= n_slots):
            bad = [slot for slot in slot_list if not 0 <= slot < n_slots]
            raise ValidationError(
                f"slot {bad[0]} is out of range: this store has slots 0..{n_slots - 1} "
                f"({len(bad)} slot(s) out of range)."
            )
        if for_commit:
            if not slot_list:
                raise ValidationError(
                    "empty commit: pass at least one slot and its row (a version must change "
                    "something)."
                )
            if len(set(slot_list)) != len(slot_list):
                seen: set[int] = set()
                duplicate = next(s for s in slot_list if s in seen or seen.add(s))
                raise ValidationError(
                    f"slot {duplicate} appears more than once in one commit: merge the rows so "
                    "each slot is written once."
                )
        return slot_list

    def _check_rows(self, rows: torch.Tensor, slots: list[int]) -> torch.Tensor:
        if not isinstance(rows, torch.Tensor):
            raise ValidationError(f"rows must be a torch.Tensor, got {type(rows).__name__}.")
        expected = (len(slots), self._shape[1])
        if tuple(rows.shape) != expected:
            raise ValidationError(
                f"rows have shape {tuple(rows.shape)} but {len(slots)} slot(s) of a "
                f"dim-{self._shape[1]} table need shape {expected}."
            )
        if rows.dtype != self._dtype:
            raise ValidationError(
                f"rows have dtype {rows.dtype} but the store holds {self._dtype}: convert with "
                f"rows.to({self._dtype}) before committing."
            )
        rows = rows.detach().to("cpu").contiguous()
        nonfinite = nonfinite_rows(rows)
        if bool(nonfinite.any()):
            bad = [slots[i] for i in np.flatnonzero(nonfinite).tolist()]
            raise ValidationError(
                f"rows for slot(s) {bad[:10]} contain NaN or Inf: the store only holds finite "
                "values. Fix the edit that produced them."
            )
        return rows

    def _check_out(self, out: torch.Tensor) -> None:
        if (
            not isinstance(out, torch.Tensor)
            or tuple(out.shape) != self._shape
            or out.dtype != self._dtype
            or out.device.type != "cpu"
            or not out.is_contiguous()
        ):
            described = (
                f"{tuple(out.shape)} {out.dtype} on {out.device}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise ValidationError(
                f"out must be a contiguous CPU tensor of shape {self._shape} and dtype "
                f"{self._dtype}, got {described}."
            )


def _scan(
    column_family: Rdict,
    *,
    from_key: bytes | None = None,
    read_options: ReadOptions | None = None,
) -> Iterator[tuple[bytes, bytes]]:
    """Keys and values of a column family in key order, from `from_key` if given.

    Unlike ``Rdict.items``, which ends quietly when a read fails (a damaged block, say), this
    raises RocksDB's error: a compaction or a table load must never mistake damage for the end.
    """
    rows_iter = column_family.iter(read_opt=read_options)
    try:
        if from_key is None:
            rows_iter.seek_to_first()
        else:
            rows_iter.seek(from_key)
        while rows_iter.valid():
            yield rows_iter.key(), rows_iter.value()
            rows_iter.next()
        rows_iter.status()
    finally:
        del rows_iter  # a traceback must not keep the database open after close()


def _check_table(table: torch.Tensor) -> None:
    if not isinstance(table, torch.Tensor):
        raise ValidationError(f"table must be a torch.Tensor, got {type(table).__name__}.")
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValidationError(
            f"table must be 2-D (n_slots, dim) with both sizes > 0, got shape {tuple(table.shape)}."
        )
    if table.dtype not in SUPPORTED_DTYPES.values():
        raise ValidationError(
            f"table dtype {table.dtype} is not supported: use float32, float16 or bfloat16."
        )
    for start in range(0, table.shape[0], 1 << 16):  # bounded temporaries for huge tables
        nonfinite = nonfinite_rows(table[start : start + (1 << 16)].contiguous())
        if bool(nonfinite.any()):
            first = start + int(np.flatnonzero(nonfinite)[0])
            raise ValidationError(
                f"table row {first} contains NaN or Inf: the store only holds finite values."
            )


def _check_text_fields(**fields: str) -> None:
    for name, value in fields.items():
        if not isinstance(value, str):
            raise ValidationError(f"{name} must be a str, got {type(value).__name__}.")
    if not fields.get("kind", "x"):
        raise ValidationError("kind must not be empty: use e.g. 'write'.")


def _check_meta(meta: dict | None) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ValidationError(f"meta must be a dict, got {type(meta).__name__}.")
    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"meta must be JSON-serialisable: {exc}.") from None


def _as_slot(slot: object) -> int:
    if isinstance(slot, bool | float):
        raise TypeError(f"{slot!r} is not an integer slot")
    return operator.index(slot)


def _is_integer_array(array: torch.Tensor | np.ndarray) -> bool:
    if isinstance(array, torch.Tensor):
        return (
            not array.is_floating_point() and not array.is_complex() and array.dtype != torch.bool
        )
    return np.issubdtype(array.dtype, np.integer)
