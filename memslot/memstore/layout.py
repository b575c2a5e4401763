"""How a store lays its bytes out in RocksDB: keys, sealed (checksummed) values, dtypes.

Column families:

- ``default`` (meta): ``format`` (JSON: shape, dtype, chunk_rows), ``head`` and
  ``oldest_readable`` (big-endian u64).
- ``base``: the table at version ``oldest_readable`` (0 until the first compaction), as chunks
  of ``chunk_rows`` contiguous rows keyed by chunk index. Big values make loading the whole
  table a few thousand sequential reads instead of a million.
- ``rows``: rows written by commits after the base, keyed ``slot (u64 BE) + ~version (u64 BE)``
  so that, within a slot, newer versions sort first: "the newest row at or below v" is a single
  seek to ``(slot, ~v)``.
- ``commits``: ``version (u64 BE)`` -> the JSON commit record.
- ``tags``: ``name`` (UTF-8) -> version (u64 BE).

Every value that holds row bytes is sealed with CRC-32 checksums so that a flipped bit raises
:class:`CorruptionError` instead of serving wrong numbers. A chunk carries one checksum over the
whole value (checked when loading the table) and one per row (checked when reading single rows).
"""

from __future__ import annotations

import struct
import zlib

import torch

from memslot.memstore.errors import CorruptionError

CF_BASE = "base"
CF_ROWS = "rows"
CF_COMMITS = "commits"
CF_TAGS = "tags"
COLUMN_FAMILIES = (CF_BASE, CF_ROWS, CF_COMMITS, CF_TAGS)

META_FORMAT = b"format"
META_HEAD = b"head"
META_OLDEST_READABLE = b"oldest_readable"
FORMAT_VERSION = 1

# About 1 MiB per base chunk: large enough that loading streams at file speed, small enough
# that reading one untouched row costs one cheap value fetch.
CHUNK_TARGET_BYTES = 1 << 20

SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_U64 = struct.Struct(">Q")
_ROW_KEY = struct.Struct(">QQ")
_CRC = struct.Struct(">I")
_MAX_U64 = (1 << 64) - 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(raw: bytes) -> int:
    return _U64.unpack(raw)[0]


def row_key(slot: int, version: int) -> bytes:
    return _ROW_KEY.pack(slot, _MAX_U64 - version)


def parse_row_key(key: bytes) -> tuple[int, int]:
    slot, inverted_version = _ROW_KEY.unpack(key)
    return slot, _MAX_U64 - inverted_version


def checksum_text(data: bytes | memoryview) -> str:
    """The checksum a commit record carries: CRC-32 over its rows in commit order."""
    return f"crc32:{zlib.crc32(data):08x}"


def as_bytes_view(table: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor, without copying (works for bf16 too)."""
    return memoryview(table.reshape(-1).view(torch.uint8).numpy())


def seal_row(row: bytes | memoryview) -> bytes:
    return _CRC.pack(zlib.crc32(row)) + row


def open_row(value: bytes, slot: int, version: int) -> memoryview:
    """Verify a sealed row and return its bytes."""
    row = memoryview(value)[_CRC.size :]
    if zlib.crc32(row) != _CRC.unpack_from(value)[0]:
        raise CorruptionError(
            f"row of slot {slot} written at version {version} fails its checksum: the store "
            "is damaged. Restore it from a backup (Store.backup) and do not serve this version."
        )
    return row


def seal_chunk(rows: memoryview, row_bytes: int) -> bytes:
    """Seal a run of rows: [crc of the rest][crc of each row][row bytes]."""
    n_rows = len(rows) // row_bytes
    row_crcs = [zlib.crc32(rows[i * row_bytes : (i + 1) * row_bytes]) for i in range(n_rows)]
    body = struct.pack(f">{n_rows}I", *row_crcs) + rows
    return _CRC.pack(zlib.crc32(body)) + body


def open_chunk(value: bytes, chunk_index: int, row_bytes: int) -> memoryview:
    """Verify a whole sealed chunk and return its row bytes (used when loading the table)."""
    body = memoryview(value)[_CRC.size :]
    if zlib.crc32(body) != _CRC.unpack_from(value)[0]:
        raise CorruptionError(
            f"base chunk {chunk_index} fails its checksum: the store is damaged. Restore it "
            "from a backup (Store.backup)."
        )
    n_rows = len(body) // (row_bytes + _CRC.size)
    return body[n_rows * _CRC.size :]


def open_chunk_row(value: bytes, chunk_index: int, row_in_chunk: int, row_bytes: int) -> bytes:
    """Verify and return one row of a sealed chunk without checking the other rows."""
    n_rows = (len(value) - _CRC.size) // (row_bytes + _CRC.size)
    if not 0 <= row_in_chunk < n_rows:
        raise CorruptionError(f"base chunk {chunk_index} is truncated: restore from a backup.")
    expected = _CRC.unpack_from(value, _CRC.size * (1 + row_in_chunk))[0]
    start = _CRC.size * (1 + n_rows) + row_in_chunk * row_bytes
    row = value[start : start + row_bytes]
    if zlib.crc32(row) != expected:
        raise CorruptionError(
            f"row {row_in_chunk} of base chunk {chunk_index} fails its checksum: the store is "
            "damaged. Restore it from a backup (Store.backup)."
        )
    return row
