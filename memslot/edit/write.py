"""Write and overwrite: set slots to given vectors (SET) or add a delta to them (ADD)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch


class EditError(ValueError):
    """Input an edit cannot act on; the message says what to fix. Nothing was written."""


class WriteMode(str, Enum):
    SET = "set"
    ADD = "add"


def check_slots(slots: Sequence[int] | torch.Tensor, n_slots: int) -> torch.Tensor:
    """Slots as a LongTensor, rejecting an empty list, out-of-range slots and duplicates."""
    slots = torch.as_tensor(slots, dtype=torch.long).flatten()
    if slots.numel() == 0:
        raise EditError("no slots given: name at least one slot to write")
    bad = slots[(slots < 0) | (slots >= n_slots)]
    if bad.numel():
        raise EditError(
            f"slot {int(bad[0])} is out of range: this table has slots 0..{n_slots - 1}"
        )
    if torch.unique(slots).numel() != slots.numel():
        seen, dup = set(), None
        for s in slots.tolist():
            if s in seen:
                dup = s
                break
            seen.add(s)
        raise EditError(f"slot {dup} appears more than once: give each slot one row")
    return slots


def write_rows(
    table: torch.Tensor,
    slots: Sequence[int] | torch.Tensor,
    vectors: torch.Tensor,
    mode: WriteMode | str = WriteMode.SET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New rows for ``slots``: the vectors themselves (SET) or the current rows plus them (ADD).

    Returns (slots, rows) ready to commit; ``table`` is not modified.
    """
    mode = WriteMode(mode)
    slots = check_slots(slots, table.shape[0])
    vectors = torch.as_tensor(vectors)
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.shape != (slots.numel(), table.shape[1]):
        raise EditError(
            f"rows have shape {tuple(vectors.shape)} but {slots.numel()} slot(s) of a table with "
            f"rows of {table.shape[1]} values need shape ({slots.numel()}, {table.shape[1]})"
        )
    if not vectors.is_floating_point():
        raise EditError(f"rows must be floating point, got {vectors.dtype}")
    if not torch.isfinite(vectors).all():
        raise EditError("rows contain NaN or Inf values: every value must be finite")
    vectors = vectors.to(device=table.device, dtype=table.dtype)
    if mode is WriteMode.SET:
        rows = vectors.clone()
    else:
        rows = table[slots.to(table.device)] + vectors
        if not torch.isfinite(rows).all():
            raise EditError("adding these rows overflows the table's dtype; use smaller deltas")
    return slots, rows
