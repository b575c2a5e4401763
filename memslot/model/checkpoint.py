"""Checkpoints: frozen weights (safetensors), config.json, tokenizer.json, and the value table
saved apart in values.safetensors, since the value table is what the store versions.

A model folder holds:
    config.json            ModelConfig
    model.safetensors      every weight except the value table (frozen)
    values.safetensors     the value table the model shipped with ("values")
    tokenizer.json         the byte-level BPE tokenizer
    slot_usage.safetensors background read counts per slot, per memory layer (for the editor)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memslot.model.config import ModelConfig
from memslot.model.tokenizer import Tokenizer
from memslot.model.transformer import MemoryTransformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
VALUES = "values.safetensors"
TOKENIZER = "tokenizer.json"
SLOT_USAGE = "slot_usage.safetensors"
ANCHORS = "anchors.json"  # optional: known facts that edits should not change


class CheckpointError(FileNotFoundError):
    """A model folder that is missing a file; the message names it."""


def save_model(model: MemoryTransformer, tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.cfg.save(out / CONFIG)
    frozen = {k: v.detach().contiguous().cpu() for k, v in model.frozen_state_dict().items()}
    save_file(frozen, str(out / WEIGHTS))
    save_values(model.memory_values.detach(), out / VALUES)
    tokenizer.save(out / TOKENIZER)
    return out


def save_values(values: torch.Tensor, path: str | Path) -> None:
    save_file({"values": values.detach().contiguous().cpu()}, str(path))


def load_values(path: str | Path) -> torch.Tensor:
    return load_file(str(path))["values"]


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.exists():
        raise CheckpointError(
            f"{path} is missing: {folder} is not a complete memslot model folder "
            "(build the demo model with `memslot train-demo`)"
        )
    return path


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", values: torch.Tensor | None = None
) -> tuple[MemoryTransformer, Tokenizer]:
    """Load a model folder; ``values`` replaces the shipped value table (e.g. a store version)."""
    folder = Path(model_dir)
    cfg = ModelConfig.load(_require(folder, CONFIG))
    model = MemoryTransformer(cfg)
    state = load_file(str(_require(folder, WEIGHTS)))
    state["memory_values"] = values if values is not None else load_values(_require(folder, VALUES))
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    model.eval()
    tokenizer = Tokenizer.load(_require(folder, TOKENIZER))
    return model.to(device), tokenizer


def save_slot_usage(counts: torch.Tensor, tokens: int, path: str | Path) -> None:
    save_file({"counts": counts.contiguous(), "tokens": torch.tensor([tokens])}, str(path))


def load_slot_usage(model_dir: str | Path) -> tuple[torch.Tensor, int]:
    """(counts (n_memory_layers, n_slots) int64, number of tokens counted)."""
    data = load_file(str(_require(Path(model_dir), SLOT_USAGE)))
    return data["counts"], int(data["tokens"][0])


def save_anchors(pairs: list[tuple[str, str]], path: str | Path) -> None:
    """Known (prompt, answer) pairs of the model: edits rehearse those that read the rows they
    change, so that unrelated knowledge keeps its answers."""
    Path(path).write_text(json.dumps({"anchors": [list(p) for p in pairs]}, indent=0))


def load_anchors(model_dir: str | Path) -> list[tuple[str, str]]:
    """The model folder's anchors, or [] for a folder without them."""
    path = Path(model_dir) / ANCHORS
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        return [(str(p), str(a)) for p, a in data["anchors"]]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not an anchors file ({err}); rebuild the model") from err
