"""Byte-level BPE tokenizer, trained with Hugging Face `tokenizers` and saved beside the model."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIALS = [PAD, BOS, EOS]


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.pad_id = hf.token_to_id(PAD)
        self.bos_id = hf.token_to_id(BOS)
        self.eos_id = hf.token_to_id(EOS)
        if None in (self.pad_id, self.bos_id, self.eos_id):
            raise ValueError(f"tokenizer lacks one of the special tokens {SPECIALS}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return self.hf.decode([i for i in ids if i not in specials])

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each token as the text it stands for (for tables of what a prompt reads)."""
        return [self.hf.decode([i]) for i in ids]

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(HFTokenizer.from_file(str(path)))
