"""A decoder-only transformer whose chosen layers use a product-key memory instead of an FFN.

RMSNorm, rotary positions, causal attention through ``scaled_dot_product_attention`` and SwiGLU
FFNs, in the style of Llama. All memory layers share one value table, ``memory_values``: it is
the only part of the model that memslot versions and edits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from memslot.model.config import ModelConfig
from memslot.model.memory import Lookup, PatchedValues, ProductKeyMemory


class PromptTooLongError(ValueError):
    """A sequence longer than the model's positional range; the message gives the limit."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)  # (L, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (T, hd/2). Rotate (even, odd) pairs.
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


@dataclass
class KVCache:
    """Per-layer keys and values of the tokens seen so far, for incremental decoding."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            if cache.keys[layer] is not None:
                k = torch.cat([cache.keys[layer], k], dim=2)  # (B, nh, past+T, hd)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # new token t (absolute position past+t) may see keys 0..past+t
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_memory = index in cfg.memory.layers
        if self.is_memory:
            self.ffn = ProductKeyMemory(cfg.d_model, cfg.value_dim, cfg.memory, index)
        elif cfg.ffn_hidden > 0:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        else:
            self.ffn = None  # an attention-only block

    def forward(
        self, x, cos, sin, values, cache, sparse_grad, topk=None
    ) -> tuple[torch.Tensor, Lookup | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, self.index)
        if self.is_memory:
            y, lookup = self.ffn(self.ffn_norm(x), values, sparse_grad, topk)
            return x + y, lookup
        if self.ffn is None:
            return x, None
        return x + self.ffn(self.ffn_norm(x)), None


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)
    lookups: list[Lookup]  # one per memory layer, in layer order


class MemoryTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # The one value table shared by every memory layer: (n_slots, value_dim).
        self.memory_values = nn.Parameter(
            torch.randn(cfg.memory.n_slots, cfg.value_dim) * cfg.value_dim**-0.5
        )
        cos, sin = rotary_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def new_cache(self) -> KVCache:
        n = self.cfg.n_layers
        return KVCache(keys=[None] * n, values=[None] * n)

    def frozen_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight except the value table: what a checkpoint freezes."""
        return {k: v for k, v in self.state_dict().items() if k != "memory_values"}

    # ---- the editor's split at the first memory layer ------------------------------------------

    @property
    def first_memory_block(self) -> Block:
        return next(b for b in self.blocks if b.is_memory)

    @property
    def memory_is_last(self) -> bool:
        """True when the model's only memory layer is its last block. Then everything from the
        memory sublayer on (it, the final norm and the head) works on each position alone, and
        an editor can score a sequence from its target positions' ``memory_entry`` rows."""
        memory = [b.index for b in self.blocks if b.is_memory]
        return memory == [len(self.blocks) - 1]

    def memory_entry(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D): the residual stream where the first memory layer reads it, after its
        block's attention. Nothing before that point reads the value table, so it stays the
        same however the table is edited."""
        T = tokens.shape[1]
        if T > self.cfg.max_seq_len:
            raise PromptTooLongError(
                f"sequence of {T} tokens exceeds the model's limit of {self.cfg.max_seq_len}"
            )
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(tokens)
        for block in self.blocks:
            if block.is_memory:
                return x + block.attn(block.attn_norm(x), cos, sin, None, block.index)
            x, _ = block(x, cos, sin, None, None, False)
        raise ValueError("this model has no memory layer")

    def memory_read(self, x: torch.Tensor, topk: int | None = None):
        """(slots, weights), each (N, H, k), that the memory layer reads for ``memory_entry``
        rows x (..., D), ``topk`` per head (None: the model's own k)."""
        block = self.first_memory_block
        return block.ffn.lookup(block.ffn_norm(x), topk)

    def memory_exit(
        self,
        x: torch.Tensor,
        values: torch.Tensor | PatchedValues,
        slots: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (N, vocab) of ``memory_entry`` rows x (N, D) reading ``slots`` with ``weights``
        (``memory_read``) from ``values``, for a model whose memory layer is its last block
        (``memory_is_last``)."""
        block = self.first_memory_block
        y = block.ffn.read(block.ffn_norm(x), values, slots, weights)
        return self.lm_head(self.norm(x + y))

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        values: torch.Tensor | None = None,
        sparse_grad: bool = False,
        memory_topk: int | None = None,
    ) -> ModelOutput:
        """tokens: (B, T) int64. ``values`` overrides the table (the editor passes a patched one);
        ``memory_topk`` overrides how many slots each memory head reads."""
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise PromptTooLongError(
                f"sequence of {start + T} tokens exceeds the model's limit of "
                f"{self.cfg.max_seq_len} (max_seq_len); shorten the prompt or max_tokens"
            )
        cos = self.rope_cos[start : start + T]
        sin = self.rope_sin[start : start + T]
        table = self.memory_values if values is None else values
        x = self.embed(tokens)  # (B, T, C)
        lookups = []
        for block in self.blocks:
            x, lookup = block(x, cos, sin, table, cache, sparse_grad, memory_topk)
            if lookup is not None:
                lookups.append(lookup)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        return ModelOutput(logits, lookups)
