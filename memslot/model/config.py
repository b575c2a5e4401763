"""Model and memory-layer configuration: plain dataclasses with a JSON round-trip."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration that cannot describe a working model; the message says what to change."""


@dataclass
class MemoryConfig:
    n_keys: int = 256  # sub-keys per half; the table has n_keys**2 slots
    heads: int = 4  # independent query heads, each with its own product keys
    topk: int = 8  # slots read per head per token (also the per-half candidate count)
    k_dim: int = 64  # query/key dimension per head, split into two halves of k_dim // 2
    value_dim: int = 0  # width of a value row; 0 means "the model dimension"
    qk_norm: bool = (
        True  # RMS-normalise query and key halves (Memory+ paper; off in the released code)
    )
    layers: tuple[int, ...] = (1, 3)  # transformer layers whose FFN is replaced by the memory layer

    @property
    def n_slots(self) -> int:
        return self.n_keys * self.n_keys

    def validate(self, d_model: int, n_layers: int) -> None:
        if not isinstance(self.n_keys, int) or isinstance(self.n_keys, bool) or self.n_keys < 1:
            raise ConfigError(f"memory.n_keys must be a positive integer, got {self.n_keys!r}")
        if not isinstance(self.topk, int) or self.topk < 1:
            raise ConfigError(f"memory.topk must be a positive integer, got {self.topk!r}")
        if self.topk > self.n_keys:
            raise ConfigError(
                f"memory.topk ({self.topk}) is larger than memory.n_keys ({self.n_keys}): "
                "each half can offer at most n_keys candidates; lower topk or raise n_keys"
            )
        if not isinstance(self.heads, int) or self.heads < 1:
            raise ConfigError(f"memory.heads must be a positive integer, got {self.heads!r}")
        if not isinstance(self.k_dim, int) or self.k_dim < 2 or self.k_dim % 2:
            raise ConfigError(
                f"memory.k_dim must be an even integer >= 2 (it is split in two halves), "
                f"got {self.k_dim!r}"
            )
        if self.value_dim < 0:
            raise ConfigError(
                f"memory.value_dim must be >= 0 (0 = model dim), got {self.value_dim}"
            )
        for layer in self.layers:
            if not 0 <= layer < n_layers:
                raise ConfigError(
                    f"memory layer index {layer} is outside the model's layers 0..{n_layers - 1}"
                )
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"memory.layers has duplicates: {list(self.layers)}")


@dataclass
class ModelConfig:
    vocab_size: int = 2048  # tokenizer vocabulary, special tokens included
    d_model: int = 128  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads; must divide d_model
    ffn_hidden: int = 256  # SwiGLU hidden width of the dense FFN layers; 0 = attention-only blocks
    max_seq_len: int = 64  # longest prompt + generation the rotary table covers
    rope_theta: float = 10000.0  # rotary base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        if isinstance(self.memory, dict):
            mem = dict(self.memory)
            mem["layers"] = tuple(mem.get("layers", ()))
            self.memory = MemoryConfig(**mem)
        self.memory.layers = tuple(self.memory.layers)
        self.validate()

    @property
    def value_dim(self) -> int:
        return self.memory.value_dim or self.d_model

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.ffn_hidden, int) or self.ffn_hidden < 0:
            raise ConfigError(f"ffn_hidden must be an integer >= 0, got {self.ffn_hidden!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}); "
                f"pick one of {[h for h in range(1, 17) if self.d_model % h == 0]}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"the attention head dim d_model/n_heads = {self.d_model // self.n_heads} must be "
                "even for rotary embeddings"
            )
        self.memory.validate(self.d_model, self.n_layers)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["memory"]["layers"] = list(self.memory.layers)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
