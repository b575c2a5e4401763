"""Sparse memory fine-tuning: teach the model a fact by changing only a few value-table rows.

For each fact (prompt -> target) the editor
  1. runs prompt + target through the frozen model and collects the slots every memory layer
     reads at the positions that predict the target tokens;
  2. ranks them by TF-IDF against the background slot usage (``ranking.py``) and keeps the top
     ``rows_per_fact``;
  3. optimises only those rows (gradient steps, every other weight frozen) towards a logit lead of
     the target over the runner-up at every target token, within a step budget; the fact is
     learned when greedy decoding produces it.
With the model's phrasings (``phrasings.py``) a fact is taught through every phrasing of its
prompt at once, which is what makes it answer when asked in other words.
The editor never modifies the live table: it returns (slots, rows) for the caller to commit as
one version. A batch succeeds only if every fact in it does; otherwise nothing is to be written.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memslot.edit.phrasings import Phrasings
from memslot.edit.ranking import RankedSlot, idf_weights, rank_slots
from memslot.edit.write import EditError
from memslot.model.memory import PatchedValues
from memslot.model.tokenizer import Tokenizer
from memslot.model.transformer import MemoryTransformer


@dataclass
class EditConfig:
    rows_per_fact: int = 48  # rows optimised per fact (per passage token for passages)
    ranking: str = "tfidf"  # "tfidf" (sparse memory fine-tuning) or "all": every slot read
    steps: int = 30  # optimisation budget per round (a round that keeps others may follow)
    # How the rows move. "gradient": each step goes along the loss's gradient, scaled to an RMS
    # of ``lr`` times the table's RMS over the rows optimised: the smallest change to the rows
    # for what a step gains, so the directions of a row that the fact does not use, which other
    # facts reading the row may, stay as they were. "adam": Adam's steps, which move every
    # coordinate of every row about alike; over 1,000 edits they grew the changed rows to
    # several times their old norm and broke a fifth of the facts no edit was about.
    optimizer: str = "gradient"
    # Step size relative to the table's RMS value. Smaller steps overshoot the margin less and
    # leave other facts more of their answers; 0.1 keeps p50 under 0.1 s on the demo model.
    lr: float = 0.1
    # Logit lead over the runner-up that each target token is taught towards. Above what greedy
    # decoding needs, so that the fact still answers when asked in other words, where the mix
    # of slots read differs; a wider lead (8) moves the rows further and breaks more of the
    # facts that share them.
    margin: float = 4.0
    # Pull of the edited rows towards their old values (mean square). Off by default: it holds
    # back the rows a fact reads weakly, the ones other phrasings lean on, and the rehearsal of
    # anchors and earlier edits protects other answers better.
    locality_weight: float = 0.0
    # Slots each memory head reads in the editor's wider read; more than the model's top-k also
    # trains the neighbouring slots that paraphrases of the prompt read (0 = no wider read).
    read_topk: int = 12
    # When to teach through the wider read: "fallback", only when the model's own read cannot
    # teach the facts (keeping the earlier ones): it reaches more rows, and more facts read
    # them; "always", for every edit.
    wide_read: str = "fallback"
    # Shared slots, read in the background more than this many times as often as the average
    # slot that is read at all (the slots every sentence's end reads, say), are left alone:
    # changing one moves the answers of every fact that reads it. An edit that cannot be taught
    # without them is retried with them. 0 turns the filter off.
    shared_ratio: float = 4.0
    keep_margin: float = 2.0  # logit lead that rehearsed earlier facts must keep (see `keep`)
    # Lead below which a known fact (an anchor) is rehearsed, and that rehearsal restores. An
    # anchor only needs to keep its answer, but restoring a lead of 2 rather than 0.5 leaves
    # the rows it shares closer to what they did, and facts no anchor names keep more answers.
    anchor_margin: float = 2.0
    # Anchors are kept answering in every phrasing of theirs that the model answers, where
    # the editor has the model's phrasings, not only in the phrasing the anchor file gives.
    anchor_phrasings: bool = False
    max_text_chars: int = 2000  # longer prompts, targets or passages are refused
    # Teach each fact through the other phrasings of its prompt too, where the editor has the
    # model's phrasings (``memslot.edit.phrasings``).
    paraphrase: bool = True
    # Each row's gradient step is divided by 1 + usage_damping x the row's background reads
    # (relative to the mean slot that is read at all): rows that many contexts read (the ones
    # a relation's facts share) move less, and the change lands on the rows specific to the
    # fact. Without it, every edit of a relation pushes the shared rows its facts read, and
    # over a thousand edits they drift far enough to break facts no edit was about.
    # 0 turns it off. Applies to the "gradient" optimizer (Adam rescales every coordinate).
    usage_damping: float = 4.0
    # Pull of each row towards its value when this editor first optimised it (for a server:
    # since it started), weighted by the row's background reads: sum over the rows of
    # drift_pull x usage x (row - first value)^2 / table RMS^2, added to the loss. A row that
    # the facts of one relation share is written by edit after edit; without the pull its
    # change accumulates (four to eight times its norm after 1,000 edits on the demo model)
    # until facts no edit was about lose their answers. A stronger pull (0.001) keeps more of
    # them and fewer paraphrases of the edited facts. 0 turns it off. The first values are
    # kept on the table's device, one row per slot the editor has optimised.
    drift_pull: float = 0.0002

    def validate(self) -> None:
        if self.rows_per_fact < 1:
            raise EditError(f"rows_per_fact must be >= 1, got {self.rows_per_fact}")
        if self.ranking not in ("tfidf", "all"):
            raise EditError(f"ranking must be 'tfidf' or 'all', got {self.ranking!r}")
        if self.wide_read not in ("fallback", "always"):
            raise EditError(f"wide_read must be 'fallback' or 'always', got {self.wide_read!r}")
        if self.read_topk < 0:
            raise EditError(f"read_topk must be >= 0 (0 = no wider read), got {self.read_topk}")
        if self.optimizer not in ("gradient", "adam"):
            raise EditError(f"optimizer must be 'gradient' or 'adam', got {self.optimizer!r}")
        if self.steps < 1:
            raise EditError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise EditError(f"lr must be > 0, got {self.lr}")
        if not self.drift_pull >= 0:
            raise EditError(f"drift_pull must be >= 0 (0 = off), got {self.drift_pull}")
        if not self.usage_damping >= 0:
            raise EditError(f"usage_damping must be >= 0 (0 = off), got {self.usage_damping}")
        if not self.shared_ratio >= 0:
            raise EditError(f"shared_ratio must be >= 0 (0 = off), got {self.shared_ratio}")


@dataclass
class FactReport:
    prompt: str
    target: str
    success: bool
    already_known: bool = False
    prob_before: float = 0.0  # probability of the whole target (and end token) under the model
    prob_after: float = 0.0
    loss_before: float = 0.0  # mean cross-entropy per target token
    loss_after: float = 0.0
    steps: int = 0
    slots_written: list[RankedSlot] = field(default_factory=list)
    message: str = ""


@dataclass
class EditResult:
    success: bool  # every fact reached its target; only then should the rows be committed
    slots: torch.Tensor  # (M,) int64, sorted
    rows: torch.Tensor  # (M, D) the new rows for those slots
    reports: list[FactReport]
    steps: int
    seconds: float
    rehearsed: int = 0  # earlier facts (``keep``) that read these rows and were kept answering


@dataclass
class _Item:
    """One sequence to learn: token ids and the positions whose next token is a target."""

    prompt: str
    target: str
    ids: list[int]
    positions: list[int]  # position p predicts ids[p + 1]
    row_budget: int  # how many ranked slots to optimise for this sequence
    # False for another phrasing of a fact (``Phrasings``): taught and rehearsed with it, but
    # the fact's verdict is its own prompt's
    verdict: bool = True
    owner: int = -1  # for another phrasing, the index of its fact


@dataclass
class _Pack:
    """Sequences flattened to their target positions, N in all, ready to score.

    When the model's memory layer is its last block (``MemoryTransformer.memory_is_last``) a
    position's logits depend on the table only through that layer, so the pack holds each
    position's ``memory_entry`` row and what it reads: an optimisation step then costs a bag
    and the head for N positions instead of a forward pass over every token. Otherwise it
    holds the whole sequences and runs them through the model."""

    n: int  # sequences
    ends: list[int]  # sequence i owns positions ends[i - 1]:ends[i]
    labels: torch.Tensor  # (N,) the token each position should predict
    owner: torch.Tensor  # (N,) the sequence each position belongs to
    x: torch.Tensor | None = None  # (N, D) memory-entry rows
    inputs: torch.Tensor | None = None  # (B, T) whole sequences, when there are no rows
    mask: torch.Tensor | None = None  # (B, T) their target positions
    reads: dict = field(default_factory=dict)  # read width -> (slots, weights), each (N, H, k)

    def first(self, n: int) -> _Pack:
        """The pack of the first ``n`` sequences."""
        if n >= self.n:
            return self
        end = self.ends[n - 1] if n else 0
        return _Pack(
            n,
            self.ends[:n],
            self.labels[:end],
            self.owner[:end],
            x=None if self.x is None else self.x[:end],
            inputs=None if self.inputs is None else self.inputs[:n],
            mask=None if self.mask is None else self.mask[:n],
            reads={k: (s[:end], w[:end]) for k, (s, w) in self.reads.items()},
        )


class _GradientSteps(torch.optim.Optimizer):
    """Steps along the gradient of a parameter, each of RMS ``lr`` (``EditConfig.optimizer``);
    ``damping``, broadcast against the parameter, scales the gradient first (a row's share of
    the step: ``EditConfig.usage_damping``)."""

    def __init__(self, params, lr: float, damping: torch.Tensor | None = None):
        super().__init__(params, {"lr": lr})
        self.damping = damping

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if self.damping is None else p.grad * self.damping
                rms = float(g.pow(2).mean().sqrt())
                if rms > 0:
                    p.add_(g, alpha=-group["lr"] / rms)


class Editor:
    def __init__(
        self,
        model: MemoryTransformer,
        tokenizer: Tokenizer,
        usage: torch.Tensor | None = None,
        config: EditConfig | None = None,
        usage_tokens: int | None = None,
        anchors: list[tuple[str, str]] | None = None,
        phrasings: Phrasings | None = None,
    ):
        """``anchors``: (prompt, answer) pairs the model knows (``load_anchors``). An edit
        rehearses those that read the rows it changes, so that unrelated knowledge keeps its
        answers; unlike ``keep``, an anchor that the edit contradicts gives way.

        ``phrasings``: the templates the model was taught to ask each relation with
        (``load_phrasings``); a fact is taught, and an earlier one rehearsed, through all of
        its prompt's phrasings (``EditConfig.paraphrase``)."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EditConfig()
        self.config.validate()
        self.phrasings = phrasings if self.config.paraphrase else None
        self._encoded: dict[tuple[str, str], tuple[list[int], int]] = {}  # see ``_encode``
        # Score sequences from their target positions' memory-entry rows (``_Pack``), which
        # are remembered per sequence: they do not depend on the table.
        self._fast = model.memory_is_last
        self._entries: dict[tuple[str, str, int], torch.Tensor] = {}
        self.idf = None
        self.anchors = self._known(anchors) if anchors else []
        self._damping = None  # per slot (S, 1), the factor of its steps (``usage_damping``)
        # per slot the editor has optimised, the row's value when it first did (``drift_pull``)
        self._origin: dict[int, torch.Tensor] = {}
        self.usage = None  # per slot, background reads over the mean of the slots read
        # Per kept fact or anchor and read width, the slots it reads at its target positions.
        # Valid while the reads do not depend on the value table, i.e. when the model has a
        # single memory layer.
        self._reads: dict[tuple[str, str, int | None], torch.Tensor] = {}
        self._scale: tuple[tuple, float] | None = None  # (which table, its RMS)
        if usage is not None:
            mem = model.cfg.memory
            tokens = usage_tokens or int(usage.sum()) // (len(mem.layers) * mem.heads * mem.topk)
            self.idf = idf_weights(usage, tokens).to(model.memory_values.device)
            counts = (usage.sum(0) if usage.dim() == 2 else usage).double()
            read = counts[counts > 0]
            self.usage = (counts / (read.mean() if len(read) else 1.0)).float().cpu()
        if self.usage is not None and self.config.usage_damping > 0:
            self._damping = (1.0 / (1.0 + self.config.usage_damping * self.usage)).unsqueeze(1)

    def _known(self, anchors: list[tuple[str, str]]) -> list[_Item]:
        """The anchors as sequences, with their other phrasings (``anchor_phrasings``) that
        the model answers now: a phrasing it never answered is no knowledge to keep."""
        items = self._fact_items(anchors, what="anchor")
        if not self.config.anchor_phrasings:
            return items
        extras = self._other_phrasings(items)
        answered = []
        for start in range(0, len(extras), 4096):
            pack = self._pack(extras[start : start + 4096])
            with torch.no_grad():
                margin = self._pack_scores(self._logits(pack, self.model.memory_values), pack)[2]
            answered += (margin > 0).tolist()
        return items + [it for it, ok in zip(extras, answered, strict=True) if ok]

    # ---- public API -------------------------------------------------------------------------

    def edit_facts(
        self,
        facts: list[tuple[str, str]],
        force: bool = False,
        table: torch.Tensor | None = None,
        keep: list[tuple[str, str]] | None = None,
    ) -> EditResult:
        """Teach (prompt, target) facts. ``force`` edits facts the model already answers.

        ``keep``: facts taught by earlier edits. Those among them that read a row this edit
        changes are optimised along with it, so that they keep their answers (rehearsal); one
        with the same prompt as a new fact is superseded by it instead.
        """
        if not facts:
            raise EditError("no facts given: pass at least one (prompt, target) pair")
        items = self._fact_items(facts)
        items += self._other_phrasings(items)
        prompts = {it.prompt for it in items}
        kept = self._superseded(self._fact_items(keep, what="kept fact") if keep else [], prompts)
        # an anchor that a new or an earlier edit re-taught is that edit's fact now
        taught = prompts | {it.prompt for it in kept}
        anchors = [it for it in self.anchors if it.prompt not in taught]
        return self._edit(items, force, table, kept, anchors)

    def _superseded(self, kept: list[_Item], claimed: set[str]) -> list[_Item]:
        """The kept facts (oldest first) with their other phrasings, less those a newer fact
        asks the same way: a new fact, or a later kept one, supersedes them (a correction)."""
        out: list[_Item] = []
        claimed = set(claimed)
        for it in reversed(kept):
            if it.prompt in claimed:
                continue
            group = [it] + self._other_phrasings([it])
            out += [g for g in group if g.prompt not in claimed]
            claimed |= {g.prompt for g in group}
        return out[::-1]

    def _other_phrasings(self, items: list[_Item]) -> list[_Item]:
        """For each fact, its prompt's other phrasings with the same target (none without
        phrasings), as sequences outside the verdict; one the text limits refuse is skipped."""
        if self.phrasings is None:
            return []
        out = []
        for i, it in enumerate(items):
            for prompt in self.phrasings.expand(it.prompt)[1:]:
                try:
                    (extra,) = self._fact_items([(prompt, it.target)])
                except EditError:
                    continue
                extra.verdict, extra.owner = False, i
                out.append(extra)
        return out

    def _fact_items(self, facts: list[tuple[str, str]], what: str = "fact") -> list[_Item]:
        items = []
        for i, (prompt, target) in enumerate(facts):
            where = f"{what} {i + 1}" if len(facts) > 1 or what != "fact" else "the fact"
            prompt, target = (prompt or "").strip(), (target or "").strip()
            if not prompt:
                raise EditError(f"{where} has an empty prompt: give the text that asks the fact")
            if not target:
                raise EditError(f"{where} has an empty target: give the answer to teach")
            self._check_length(prompt, f"{where}'s prompt")
            self._check_length(target, f"{where}'s target")
            ids, first = self._encode(prompt, target)
            self._check_tokens(ids, where)
            positions = list(range(first, len(ids) - 1))
            items.append(_Item(prompt, target, ids, positions, self.config.rows_per_fact))
        return items

    def _encode(self, prompt: str, target: str) -> tuple[list[int], int]:
        """(token ids of prompt + target + end, the position that predicts the target's first
        token). Remembered: every edit passes the earlier edits' facts, in all phrasings."""
        key = (prompt, target)
        if key not in self._encoded:
            head = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
            tail = self.tokenizer.encode(" " + target) + [self.tokenizer.eos_id]
            self._encoded[key] = (head + tail, len(head) - 1)
        ids, first = self._encoded[key]
        return list(ids), first

    def edit_passages(self, passages: list[str], table: torch.Tensor | None = None) -> EditResult:
        """Teach free text: every token after the first is a target."""
        if not passages:
            raise EditError("no passages given: pass at least one text")
        items = []
        for i, text in enumerate(passages):
            where = f"passage {i + 1}"
            text = (text or "").strip()
            if not text:
                raise EditError(f"{where} is empty: give the text to learn")
            self._check_length(text, where)
            ids = [self.tokenizer.bos_id] + self.tokenizer.encode(text) + [self.tokenizer.eos_id]
            self._check_tokens(ids, where)
            if len(ids) < 3:
                raise EditError(f"{where} is a single token; give at least two")
            positions = list(range(1, len(ids) - 1))
            budget = self.config.rows_per_fact * len(positions)
            items.append(_Item(text, text, ids, positions, budget))
        return self._edit(items, force=True, table=table)

    # ---- internals --------------------------------------------------------------------------

    def _check_length(self, text: str, what: str) -> None:
        if len(text) > self.config.max_text_chars:
            raise EditError(
                f"{what} is {len(text)} characters; the limit is {self.config.max_text_chars}"
            )

    def _check_tokens(self, ids: list[int], where: str) -> None:
        limit = self.model.cfg.max_seq_len
        if len(ids) > limit:
            raise EditError(
                f"{where} is {len(ids)} tokens with its target; this model reads at most {limit}: "
                "shorten it"
            )

    def _batch(self, items: list[_Item]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs (B, T), labels (B, T) with -100 off-target, target mask (B, T))."""
        device = self.model.memory_values.device
        length = max(len(it.ids) for it in items)
        inputs = torch.full((len(items), length), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), -100, dtype=torch.long)
        for row, it in enumerate(items):
            inputs[row, : len(it.ids)] = torch.tensor(it.ids)
            for p in it.positions:
                labels[row, p] = it.ids[p + 1]
        return inputs.to(device), labels.to(device), (labels != -100).to(device)

    def _pack(self, items: list[_Item]) -> _Pack:
        device = self.model.memory_values.device
        labels = [it.ids[p + 1] for it in items for p in it.positions]
        sizes = [len(it.positions) for it in items]
        ends = torch.tensor(sizes).cumsum(0).tolist()
        owner = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(sizes))
        pack = _Pack(len(items), ends, torch.tensor(labels, device=device), owner.to(device))
        if not self._fast:
            pack.inputs, _, pack.mask = self._batch(items)
            return pack
        key = lambda it: (it.prompt, it.target, it.positions[0])  # noqa: E731
        missing = list({key(it): it for it in items if key(it) not in self._entries}.values())
        for start in range(0, len(missing), 256):
            batch = missing[start : start + 256]
            inputs, _, _ = self._batch(batch)
            with torch.no_grad():
                entry = self.model.memory_entry(inputs)
            for row, it in enumerate(batch):
                self._entries[key(it)] = entry[row, it.positions]
        pack.x = torch.cat([self._entries[key(it)] for it in items])
        return pack

    def _pack_reads(self, pack: _Pack, topk: int | None):
        """(slots, weights) the pack's positions read, ``topk`` per head; kept with the pack."""
        if topk not in pack.reads:
            with torch.no_grad():
                pack.reads[topk] = self.model.memory_read(pack.x, topk)
        return pack.reads[topk]

    def _logits(self, pack: _Pack, values, topk: int | None = None) -> torch.Tensor:
        """(N, vocab) logits at the pack's positions with the table ``values``."""
        if pack.x is not None:
            slots, weights = self._pack_reads(pack, topk)
            return self.model.memory_exit(pack.x, values, slots, weights)
        return self.model(pack.inputs, values=values, memory_topk=topk).logits[pack.mask]

    @staticmethod
    def _scores(logits: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor, n: int):
        """Logits (N, vocab) at target positions that predict ``labels`` (N,), position i in
        sequence ``owner[i]`` of ``n``. Per sequence: mean CE over its targets, total log-prob,
        min margin (target logit - best other logit); and each position's margin (N,)."""
        logits = logits.float()
        labels = labels.unsqueeze(-1)
        logp = F.log_softmax(logits, dim=-1).gather(-1, labels).squeeze(-1)
        with torch.no_grad():
            others = logits.scatter(-1, labels, float("-inf")).amax(-1)
            margins = logits.gather(-1, labels).squeeze(-1) - others
            margin = torch.full((n,), math.inf, device=logits.device)
            margin = margin.scatter_reduce(0, owner, margins, "amin")
        total = logits.new_zeros(n).index_add(0, owner, logp)
        count = torch.bincount(owner, minlength=n).clamp_min(1)
        return -total / count, total, margin, margins

    def _pack_scores(self, logits: torch.Tensor, pack: _Pack):
        """``_scores`` per sequence of the pack: (mean CE, total log-prob, min margin)."""
        return self._scores(logits, pack.labels, pack.owner, pack.n)[:3]

    def _readers(
        self, kept: list[_Item], table: torch.Tensor, slots: torch.Tensor, topk: int | None
    ) -> list[_Item]:
        """The kept facts that read any of ``slots`` at a position predicting their target,
        reading ``topk`` slots per head (None: the model's own k)."""
        if not kept:
            return []
        cacheable = len(self.model.cfg.memory.layers) == 1
        key = lambda it: (it.prompt, it.target, topk)  # noqa: E731
        missing = list(
            {key(it): it for it in kept if not cacheable or key(it) not in self._reads}.values()
        )
        reads = {} if not cacheable else self._reads
        for start in range(0, len(missing), 256):
            batch = missing[start : start + 256]
            pack = self._pack(batch)
            if pack.x is not None:
                read = self._pack_reads(pack, topk)[0].flatten(1)  # (N, H * k)
            else:
                with torch.no_grad():
                    lookups = self.model(pack.inputs, values=table, memory_topk=topk).lookups
                read = torch.cat([lk.slots[pack.mask].flatten(1) for lk in lookups], 1)
            for i, it in enumerate(batch):
                reads[key(it)] = read[(pack.ends[i - 1] if i else 0) : pack.ends[i]].unique()
        chosen = torch.zeros(table.shape[0], dtype=torch.bool, device=table.device)
        chosen[slots] = True
        flat = [reads[key(it)] for it in kept]
        owner = torch.repeat_interleave(
            torch.arange(len(kept), device=table.device),
            torch.tensor([len(f) for f in flat], device=table.device),
        )
        hits = torch.zeros(len(kept), device=table.device)
        hits = hits.index_add(0, owner, chosen[torch.cat(flat)].float())
        return [it for it, hit in zip(kept, (hits > 0).tolist(), strict=True) if hit]

    def _filters_shared(self) -> bool:
        cfg = self.config
        return cfg.ranking == "tfidf" and self.usage is not None and cfg.shared_ratio > 0

    def _choose(
        self, lookups, item: _Item, row: int, settled: torch.Tensor, allow_shared: bool
    ) -> list[RankedSlot]:
        """The slots to optimise for one fact, best first."""
        cfg = self.config
        if cfg.ranking == "all":
            return rank_slots(lookups, row, item.positions, None, None)
        # Positions the model already predicts with the margin (the end of an answer, say) need
        # no new rows: the slots read only there are left to the facts that use them.
        positions = [p for p in item.positions if not bool(settled[row, p])] or item.positions
        ranked = rank_slots(lookups, row, positions, self.idf, None)
        if not allow_shared:
            ranked = [r for r in ranked if float(self.usage[r.slot]) <= cfg.shared_ratio] or ranked
        return ranked[: item.row_budget]

    def _optimise_keeping(
        self,
        new: list[_Item],
        readers: list[_Item],
        known: list[_Item],
        table: torch.Tensor,
        slots: torch.Tensor,
        wide: int | None,
    ):
        """Optimise the rows ``slots`` for the ``new`` facts while the ``readers`` (earlier
        edits' facts that read those rows) keep their answers, and the ``known`` anchors that
        read them too as far as they do not contradict the new facts.

        The readers are optimised with the new facts from the start. Anchors are rehearsed
        lazily: after each round every reader and anchor is checked in one forward pass, and
        only those whose lead fell below ``keep_margin`` (``anchor_margin`` for anchors) join
        the batch for another round; most anchors weigh the changed rows lightly and never need
        a step. Returns (rows, steps, scores of new + readers under those rows)."""
        cfg = self.config
        others = readers + known
        check = self._pack(new + others)
        verdict = torch.tensor([it.verdict for it in new], dtype=torch.bool)
        # Earlier edits' facts are rehearsed from the first step (training them together gives
        # sturdier rows: better paraphrase answers than adding them lazily); anchors only
        # when they fall.
        active: list[int] = list(range(len(readers)))
        floor = [cfg.keep_margin] * len(readers) + [cfg.anchor_margin] * len(known)
        rows, steps = table[slots], 0
        # The first round teaches the new facts up to ``margin``. The later ones repair: they
        # stop once the anchors that fell are back and every fact leads by ``keep_margin``, as
        # an earlier edit's fact must (the loss still pushes the new facts up meanwhile).
        target = cfg.margin
        yielded: set[int] = set()  # anchors that gave way to the new facts: not rehearsed again
        for _ in range(4):
            pack = self._pack(new + [others[j] for j in active])
            need = torch.tensor(
                [target] * len(new) + [floor[j] for j in active], device=table.device
            )
            start = rows
            rows, taken = self._optimise(table, slots, pack, need, wide, start, n_wide=len(new))
            steps += taken
            scores = self._check(table, slots, rows, check)
            lead = scores[2][len(new) :]
            if not bool((scores[2][: len(new)].cpu() > 0)[verdict].all()):
                # An anchor the new facts contradict (another phrasing of the fact they
                # change, say) gives way: drop the rehearsed anchors that did not get back
                # their lead (all of them if every one did), redo the round.
                rehearsed = [j for j in active if j >= len(readers)]
                if not rehearsed:
                    break
                short = {j for j in rehearsed if lead[j] < floor[j]} or set(rehearsed)
                active = [j for j in active if j not in short]
                yielded |= short
                rows = start
                scores = self._check(table, slots, rows, check)  # of the rows returned
                continue
            falling = [
                j
                for j in range(len(others))
                if j not in active and j not in yielded and lead[j] < floor[j]
            ]
            if not falling:
                break
            active += falling
            target = min(cfg.margin, cfg.keep_margin)
        n = len(new) + len(readers)  # anchors are not part of the verdict
        return rows, steps, tuple(x[:n] for x in scores)

    def _check(self, table, slots, rows, pack: _Pack):
        """Scores of the pack's sequences with ``rows`` in place of the table's ``slots``."""
        with torch.no_grad():
            return self._pack_scores(self._logits(pack, PatchedValues(table, slots, rows)), pack)

    def _optimise(self, table, slots, pack: _Pack, need, wide, start=None, n_wide=None):
        """Optimise the rows ``slots`` (from ``start``, else their values in ``table``) until
        every sequence leads by ``need`` (or the budget); a pull towards the table's values.

        The first ``n_wide`` sequences (all by default: the facts being taught) also learn
        through the ``wide`` read; the rest (facts rehearsed) are held at the model's own k,
        which is how they are asked."""
        cfg = self.config
        rows0 = table[slots].clone()
        origin, pull = self._drift_pull(slots, rows0)
        rows = (rows0 if start is None else start).detach().clone().requires_grad_(True)
        scale = self._table_scale(table)
        step = cfg.lr * scale
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam([rows], lr=step)
        else:
            damping = None
            if self._damping is not None:
                damping = self._damping[slots.cpu()].to(table.device)
            optimizer = _GradientSteps([rows], lr=step, damping=damping)
        n_wide = pack.n if n_wide is None else n_wide
        taught = pack.first(n_wide) if wide and n_wide else None
        steps = 0
        with torch.enable_grad():
            for steps in range(1, cfg.steps + 1):
                patched = PatchedValues(table, slots, rows)
                ce, _, margin = self._pack_scores(self._logits(pack, patched), pack)
                loss = ce.sum()
                if taught is not None:
                    wide_logits = self._logits(taught, patched, wide)
                    wide_ce, _, wide_margin = self._pack_scores(wide_logits, taught)
                    held = margin[n_wide:]
                    margin = torch.cat([torch.minimum(margin[:n_wide], wide_margin), held])
                    loss = loss + wide_ce.sum()
                if bool((margin >= need).all()):
                    steps -= 1
                    break
                if cfg.locality_weight:
                    loss = loss + cfg.locality_weight * (rows - rows0).pow(2).mean() / scale**2
                if pull is not None:
                    loss = loss + (pull * (rows - origin).pow(2)).sum() / scale**2
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return rows.detach(), steps

    def _drift_pull(self, slots: torch.Tensor, rows: torch.Tensor):
        """(the rows' first values, the pull's weight per row (M, 1)) for ``drift_pull``, or
        (None, None) when it is off; remembers the first value of each slot not seen before."""
        cfg = self.config
        if not cfg.drift_pull:
            return None, None
        chosen = slots.tolist()
        for i, slot in enumerate(chosen):
            if slot not in self._origin:
                self._origin[slot] = rows[i].detach().clone()
        origin = torch.stack([self._origin[slot] for slot in chosen]).to(rows.device, rows.dtype)
        usage = self.usage[slots.cpu()] if self.usage is not None else torch.ones(len(chosen))
        return origin, (cfg.drift_pull * usage).unsqueeze(1).to(rows.device, rows.dtype)

    def _table_scale(self, table: torch.Tensor) -> float:
        """The RMS of the table's values: the unit of the optimiser's steps. Computed once per
        table (an edit changes a few rows, which barely moves it), not once per edit."""
        which = (table.data_ptr(), tuple(table.shape), table.device)
        if self._scale is None or self._scale[0] != which:
            self._scale = (which, float(table.float().pow(2).mean().sqrt()) or 1.0)
        return self._scale[1]

    def _edit(
        self,
        items: list[_Item],
        force: bool,
        table: torch.Tensor | None,
        kept: list[_Item] | None = None,
        anchors: list[_Item] | None = None,
    ) -> EditResult:
        started = time.perf_counter()
        cfg = self.config
        model = self.model
        table = (model.memory_values if table is None else table).detach()
        inputs, labels, mask = self._batch(items)
        wide = min(cfg.read_topk, model.cfg.memory.n_keys) or None
        if wide is not None and wide <= model.cfg.memory.topk:
            wide = None
        with torch.no_grad():
            out = model(inputs, values=table)
            owner = mask.nonzero()[:, 0]
            ce0, logp0, margin0, at = self._scores(
                out.logits[mask], labels[mask], owner, len(items)
            )
            settled = torch.zeros_like(mask)  # positions the model predicts with the margin
            settled[mask] = at >= cfg.margin
        lookups = {None: out.lookups}  # per read width, what the items read: ranked below
        reports = [
            FactReport(
                it.prompt,
                it.target,
                success=False,
                prob_before=math.exp(float(logp0[i])),
                loss_before=float(ce0[i]),
            )
            for i, it in enumerate(items)
            if it.verdict
        ]
        todo = []
        for i, report in enumerate(reports):
            if float(margin0[i]) > 0 and not force:
                report.already_known = report.success = True
                report.prob_after, report.loss_after = report.prob_before, report.loss_before
                report.message = (
                    "the model already gives this answer; nothing written (force to edit)"
                )
            else:
                todo.append(i)
        empty = torch.zeros(0, dtype=torch.long)
        if not todo:
            rows = table.new_zeros(0, table.shape[1])
            return EditResult(True, empty, rows, reports, 0, time.perf_counter() - started)
        # the other phrasings of the facts being taught (after the facts in ``items``)
        extras = [i for i, it in enumerate(items) if not it.verdict and it.owner in todo]

        # Pick the rows to optimise: the top-ranked slots each fact reads at its targets. First
        # only slots few background tokens read; if that cannot teach the batch, once more with
        # the shared slots allowed (fewer facts keep their rows to themselves, but it learns).
        # All of it through the model's own read first, then through the wider one
        # (``wide_read``), which reaches more rows and changes more facts' answers.
        shared = (False, True) if self._filters_shared() else (True,)
        widths = [None, wide] if wide and cfg.wide_read == "fallback" else [wide]
        steps, tried = 0, None
        for read, allow_shared in ((r, a) for r in widths for a in shared):
            if read not in lookups:
                with torch.no_grad():
                    lookups[read] = model(inputs, values=table, memory_topk=read).lookups
            ranked = {
                i: self._choose(lookups[read], items[i], i, settled, allow_shared)
                for i in todo + extras
            }
            chosen = sorted({r.slot for i in ranked for r in ranked[i]})
            if (read, chosen) == tried:
                continue  # no shared slot among them: a second attempt would repeat the first
            tried = (read, chosen)
            slots = torch.tensor(chosen, dtype=torch.long, device=table.device)
            readers = self._readers(kept, table, slots, read) if kept else []
            known = self._readers(anchors, table, slots, None) if anchors else []
            new_rows, taken, (ce1, logp1, margin1) = self._optimise_keeping(
                [items[i] for i in todo + extras], readers, known, table, slots, read
            )
            steps += taken
            judged = [items[i].verdict for i in todo + extras] + [it.verdict for it in readers]
            if bool((margin1.cpu() > 0)[torch.tensor(judged, dtype=torch.bool)].all()):
                break
        for i in todo:
            reports[i].slots_written = ranked[i]
        for i in extras:  # a phrasing's rows are its fact's
            have = {r.slot for r in reports[items[i].owner].slots_written}
            reports[items[i].owner].slots_written += [r for r in ranked[i] if r.slot not in have]

        rehearsed = sum(it.verdict for it in readers)  # facts, not their phrasings
        for j, i in enumerate(todo):
            r = reports[i]
            r.steps = steps
            r.prob_after, r.loss_after = math.exp(float(logp1[j])), float(ce1[j])
            r.success = float(margin1[j]) > 0
            r.message = (
                "learned"
                if r.success
                else f"not learned within {steps} steps (raise steps, lr or rows_per_fact)"
                if not readers
                else f"not learned within {steps} steps while keeping {rehearsed} earlier "
                "edit's fact(s) that read the same rows answering (a fact it contradicts?)"
            )
        verdict = torch.tensor([it.verdict for it in readers], dtype=torch.bool)
        kept_ok = bool((margin1[len(todo) + len(extras) :].cpu() > 0)[verdict].all())
        if not kept_ok:
            for i in (i for i in todo if reports[i].success):
                reports[i].success = False
                reports[i].message = (
                    "learned, but an earlier edit's fact would lose its answer; nothing written "
                    "(raise steps or rows_per_fact)"
                )
        success = all(r.success for r in reports)
        return EditResult(
            success,
            slots.cpu(),
            new_rows.to(table.dtype),
            reports,
            steps,
            time.perf_counter() - started,
            rehearsed,
        )
