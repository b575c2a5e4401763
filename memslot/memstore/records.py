"""Commit records (:class:`Version`) and diffs (:class:`Diff`), and their on-disk encoding.

A record is small JSON so that `log` and `changed_slots` never touch row bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch


@dataclass(frozen=True)
class Version:
    """One committed version of the value table, as `log` and `show` report it."""

    version: int  # 0, 1, 2, ...; version 0 is the table the store was created from
    parent: int | None  # the head this commit was made against; None for version 0
    time: str  # ISO-8601 UTC time of the commit
    author: str
    message: str
    kind: str  # "create", "write", "rollback", "import", ...
    slots: tuple[int, ...]  # slots written by this commit, in commit order; () for version 0
    checksum: str  # "crc32-rows:xxxxxxxx" (CRC-32 of the row CRC-32s); "crc32:" for version 0
    meta: dict = field(default_factory=dict)  # caller's extra metadata; rollbacks add "target"

    def to_bytes(self) -> bytes:
        # Not dataclasses.asdict: it deep-copies every slot and costs ms on large commits.
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Version:
        fields = json.loads(raw)
        fields["slots"] = tuple(fields["slots"])
        return cls(**fields)


@dataclass(frozen=True)
class Diff:
    """Slots whose rows differ between two versions, with the rows when asked for."""

    v1: int
    v2: int
    slots: list[int]  # ascending
    before: torch.Tensor | None  # (len(slots), dim) rows at v1, when rows=True
    after: torch.Tensor | None  # (len(slots), dim) rows at v2, when rows=True


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
