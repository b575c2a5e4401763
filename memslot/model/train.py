"""Training loop for memory-layer models (the demo model and benchmarks), CPU or CUDA.

Sequences are ``[bos] prompt answer [eos]``; the loss covers every next-token prediction, with
the prompt's tokens weighted down (``prompt_weight``) so that facts, not the unpredictable
entity names, drive the gradient. The
value table gets its own (higher) learning rate, as memory layers want, and sparse gradients
so that a step only touches the rows it read.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memslot.model.tokenizer import Tokenizer
from memslot.model.transformer import MemoryTransformer


@dataclass
class TrainConfig:
    steps: int = 2000  # optimizer steps
    batch_size: int = 64  # sequences per step
    lr: float = 3e-3  # peak learning rate of the dense weights (AdamW)
    values_lr: float = 3e-2  # peak learning rate of the value table (sparse Adam)
    weight_decay: float = 0.0  # AdamW decay of the dense weights
    warmup: int = 50  # linear warm-up steps, then cosine decay to 10% of the peak
    seed: int = 0
    time_budget_s: float | None = None  # stop early (after a whole step) once this is spent


@dataclass
class Sequences:
    """Token sequences and, per position, the loss weight of predicting the next token."""

    tokens: list[list[int]]
    weights: list[list[float]]


def encode_examples(
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[str, str]],
    answer_weight: float = 1.0,
    prompt_weight: float = 1.0,
) -> Sequences:
    """(prompt, answer) pairs -> ``[bos] prompt " "answer [eos]`` with next-token loss weights."""
    tokens, weights = [], []
    for prompt, answer in pairs:
        head = [tokenizer.bos_id] + tokenizer.encode(prompt)
        tail = tokenizer.encode(" " + answer) + [tokenizer.eos_id]
        seq = head + tail
        # weight[i] is for predicting seq[i + 1] from position i
        w = [prompt_weight] * (len(head) - 1) + [answer_weight] * len(tail)
        tokens.append(seq)
        weights.append(w)
    return Sequences(tokens, weights)


def collate(
    seqs: Sequences, idx: Sequence[int], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs (B, T), targets (B, T), weights (B, T)); padding carries weight 0."""
    length = max(len(seqs.tokens[i]) for i in idx) - 1
    inputs = torch.full((len(idx), length), pad_id, dtype=torch.long)
    targets = torch.full((len(idx), length), pad_id, dtype=torch.long)
    weights = torch.zeros(len(idx), length)
    for row, i in enumerate(idx):
        seq = seqs.tokens[i]
        n = len(seq) - 1
        inputs[row, :n] = torch.tensor(seq[:-1])
        targets[row, :n] = torch.tensor(seq[1:])
        weights[row, :n] = torch.tensor(seqs.weights[i])
    return inputs.to(device), targets.to(device), weights.to(device)


def weighted_loss(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    per_token = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), reduction="none"
    ).view_as(weights)
    return (per_token * weights).sum() / weights.sum().clamp_min(1e-9)


def lr_factor(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10%. With a time budget, progress is whichever is
    further along, steps or seconds, so a run cut short by a slow machine still anneals."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.time_budget_s:
        progress = max(progress, elapsed_s / cfg.time_budget_s)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: MemoryTransformer,
    seqs: Sequences,
    pad_id: int,
    cfg: TrainConfig,
    progress: bool = True,
) -> dict:
    """Train ``model`` in place; returns a summary (steps, final loss, seconds)."""
    device = model.memory_values.device
    model.train()
    model.requires_grad_(True)
    dense = [p for n, p in model.named_parameters() if n != "memory_values"]
    opt_dense = torch.optim.AdamW(
        dense, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )
    opt_values = torch.optim.SparseAdam([model.memory_values], lr=cfg.values_lr, betas=(0.9, 0.95))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    start = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="training", unit="step", disable=not progress)
    step = 0
    for step in bar:
        if len(order) < cfg.batch_size:
            fresh = list(range(len(seqs.tokens)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
        inputs, targets, weights = collate(seqs, batch, pad_id, device)
        factor = lr_factor(step, cfg, time.perf_counter() - start)
        for group in opt_dense.param_groups:
            group["lr"] = cfg.lr * factor
        for group in opt_values.param_groups:
            group["lr"] = cfg.values_lr * factor
        logits = model(inputs, sparse_grad=True).logits
        loss = weighted_loss(logits, targets, weights)
        opt_dense.zero_grad(set_to_none=True)
        opt_values.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, 1.0)
        opt_dense.step()
        opt_values.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            break
    bar.close()
    model.eval()
    model.requires_grad_(False)
    tail = losses[-50:] or [float("nan")]
    return {
        "steps": step + 1,
        "final_loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def count_slot_usage(
    model: MemoryTransformer, seqs: Sequences, pad_id: int, batch_size: int = 256
) -> tuple[torch.Tensor, int]:
    """How often each slot is read over ``seqs``: (n_memory_layers, n_slots) int64, tokens."""
    device = model.memory_values.device
    n_layers = len(model.cfg.memory.layers)
    counts = torch.zeros(n_layers, model.cfg.memory.n_slots, dtype=torch.long, device=device)
    tokens = 0
    for lo in range(0, len(seqs.tokens), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(seqs.tokens))))
        inputs, _, _ = collate(seqs, idx, pad_id, device)
        real = inputs != pad_id  # (B, T)
        tokens += int(real.sum())
        for i, lookup in enumerate(model(inputs).lookups):
            slots = lookup.slots[real]  # (n_real, H, k)
            counts[i] += torch.bincount(slots.flatten(), minlength=counts.shape[1])
    return counts.cpu(), tokens


@torch.no_grad()
def exact_match(
    model: MemoryTransformer,
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 256,
    values: torch.Tensor | None = None,
) -> list[bool]:
    """Whether greedy decoding of each prompt yields exactly `` answer`` then the end token.

    Computed in one teacher-forced pass per batch: greedy decoding produces the answer's tokens
    and then stops iff the argmax at every answer position is the next answer token and the
    argmax after the answer is the end token. (tests/test_model.py checks this against real
    decoding.)
    """
    seqs = encode_examples(tokenizer, pairs)
    device = model.memory_values.device
    results = []
    for lo in range(0, len(pairs), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(pairs))))
        inputs, targets, _ = collate(seqs, idx, tokenizer.pad_id, device)
        logits = model(inputs, values=values).logits
        predicted = logits.argmax(-1)  # (B, T)
        for row, i in enumerate(idx):
            n_prompt = len(tokenizer.encode(pairs[i][0])) + 1  # with bos
            n = len(seqs.tokens[i]) - 1
            ok = bool((predicted[row, n_prompt - 1 : n] == targets[row, n_prompt - 1 : n]).all())
            results.append(ok)
    return results
