"""memstore: the versioned value table of memslot, kept in RocksDB.

See DESIGN.md, "The store (memstore)", and the module docstring of `store.py` for the
guarantees. Typical use::

    store = Store.create("data/store", table)           # version 0
    v = store.commit([3, 7], rows, expected_parent=store.head, message="fix capital")
    store.read_rows([3], version=v.version - 1)         # rows before the edit
    store.rollback(0)                                     # new version equal to version 0
"""

from memslot.memstore.errors import (
    CompactedError,
    ConflictError,
    CorruptionError,
    StoreError,
    StoreInUseError,
    ValidationError,
    VersionNotFoundError,
)
from memslot.memstore.records import Diff, Version
from memslot.memstore.store import Store

__all__ = [
    "CompactedError",
    "ConflictError",
    "CorruptionError",
    "Diff",
    "Store",
    "StoreError",
    "StoreInUseError",
    "ValidationError",
    "Version",
    "VersionNotFoundError",
]
