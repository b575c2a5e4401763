"""The store's error vocabulary: every failure a caller can act on has its own type.

All errors subclass :class:`StoreError`, so a server can catch one type and still tell a
conflict (retry against the new head) from a validation error (fix the request) from
corruption (restore a backup).
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by memslot.memstore."""


class ConflictError(StoreError):
    """A commit named an expected parent that is no longer the head (compare-and-set lost)."""

    def __init__(self, message: str, *, expected_parent: int, head: int) -> None:
        super().__init__(message)
        self.expected_parent = expected_parent
        self.head = head


class ValidationError(StoreError):
    """Rows, slots or arguments were rejected before anything was written."""


class VersionNotFoundError(StoreError):
    """A version number, tag or 'head~N' spec does not name an existing version."""


class CompactedError(StoreError):
    """The rows of a version were dropped by compaction; only its record remains."""


class StoreInUseError(StoreError):
    """Another process holds the store open for writing (RocksDB allows a single writer)."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class CorruptionError(StoreError):
    """Stored bytes no longer match their checksum: the store must not serve them."""
