"""Decoding with a KV cache: greedy or sampled, stopping at the end token or a token limit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memslot.model.tokenizer import Tokenizer
from memslot.model.transformer import MemoryTransformer, PromptTooLongError


@dataclass
class Generation:
    text: str  # the decoded continuation (prompt excluded, special tokens dropped)
    tokens: list[int]  # the generated token ids, the end token included if it was produced
    stopped_at_eos: bool


def encode_prompt(model: MemoryTransformer, tokenizer: Tokenizer, prompt: str) -> list[int]:
    if not prompt:
        raise ValueError("prompt is empty: give the text the model should continue")
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    limit = model.cfg.max_seq_len
    if len(ids) >= limit:
        raise PromptTooLongError(
            f"prompt is {len(ids)} tokens; this model reads at most {limit - 1} "
            f"(max_seq_len {limit}, one position kept for the answer): shorten it"
        )
    return ids


@torch.no_grad()
def generate(
    model: MemoryTransformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Generation:
    """Continue ``prompt``. temperature 0 is greedy; otherwise sample (optionally from the top_k).

    Generation stops at the end token, at ``max_new_tokens``, or where the model's positional
    range ends, whichever comes first.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    ids = encode_prompt(model, tokenizer, prompt)
    device = model.memory_values.device
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    budget = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
    out: list[int] = []
    cache = model.new_cache() if use_cache else None
    step_input = torch.tensor([ids], device=device)
    for _ in range(budget):
        if cache is None:
            step_input = torch.tensor([ids + out], device=device)
        logits = model(step_input, cache=cache).logits[0, -1].float()  # (vocab,)
        next_id = pick_token(logits, temperature, top_k, generator)
        out.append(next_id)
        if next_id == tokenizer.eos_id:
            break
        step_input = torch.tensor([[next_id]], device=device)
    stopped = bool(out) and out[-1] == tokenizer.eos_id
    return Generation(tokenizer.decode(out).strip(), out, stopped)


def pick_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
