"""Turning a user's intent into new value-table rows: writes, and sparse memory fine-tuning."""

from memslot.edit.editor import EditConfig, Editor, EditResult, FactReport
from memslot.edit.ranking import RankedSlot, idf_weights, rank_slots
from memslot.edit.write import EditError, WriteMode, check_slots, write_rows

__all__ = [
    "EditConfig",
    "EditError",
    "EditResult",
    "Editor",
    "FactReport",
    "RankedSlot",
    "WriteMode",
    "check_slots",
    "idf_weights",
    "rank_slots",
    "write_rows",
]
