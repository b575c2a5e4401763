"""Knowledge-editing benchmark on the demo model: reliability, generalization, locality, retention.

Edits are generated deterministically from the demo corpus: counterfactual edits of facts the
model knows (a new answer from the same relation's answer pool) and facts about people the model
has never seen (the corpus's reserved names). Each method applies the edits one after another
to a fresh copy of the model, and after the first T of them (for each T asked) we measure

    reliability     the edit prompt gave the target right after its own edit
    retention       the edit prompt still gives the target after all T edits
    generalization  held-out phrasings of the edited facts give the target after all T edits
    locality        unrelated known facts (people no edit touches) keep their answers after
                    all T edits, of those the model answered before: half of them withheld
                    from the editor's anchors, asked through every trained phrasing
                    ("locality") and through the held-out ones ("(held-out)"); the other half
                    anchored, asked through the trained phrasings that are not the anchor
                    ("anchored")

and the latency of each edit. Methods, side by side on the same model and edit set:

    memslot         TF-IDF-ranked sparse memory fine-tuning (the product): rows most background
                    text reads are left alone, and earlier edits that read the changed rows are
                    rehearsed so that they keep their answers
    memslot-no-keep the same without rehearsal
    all-slots       fine-tune every slot the fact reads, no ranking (with rehearsal)
    all-slots-no-keep  the same without rehearsal
    ffn-layer       fine-tune one dense FFN layer (where ROME/MEMIT edit), rest frozen
    full            fine-tune every weight

Run:  python bench/edits.py [--model models/demo] [--t 1 10 100 1000] [--methods ...]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from machine import cpu_model

from memslot.demo.corpus import PERSON_RELATIONS, Fact, prompts_for
from memslot.demo.recipe import load_corpus
from memslot.edit import EditConfig, Editor
from memslot.edit.phrasings import load_phrasings
from memslot.model.checkpoint import load_anchors, load_model, load_slot_usage
from memslot.model.train import encode_examples, exact_match


@dataclass
class EditCase:
    fact: Fact
    kind: str  # "counterfactual" or "new-entity"

    @property
    def prompt(self) -> str:
        return prompts_for(self.fact)[0]

    @property
    def paraphrases(self) -> list[str]:
        return prompts_for(self.fact, held_out=True)


def edit_set(corpus, n: int, seed: int = 1) -> list[EditCase]:
    """n edits: half counterfactuals of known person facts, half facts about unseen people."""
    rng = random.Random(seed)
    pools = {r: corpus.answers_for(r) for r in PERSON_RELATIONS}
    known = [f for f in corpus.facts if f.relation in PERSON_RELATIONS]
    rng.shuffle(known)
    cases, used = [], set()
    new_people = list(corpus.reserved_names)
    rng.shuffle(new_people)
    for i in range(n):
        if i % 2 == 0 and known:
            fact = known.pop()
            answer = rng.choice([a for a in pools[fact.relation] if a != fact.answer])
            cases.append(EditCase(Fact(fact.subject, fact.relation, answer), "counterfactual"))
        else:
            person = new_people[(i // 2) % len(new_people)]
            relation = PERSON_RELATIONS[(i // 2 // len(new_people) + i) % len(PERSON_RELATIONS)]
            cases.append(
                EditCase(Fact(person, relation, rng.choice(pools[relation])), "new-entity")
            )
        used.add(cases[-1].fact.subject)
    return cases


class Method:
    name = ""

    def __init__(self, model_dir: str, withheld: frozenset = frozenset(), **overrides):
        if overrides:
            raise SystemExit(f"--set applies to the memslot methods only, not {self.name}")
        self.model, self.tok = load_model(model_dir)

    def edit(self, prompt: str, target: str) -> None:
        raise NotImplementedError


class Memslot(Method):
    name = "memslot"
    ranking = "tfidf"
    rehearse = True  # earlier edits that read the rows being changed are kept answering

    def __init__(self, model_dir: str, withheld: frozenset = frozenset(), **overrides):
        """``withheld``: anchor prompts left out of the editor's anchors (the locality facts)."""
        super().__init__(model_dir)
        usage, tokens = load_slot_usage(model_dir)
        cfg = EditConfig(ranking=self.ranking, **overrides)
        anchors = None
        if self.rehearse:
            anchors = [(p, a) for p, a in load_anchors(model_dir) if p not in withheld]
        self.editor = Editor(
            self.model,
            self.tok,
            usage,
            cfg,
            usage_tokens=tokens,
            anchors=anchors,
            phrasings=load_phrasings(model_dir),
        )
        self.taught: list[tuple[str, str]] = []

    def edit(self, prompt: str, target: str) -> None:
        keep = self.taught if self.rehearse else None
        result = self.editor.edit_facts([(prompt, target)], force=True, keep=keep)
        if result.success:
            self.model.memory_values.data[result.slots] = result.rows
            self.taught.append((prompt, target))


class MemslotNoRehearsal(Memslot):
    name = "memslot-no-keep"
    rehearse = False


class AllSlots(Memslot):
    name = "all-slots"
    ranking = "all"


class AllSlotsNoRehearsal(AllSlots):
    name = "all-slots-no-keep"
    rehearse = False


class WeightFinetune(Method):
    """Adam on a set of dense weights until greedy decoding gives the target (or the budget)."""

    steps = 60
    lr = 1e-3

    def params(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def edit(self, prompt: str, target: str) -> None:
        seqs = encode_examples(self.tok, [(prompt, target)], prompt_weight=0.0)
        ids = torch.tensor([seqs.tokens[0][:-1]])
        labels = torch.tensor([seqs.tokens[0][1:]])
        weights = torch.tensor([seqs.weights[0]])
        params = self.params()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = self.model(ids).logits[0]
                mask = weights[0] > 0
                if bool((logits[mask].argmax(-1) == labels[0][mask]).all()):
                    break
                loss = F.cross_entropy(logits[mask], labels[0][mask])
                opt.zero_grad()
                loss.backward()
                opt.step()
        for p in params:
            p.requires_grad_(False)


class FFNLayer(WeightFinetune):
    name = "ffn-layer"

    def params(self):
        # the last dense FFN before the memory layer: where ROME/MEMIT place their edits
        dense = [b for b in self.model.blocks if b.ffn is not None and not b.is_memory]
        return list(dense[-1].ffn.parameters())


class Full(WeightFinetune):
    name = "full"
    lr = 3e-4

    def params(self):
        return [p for n, p in self.model.named_parameters() if n != "memory_values"]


METHODS = {
    m.name: m for m in (Memslot, MemslotNoRehearsal, AllSlots, AllSlotsNoRehearsal, FFNLayer, Full)
}


def run(method_cls, model_dir: str, corpus, cases: list[EditCase], locality, ts, overrides=None):
    """Apply ``cases`` one after another; after the first T of them, for each T in ``ts``,
    yield (T, the measures). One sequence serves every T: the edits of a run with fewer are
    its first T, and measuring changes nothing. ``locality``: ``Locality``."""
    method = method_cls(model_dir, withheld=locality.withheld, **(overrides or {}))
    model, tok = method.model, method.tok
    before_local = exact_match(model, tok, locality.pairs)
    reliable, latencies = [], []
    for case in cases:
        started = time.perf_counter()
        method.edit(case.prompt, case.fact.answer)
        latencies.append(time.perf_counter() - started)
        reliable.append(exact_match(model, tok, [(case.prompt, case.fact.answer)])[0])
        done = len(latencies)
        if done in ts:
            yield (
                done,
                measure(model, tok, cases[:done], reliable, latencies, locality, before_local),
            )
        elif done % 50 == 0 and done < len(cases):
            print(
                f"  {method.name}: {done}/{len(cases)} edits, p50 so far "
                f"{1000 * statistics.median(latencies):.0f} ms",
                file=sys.stderr,
                flush=True,
            )


def measure(model, tok, cases, reliable, latencies, locality, before_local) -> dict:
    retained = exact_match(model, tok, [(c.prompt, c.fact.answer) for c in cases])
    para_pairs = [(p, c.fact.answer) for c in cases for p in c.paraphrases]
    general = exact_match(model, tok, para_pairs)
    kinds = [c.kind for c in cases for _ in c.paraphrases]
    by_kind = {
        k: statistics.mean(g for g, kk in zip(general, kinds, strict=True) if kk == k)
        for k in ("counterfactual", "new-entity")
        if k in kinds
    }
    after_local = exact_match(model, tok, locality.pairs)
    # of the prompts answered before the edits, those still answered, per kind of prompt
    pairs = list(zip(before_local, after_local, strict=True))
    one, two = len(locality.trained), len(locality.trained) + len(locality.held_out)

    def still(part):
        kept = [b for a, b in part if a]
        return statistics.mean(kept) if kept else float("nan")

    lat = sorted(latencies)
    return {
        "reliability": statistics.mean(reliable),
        "generalization": statistics.mean(general),
        "gen_by_kind": " / ".join(
            f"{by_kind[k]:.2f}" if k in by_kind else "-" for k in ("counterfactual", "new-entity")
        ),
        "locality": still(pairs[:one]),
        "locality_held": still(pairs[one:two]),
        "locality_anchored": still(pairs[two:]),
        "retention": statistics.mean(retained),
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


@dataclass
class Locality:
    """Known facts about people no edit touches, asked after the edits, in two halves.

    The first half is withheld from the anchors, so the editor never rehearses them by name:
    their locality measures what an edit leaves alone. The second half keeps its anchors (one
    phrasing per fact) and is asked through its other trained phrasings: what anchoring a
    fact protects."""

    trained: list[tuple[str, str]]  # withheld facts, every phrasing the model was trained with
    held_out: list[tuple[str, str]]  # the corpus's held-out phrasings of the same facts
    anchored: list[tuple[str, str]]  # anchored facts, their trained phrasings but the anchor
    withheld: frozenset[str]  # prompts left out of the anchors
    facts: tuple[int, int]  # withheld, anchored

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return self.trained + self.held_out + self.anchored


def locality_set(corpus, edited: set[str], n: int, anchors) -> Locality:
    facts = [f for f in corpus.facts if f.subject not in edited]
    random.Random(2).shuffle(facts)
    facts = facts[:n]
    withheld, anchored = facts[: len(facts) // 2], facts[len(facts) // 2 :]
    trained = [(p, f.answer) for f in withheld for p in prompts_for(f)]
    held_out = [(p, f.answer) for f in withheld for p in prompts_for(f, held_out=True)]
    anchor_prompts = {p for p, _ in anchors}
    others = [(p, f.answer) for f in anchored for p in prompts_for(f) if p not in anchor_prompts]
    prompts = frozenset(p for p, _ in trained)
    return Locality(trained, held_out, others, prompts, (len(withheld), len(anchored)))


def parse_overrides(pairs: list[str]) -> dict:
    """FIELD=VALUE strings -> EditConfig keyword arguments, typed like the field's default."""
    defaults = EditConfig()
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not hasattr(defaults, key):
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with an EditConfig field")
        kind = type(getattr(defaults, key))
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--set {pair!r}: {key} takes true or false")
            out[key] = value.lower() in ("true", "1")
        else:
            out[key] = kind(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/demo")
    parser.add_argument(
        "--t",
        type=int,
        nargs="+",
        default=[1, 10, 100, 1000],
        help="numbers of sequential edits to measure after, all in one sequence per method",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--locality-facts", type=int, default=300)
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="EditConfig overrides for the memslot methods, e.g. --set rows_per_fact=32",
    )
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    torch.set_grad_enabled(False)
    corpus = load_corpus(args.model)
    cases_all = edit_set(corpus, max(args.t))
    edited = {c.fact.subject for c in cases_all}
    locality = locality_set(corpus, edited, args.locality_facts, load_anchors(args.model))
    print(
        f"# bench/edits.py on {cpu_model()}, {torch.get_num_threads()} threads, model {args.model}"
    )
    print(
        f"# edits: half counterfactuals of known facts, half facts about unseen people; "
        f"locality over {locality.facts[0]} unrelated known facts withheld from the anchors "
        f"the memslot editor rehearses ({len(locality.trained)} trained and "
        f"{len(locality.held_out)} held-out phrasings) and {locality.facts[1]} anchored ones "
        f"({len(locality.anchored)} trained phrasings that are not their anchor)"
    )
    if overrides:
        print(f"# EditConfig overrides for the memslot methods: {overrides}")
    header = (
        "| method | T | reliability | generalization | (counterfactual / new) | locality "
        "| (held-out) | anchored | retention | p50 ms | p99 ms |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ts = sorted(set(args.t))
    for name in args.methods:
        settings = overrides if issubclass(METHODS[name], Memslot) else None
        for t, r in run(METHODS[name], args.model, corpus, cases_all, locality, ts, settings):
            print(
                f"| {name} | {t} | {r['reliability']:.2f} | {r['generalization']:.2f} | "
                f"{r['gen_by_kind']} | "
                f"{r['locality']:.2f} | {r['locality_held']:.2f} | "
                f"{r['locality_anchored']:.2f} | {r['retention']:.2f} | "
                f"{r['p50_ms']:.0f} | "
                f"{r['p99_ms']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
