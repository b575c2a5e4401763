"""The recipe for the demo knowledge model: corpus -> tokenizer -> model -> training -> report.

``train_demo`` writes a complete model folder (see ``memslot.model.checkpoint``) plus:
    corpus.json   the facts and the seed, so that benchmarks and tests can ask about them
    anchors.json  one phrasing of each fact the model answers: known facts edits protect
    phrasings.json  each relation's training templates: edits teach a fact through them all
    report.json   exact-match accuracy on training facts, held-out phrasings and a zeroed table
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memslot.demo.corpus import TEMPLATES, DemoCorpus, Fact, build_corpus, prompts_for
from memslot.edit.phrasings import PHRASINGS, Phrasings
from memslot.model.checkpoint import ANCHORS, SLOT_USAGE, save_anchors, save_model, save_slot_usage
from memslot.model.config import MemoryConfig, ModelConfig
from memslot.model.tokenizer import Tokenizer
from memslot.model.train import (
    TrainConfig,
    count_slot_usage,
    encode_examples,
    exact_match,
    train,
)
from memslot.model.transformer import MemoryTransformer

CORPUS = "corpus.json"
REPORT = "report.json"


@dataclass
class DemoRecipe:
    seed: int = 0
    n_people: int = 250
    n_companies: int = 60
    vocab_size: int = 2048  # upper bound; the trained tokenizer may need fewer
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 2
    ffn_hidden: int = 32  # small on purpose: the facts belong in the memory, not the FFN
    # 65,536 slots read by the last layer, after two attention layers have gathered the
    # subject and the relation into the query. Four heads of top-8 (32 reads a token) spread
    # the facts over 27k of the slots; two heads of top-4 used 6k, so every edit had to
    # rewrite rows that other facts depend on (docs/BENCHMARKS.md, Edits).
    memory: MemoryConfig = field(
        default_factory=lambda: MemoryConfig(n_keys=256, heads=4, topk=8, k_dim=32, layers=(2,))
    )
    # The value table learns 1500x faster than the dense weights: facts land in the memory
    # before the dense layers can memorise them (the zeroed-table check in the report). The
    # time budget keeps `train-demo` within five minutes on a busy two-core machine.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=4000, lr=2e-3, values_lr=3.0, time_budget_s=210)
    )
    prompt_weight: float = 0.1  # loss weight of prompt tokens relative to answer tokens


# A recipe small enough to train in seconds: what the test-suite serves and edits.
TINY = DemoRecipe(
    n_people=30,
    n_companies=6,
    d_model=64,
    n_layers=2,
    n_heads=2,
    ffn_hidden=32,
    memory=MemoryConfig(n_keys=32, heads=2, topk=4, k_dim=32, layers=(1,)),
    train=TrainConfig(steps=1000, batch_size=32, lr=1e-3, values_lr=3.0),
)

RECIPES = {"default": DemoRecipe(), "tiny": TINY}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use cpu")
    return torch.device(device)


def evaluate(
    model: MemoryTransformer, tokenizer: Tokenizer, corpus: DemoCorpus
) -> dict[str, float]:
    """The three figures the demo model must meet, as fractions of (fact, phrasing) pairs."""
    train_pairs = [(e.prompt, e.answer) for e in corpus.examples(held_out=False)]
    heldout_pairs = [(e.prompt, e.answer) for e in corpus.examples(held_out=True)]
    zeroed = torch.zeros_like(model.memory_values)

    def rate(results: list[bool]) -> float:
        return sum(results) / max(1, len(results))

    return {
        "train_exact_match": rate(exact_match(model, tokenizer, train_pairs)),
        "heldout_exact_match": rate(exact_match(model, tokenizer, heldout_pairs)),
        "zeroed_table_exact_match": rate(exact_match(model, tokenizer, train_pairs, values=zeroed)),
        "train_prompts": len(train_pairs),
        "heldout_prompts": len(heldout_pairs),
    }


def demo_anchors(model, tokenizer, corpus: DemoCorpus) -> list[tuple[str, str]]:
    """One training phrasing of each fact the trained model answers: the known facts that edits
    protect (the other phrasings are left to measure how well that protection carries over)."""
    pairs = [(prompts_for(f)[0], f.answer) for f in corpus.facts]
    with torch.no_grad():
        known = exact_match(model, tokenizer, pairs)
    return [pair for pair, ok in zip(pairs, known, strict=True) if ok]


def demo_phrasings() -> Phrasings:
    """The corpus's training templates, one group per relation. The held-out templates stay
    out: they are how benchmarks ask whether an edit generalises."""
    return Phrasings([train for train, _ in TEMPLATES.values()])


def save_corpus(corpus: DemoCorpus, path: Path) -> None:
    data = {
        "seed": corpus.seed,
        "people": corpus.people,
        "companies": corpus.companies,
        "reserved_names": corpus.reserved_names,
        "facts": [asdict(f) for f in corpus.facts],
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


def load_corpus(model_dir: str | Path) -> DemoCorpus:
    data = json.loads((Path(model_dir) / CORPUS).read_text())
    facts = [Fact(**f) for f in data["facts"]]
    return DemoCorpus(
        data["people"], data["companies"], facts, data["seed"], data["reserved_names"]
    )


def train_demo(
    out_dir: str | Path,
    recipe: DemoRecipe | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Train the demo model into ``out_dir`` and return the report (also saved as report.json)."""
    recipe = recipe or DemoRecipe()
    started = time.perf_counter()
    dev = resolve_device(device)
    torch.manual_seed(recipe.seed)
    corpus = build_corpus(recipe.seed, recipe.n_people, recipe.n_companies)
    tokenizer = Tokenizer.train(corpus.all_texts(), recipe.vocab_size)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=recipe.d_model,
        n_layers=recipe.n_layers,
        n_heads=recipe.n_heads,
        ffn_hidden=recipe.ffn_hidden,
        memory=recipe.memory,
    )
    model = MemoryTransformer(cfg).to(dev)
    pairs = [(e.prompt, e.answer) for e in corpus.examples(held_out=False)]
    seqs = encode_examples(tokenizer, pairs, prompt_weight=recipe.prompt_weight)
    summary = train(model, seqs, tokenizer.pad_id, recipe.train, progress=progress)
    counts, n_tokens = count_slot_usage(model, seqs, tokenizer.pad_id)
    metrics = evaluate(model, tokenizer, corpus)

    out = save_model(model.cpu(), tokenizer, out_dir)
    save_slot_usage(counts, n_tokens, out / SLOT_USAGE)
    save_corpus(corpus, out / CORPUS)
    anchors = demo_anchors(model, tokenizer, corpus)
    save_anchors(anchors, out / ANCHORS)
    demo_phrasings().save(out / PHRASINGS)
    report = {
        **metrics,
        "facts": len(corpus.facts),
        "entities": len(corpus.people) + len(corpus.companies),
        "slots": cfg.memory.n_slots,
        "device": str(dev),
        "train_steps": summary["steps"],
        "final_loss": round(summary["final_loss"], 4),
        "train_seconds": round(summary["seconds"], 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "slots_read_in_training": int((counts.sum(0) > 0).sum()),
    }
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
