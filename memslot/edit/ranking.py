"""Which slots an edit should change: TF-IDF over slot reads, as in sparse memory fine-tuning.

"Continual Learning via Sparse Memory Finetuning" (Lin et al., 2025) updates only the slots
that the new text reads much more than background text does. TF is how strongly the edit's
target positions read a slot (summed softmax weights over layers and heads); IDF is
log((tokens + 1) / (reads in the background corpus + 1)), from the slot usage recorded at
training time. Slots every sentence reads (function-word slots) rank low, so edits leave them
alone and unrelated answers keep working.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memslot.model.memory import Lookup


@dataclass
class RankedSlot:
    slot: int
    score: float  # TF-IDF
    layer: int  # the memory layer that read it most strongly
    head: int  # and its head there


def idf_weights(usage: torch.Tensor, tokens: int) -> torch.Tensor:
    """IDF per slot from background counts (n_memory_layers, n_slots) or (n_slots,)."""
    counts = usage.sum(0) if usage.dim() == 2 else usage
    return torch.log((tokens + 1.0) / (counts.double() + 1.0)).float()


def rank_slots(
    lookups: list[Lookup],
    row: int,
    positions: list[int],
    idf: torch.Tensor | None,
    limit: int | None,
) -> list[RankedSlot]:
    """Slots read at ``positions`` of batch row ``row``, best first; ``idf=None`` ranks by TF."""
    tf: dict[int, float] = {}
    best: dict[int, tuple[float, int, int]] = {}
    for lookup in lookups:
        slots = lookup.slots[row, positions].cpu()  # (P, H, k)
        weights = lookup.weights[row, positions].cpu()  # (P, H, k)
        heads = torch.arange(slots.shape[1]).view(1, -1, 1).expand_as(slots)
        for slot, weight, head in zip(
            slots.flatten().tolist(),
            weights.flatten().tolist(),
            heads.flatten().tolist(),
            strict=True,
        ):
            tf[slot] = tf.get(slot, 0.0) + weight
            if weight > best.get(slot, (-1.0, 0, 0))[0]:
                best[slot] = (weight, lookup.layer, head)
    scored = []
    for slot, t in tf.items():
        score = t * float(idf[slot]) if idf is not None else t
        scored.append(RankedSlot(slot, score, best[slot][1], best[slot][2]))
    scored.sort(key=lambda r: (-r.score, r.slot))
    return scored if limit is None else scored[:limit]
