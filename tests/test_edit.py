"""Slot editing: writes, sparse memory fine-tuning of facts and passages."""

import pytest
import torch

from memslot.demo.corpus import Fact, prompts_for
from memslot.demo.recipe import load_corpus
from memslot.edit import EditConfig, EditError, Editor, WriteMode, rank_slots, write_rows
from memslot.edit.phrasings import PHRASINGS, Phrasings, load_phrasings
from memslot.model.checkpoint import (
    ANCHORS,
    CheckpointError,
    load_anchors,
    load_model,
    load_slot_usage,
)
from memslot.model.generate import generate
from memslot.model.memory import Lookup
from memslot.model.train import exact_match


@pytest.fixture()
def tiny(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    usage, tokens = load_slot_usage(tiny_model_dir)
    return model, tok, Editor(model, tok, usage, usage_tokens=tokens), load_corpus(tiny_model_dir)


def counterfactual(corpus, index: int) -> tuple[str, str]:
    fact = corpus.facts[index]
    other = next(
        f.answer for f in corpus.facts if f.relation == fact.relation and f.answer != fact.answer
    )
    return prompts_for(Fact(fact.subject, fact.relation, other))[0], other


def apply(model, result) -> None:
    model.memory_values.data[result.slots] = result.rows


def test_after_an_edit_the_model_answers_the_new_target(tiny):
    model, tok, editor, corpus = tiny
    prompt, target = counterfactual(corpus, 0)
    assert generate(model, tok, prompt).text != target
    result = editor.edit_facts([(prompt, target)])
    assert result.success, result.reports
    report = result.reports[0]
    assert report.prob_after > report.prob_before and report.loss_after < report.loss_before
    assert report.slots_written and all(
        s.layer in model.cfg.memory.layers for s in report.slots_written
    )
    apply(model, result)
    assert generate(model, tok, prompt).text == target


def test_earlier_facts_that_read_the_changed_rows_are_rehearsed_and_keep_their_answers(
    tiny_model_dir,
):
    corpus = load_corpus(tiny_model_dir)
    # Two facts about one person the model has never seen read largely the same slots, the
    # more so through a read wider than the model's.
    wide = EditConfig(read_topk=WIDE, wide_read="always")
    model, tok, editor = _fresh_editor(tiny_model_dir, config=wide)
    person = corpus.reserved_names[0]
    first = (f"{person} was born in", corpus.answers_for("birth_city")[0])
    second = (f"{person} works for", corpus.answers_for("employer")[0])
    result = editor.edit_facts([first], force=True)
    assert result.success and result.rehearsed == 0
    apply(model, result)
    result = editor.edit_facts([second], force=True, keep=[first])
    assert result.success, result.reports
    assert result.rehearsed == 1
    apply(model, result)
    assert generate(model, tok, first[0]).text == first[1]
    assert generate(model, tok, second[0]).text == second[1]


def test_an_edit_that_cannot_keep_the_rehearsed_facts_writes_nothing_and_says_why(tiny):
    model, tok, editor, corpus = tiny
    person = corpus.reserved_names[1]
    cities = corpus.answers_for("birth_city")
    kept = (f"{person} was born in", cities[0])
    result = editor.edit_facts([kept], force=True)
    assert result.success
    apply(model, result)
    before = model.memory_values.detach().clone()
    editor.config.steps = 1  # too few steps to learn the new fact while keeping the old one
    result = editor.edit_facts([(f"{person} works for", "Nobody")], force=True, keep=[kept])
    assert not result.success and result.rehearsed == 1
    assert "earlier edit" in result.reports[0].message
    assert torch.equal(model.memory_values, before)
    assert generate(model, tok, kept[0]).text == kept[1]


def test_a_new_target_for_a_kept_prompt_is_a_correction_not_a_contradiction(tiny):
    model, tok, editor, corpus = tiny
    cities = corpus.answers_for("birth_city")
    kept = (f"{corpus.reserved_names[2]} was born in", cities[0])
    result = editor.edit_facts([kept], force=True)
    assert result.success
    apply(model, result)
    result = editor.edit_facts([(kept[0], cities[1])], force=True, keep=[kept])
    assert result.success and result.rehearsed == 0
    apply(model, result)
    assert generate(model, tok, kept[0]).text == cities[1]


def _fresh_editor(tiny_model_dir, **options):
    """A fresh copy of the tiny model and an editor over it with ``Editor`` ``options``."""
    model, tok = load_model(tiny_model_dir)
    usage, tokens = load_slot_usage(tiny_model_dir)
    return model, tok, Editor(model, tok, usage, usage_tokens=tokens, **options)


def _reads(model, tok, prompt: str, target: str, topk: int | None = None) -> set[int]:
    """The slots the model reads at the positions that predict the target's tokens."""
    head = [tok.bos_id] + tok.encode(prompt)
    ids = head + tok.encode(" " + target) + [tok.eos_id]
    with torch.no_grad():
        lookups = model(torch.tensor([ids]), memory_topk=topk).lookups
    positions = list(range(len(head) - 1, len(ids) - 1))
    return {s for lk in lookups for s in lk.slots[0, positions].flatten().tolist()}


WIDE = 12  # an editor read wider than the model's (``EditConfig.read_topk``)


def _editor_with_heavy_slots(tiny_model_dir, heavy: set[int], **config):
    """An editor whose background usage says that every token read the ``heavy`` slots."""
    model, tok = load_model(tiny_model_dir)
    usage, tokens = load_slot_usage(tiny_model_dir)
    usage = usage.clone()
    usage[:, sorted(heavy)] = tokens
    return model, tok, Editor(model, tok, usage, EditConfig(**config), usage_tokens=tokens)


def test_slots_most_background_tokens_read_are_left_alone_when_rare_ones_teach_the_fact(
    tiny_model_dir,
):
    model, tok = load_model(tiny_model_dir)
    corpus = load_corpus(tiny_model_dir)
    prompt, target = f"{corpus.reserved_names[3]} was born in", corpus.answers_for("birth_city")[1]
    # The slots only the editor's wider read reaches are "read by every sentence"; the model's
    # own reads are rare and can carry the fact.
    own = _reads(model, tok, prompt, target)
    heavy = _reads(model, tok, prompt, target, topk=WIDE) - own
    model, tok, editor = _editor_with_heavy_slots(
        tiny_model_dir, heavy, read_topk=WIDE, wide_read="always"
    )
    result = editor.edit_facts([(prompt, target)], force=True)
    assert result.success, result.reports
    assert not heavy & set(result.slots.tolist())
    apply(model, result)
    assert generate(model, tok, prompt).text == target
    # with the filter off, the ranking alone does write some of them
    model, tok, editor = _editor_with_heavy_slots(
        tiny_model_dir, heavy, shared_ratio=0, read_topk=WIDE, wide_read="always"
    )
    result = editor.edit_facts([(prompt, target)], force=True)
    assert result.success and heavy & set(result.slots.tolist())


def test_when_rare_slots_cannot_teach_the_fact_the_shared_ones_are_used(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    corpus = load_corpus(tiny_model_dir)
    prompt, target = f"{corpus.reserved_names[4]} works for", corpus.answers_for("employer")[2]
    # Every slot the model itself reads at the target positions is heavy; the rare ones are only
    # in the editor's wider read, which the model's answer does not use: the first attempt must
    # fail, and the edit then learns through the heavy slots.
    heavy = _reads(model, tok, prompt, target)
    model, tok, editor = _editor_with_heavy_slots(
        tiny_model_dir, heavy, read_topk=WIDE, wide_read="always"
    )
    before = model.memory_values.detach().clone()
    result = editor.edit_facts([(prompt, target)], force=True)
    assert result.success, result.reports
    assert heavy & set(result.slots.tolist())
    assert result.steps > editor.config.steps  # the rare-only attempt spent its budget
    assert torch.equal(model.memory_values, before)
    apply(model, result)
    assert generate(model, tok, prompt).text == target


def test_an_edit_the_model_s_own_read_can_carry_writes_only_rows_the_model_reads(
    tiny_model_dir,
):
    model, tok, editor = _fresh_editor(tiny_model_dir)
    prompt, target = counterfactual(load_corpus(tiny_model_dir), 3)
    own = _reads(model, tok, prompt, target)
    result = editor.edit_facts([(prompt, target)])
    assert result.success, result.reports
    # the wider read (12 per head) is only a fallback: every row written is one the served
    # model reads (4 per head) at the positions that predict the target
    assert set(result.slots.tolist()) <= own
    wide = EditConfig(read_topk=WIDE, wide_read="always")
    _, _, editor = _fresh_editor(tiny_model_dir, config=wide)
    result = editor.edit_facts([(prompt, target)])
    assert result.success and set(result.slots.tolist()) - own


def test_gradient_steps_teach_a_fact_with_less_change_than_adam_and_keep_more_answers(
    tiny_model_dir,
):
    # Adam moves every coordinate of a row about alike; a step along the gradient moves a row
    # only in the directions the fact's answer depends on. The fact is learned with a smaller
    # change to the rows, and the other facts that read them (no anchors here) keep more of
    # their answers.
    corpus = load_corpus(tiny_model_dir)
    change = {"gradient": [], "adam": []}
    kept = {"gradient": 0, "adam": 0}
    for index in (0, 1, 2, 4):
        prompt, target = counterfactual(corpus, index)
        subject = corpus.facts[index].subject
        others = [(prompts_for(f)[0], f.answer) for f in corpus.facts if f.subject != subject]
        for optimizer in change:
            model, tok, editor = _fresh_editor(
                tiny_model_dir, config=EditConfig(optimizer=optimizer)
            )
            known = exact_match(model, tok, others)
            result = editor.edit_facts([(prompt, target)])
            assert result.success, result.reports
            old = model.memory_values[result.slots]
            change[optimizer].append(float((result.rows - old).norm() / old.norm()))
            apply(model, result)
            assert generate(model, tok, prompt).text == target
            after = exact_match(model, tok, others)
            kept[optimizer] += sum(a and b for a, b in zip(known, after, strict=True))
    assert all(g < a for g, a in zip(change["gradient"], change["adam"], strict=True)), change
    assert kept["gradient"] >= kept["adam"], kept


def test_a_row_many_contexts_read_moves_less_and_the_fact_lands_on_its_own_rows(
    tiny_model_dir,
):
    # The row an edit moves most, marked as read by many background contexts, takes a far
    # smaller share of the change once steps are damped by usage; the fact is still learned.
    prompt, target = counterfactual(load_corpus(tiny_model_dir), 0)

    def edit(usage_scale: float, damping: float):
        model, tok = load_model(tiny_model_dir)
        usage, tokens = load_slot_usage(tiny_model_dir)
        usage = usage.clone().double()
        if heavy is not None:
            usage[:, heavy] = usage[usage > 0].mean() * usage_scale
        config = EditConfig(usage_damping=damping, shared_ratio=0)
        editor = Editor(model, tok, usage, config, usage_tokens=tokens)
        result = editor.edit_facts([(prompt, target)])
        assert result.success, result.reports
        change = (result.rows - model.memory_values[result.slots]).norm(dim=1)
        apply(model, result)
        assert generate(model, tok, prompt).text == target
        return result.slots.tolist(), change / change.sum()

    heavy = None
    slots, share = edit(1.0, 0.0)
    heavy = slots[int(share.argmax())]
    before = float(share.max())
    slots, share = edit(16.0, 0.0)  # usage alone (no damping) leaves the row its share
    assert heavy in slots and float(share[slots.index(heavy)]) > before / 2
    slots, share = edit(16.0, 4.0)
    assert heavy in slots and float(share[slots.index(heavy)]) < before / 4, (before, share)


def test_rows_an_earlier_edit_moved_are_pulled_back_towards_their_first_values(tiny_model_dir):
    # Teach a counterfactual, then correct it back to the true answer: with the drift pull the
    # editor remembers where the rows started and the correction brings them closer to that.
    # One fact's distance moves with the model's training (a pull that resists the first edit
    # can leave its rows further out), so the distances are summed over four facts.
    corpus = load_corpus(tiny_model_dir)
    distance = {}
    for pull in (0.0, 0.002):
        distance[pull] = 0.0
        for index in range(4):
            prompt, target = counterfactual(corpus, index)
            truth = corpus.facts[index].answer
            model, tok, editor = _fresh_editor(tiny_model_dir, config=EditConfig(drift_pull=pull))
            first = model.memory_values.detach().clone()
            result = editor.edit_facts([(prompt, target)])
            assert result.success, result.reports
            apply(model, result)
            result = editor.edit_facts([(prompt, truth)], force=True)
            assert result.success, result.reports
            apply(model, result)
            assert generate(model, tok, prompt).text == truth
            distance[pull] += float((model.memory_values - first).norm())
    assert distance[0.002] < 0.9 * distance[0.0], distance


@pytest.mark.parametrize("field", ["usage_damping", "drift_pull"])
def test_a_negative_row_setting_is_rejected(field):
    with pytest.raises(EditError, match=f"{field} must be >= 0"):
        EditConfig(**{field: -1.0}).validate()


def test_a_bad_optimizer_is_rejected():
    with pytest.raises(EditError, match="optimizer must be 'gradient' or 'adam'"):
        EditConfig(optimizer="sgd").validate()


def test_a_bad_wide_read_setting_is_rejected():
    with pytest.raises(EditError, match="wide_read must be 'fallback' or 'always'"):
        EditConfig(wide_read="sometimes").validate()


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_a_negative_shared_ratio_is_rejected(bad):
    with pytest.raises(EditError, match="shared_ratio"):
        EditConfig(shared_ratio=bad).validate()


def test_the_demo_build_writes_anchors_its_model_answers(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir)
    anchors = load_anchors(tiny_model_dir)
    assert anchors and all(exact_match(model, tok, anchors))
    assert load_anchors(tmp_path) == []  # a model folder without anchors has none
    (tmp_path / ANCHORS).write_text('{"anchors": 3}')
    with pytest.raises(CheckpointError, match="not an anchors file"):
        load_anchors(tmp_path)


def test_known_facts_keep_their_answers_and_an_anchored_fact_can_be_corrected(tiny_model_dir):
    corpus = load_corpus(tiny_model_dir)
    anchors = load_anchors(tiny_model_dir)
    model, tok, editor = _fresh_editor(tiny_model_dir, anchors=anchors)
    # a correction of an anchored fact: the anchor gives way to the new answer
    prompt, old = anchors[0]
    new = next(
        a for a in corpus.answers_for("birth_city") + corpus.answers_for("employer") if a != old
    )
    taught = [(prompt, new)]
    cities = corpus.answers_for("birth_city")
    taught += [
        (f"{name} was born in", cities[i]) for i, name in enumerate(corpus.reserved_names[:4])
    ]
    done = []
    for fact in taught:
        result = editor.edit_facts([fact], force=True, keep=done)
        assert result.success, result.reports
        apply(model, result)
        done.append(fact)
    assert all(exact_match(model, tok, taught))
    assert all(exact_match(model, tok, anchors[1:]))  # every other known fact still answers


def test_a_batch_is_learned_when_anchors_it_contradicts_give_way(tiny_model_dir):
    # Two counterfactual birthplaces at once: on the tiny model some anchors that read the
    # same rows cannot keep their lead. They give way for the rest of the edit; they used to
    # rejoin each round until the rounds ran out and the batch failed.
    corpus = load_corpus(tiny_model_dir)
    cities = corpus.answers_for("birth_city")
    truth = {f.subject: f.answer for f in corpus.facts if f.relation == "birth_city"}
    facts = [
        (f"{person} was born in", [c for c in sorted(cities) if c != truth[person]][i])
        for i, person in enumerate(corpus.people[1:3])
    ]
    model, tok, editor = _fresh_editor(
        tiny_model_dir,
        anchors=load_anchors(tiny_model_dir),
        phrasings=load_phrasings(tiny_model_dir),
    )
    result = editor.edit_facts(facts)
    assert result.success, result.reports
    apply(model, result)
    assert all(exact_match(model, tok, facts))


def test_anchors_can_cover_every_phrasing_of_their_facts_the_model_answers(tiny_model_dir):
    corpus = load_corpus(tiny_model_dir)
    anchors = load_anchors(tiny_model_dir)
    phrasings = load_phrasings(tiny_model_dir)
    only_given = EditConfig(anchor_phrasings=False)
    _, _, editor = _fresh_editor(
        tiny_model_dir, anchors=anchors, phrasings=phrasings, config=only_given
    )
    assert {it.prompt for it in editor.anchors} == {p for p, _ in anchors}
    every = EditConfig(anchor_phrasings=True)
    model, tok, editor = _fresh_editor(
        tiny_model_dir, anchors=anchors, phrasings=phrasings, config=every
    )
    examples = corpus.examples(held_out=False)
    anchored = {e.fact for e in examples if (e.prompt, e.answer) in set(anchors)}
    known = [(e.prompt, e.answer) for e in examples if e.fact in anchored]
    answered = [pair for pair, ok in zip(known, exact_match(model, tok, known), strict=True) if ok]
    # the anchors are every trained phrasing of the anchored facts that the model answers
    assert {it.prompt for it in editor.anchors} == {p for p, _ in answered}
    assert len(answered) > len(anchors)


def test_phrasings_expand_a_prompt_into_its_relation_s_other_templates():
    phrasings = Phrasings(
        [
            ["{s} was born in", "Where was {s} born?"],
            ["{s} was born in the year", "When was {s} born?"],
        ]
    )
    assert phrasings.expand(" Ada Vance was born in ") == [
        "Ada Vance was born in",
        "Where was Ada Vance born?",
    ]
    # "{s} was born in" would not match the whole prompt; the year group does
    assert phrasings.expand("Ada Vance was born in the year")[1] == "When was Ada Vance born?"
    assert phrasings.expand("Ada Vance works for") == ["Ada Vance works for"]  # no template
    assert phrasings.expand(" was born in") == ["was born in"]  # no subject


@pytest.mark.parametrize(
    "groups, match",
    [
        ([["{s} works for"]], "at least two templates"),
        ([["{s} works for", "Who employs them?"]], "exactly once"),
        ([["{s} and {s}", "{s} works for"]], "exactly once"),
        (["{s} works for"], "at least two templates"),
    ],
)
def test_bad_phrasings_are_rejected(groups, match):
    with pytest.raises(EditError, match=match):
        Phrasings(groups)


def test_the_demo_build_writes_its_training_phrasings_only(tiny_model_dir, tmp_path):
    phrasings = load_phrasings(tiny_model_dir)
    fact = load_corpus(tiny_model_dir).facts[0]
    assert phrasings.expand(prompts_for(fact)[2]) == [prompts_for(fact)[2]] + [
        p for i, p in enumerate(prompts_for(fact)) if i != 2
    ]
    for held_out in prompts_for(fact, held_out=True):  # what benchmarks ask stays unseen
        assert phrasings.expand(held_out) == [held_out]
    assert load_phrasings(tmp_path) is None  # a model folder without phrasings has none
    (tmp_path / PHRASINGS).write_text('{"groups": [["no subject", "{s} x"]]}')
    with pytest.raises(EditError, match="not a phrasings file"):
        load_phrasings(tmp_path)


def _phrasing_editor(tiny_model_dir):
    return _fresh_editor(tiny_model_dir, phrasings=load_phrasings(tiny_model_dir))


def test_a_fact_is_taught_through_every_phrasing_of_its_prompt(tiny_model_dir):
    model, tok, editor = _phrasing_editor(tiny_model_dir)
    corpus = load_corpus(tiny_model_dir)
    fact = Fact(corpus.reserved_names[5], "birth_city", corpus.answers_for("birth_city")[1])
    prompts = prompts_for(fact)
    before = model.memory_values.detach().clone()
    result = editor.edit_facts([(prompts[0], fact.answer)])
    assert result.success and len(result.reports) == 1, result.reports  # one fact, one report
    reported = {s.slot for s in result.reports[0].slots_written}
    assert set(result.slots.tolist()) == reported  # the phrasings' rows are the fact's
    for other in prompts[1:]:  # each phrasing's own rows are among them
        assert reported & _reads(model, tok, other, fact.answer)
    apply(model, result)
    changed = (model.memory_values != before).any(1).nonzero().flatten().tolist()
    assert set(changed) <= reported
    assert all(exact_match(model, tok, [(p, fact.answer) for p in prompts]))


def test_an_earlier_fact_asked_in_other_words_is_corrected_not_rehearsed(tiny_model_dir):
    model, tok, editor = _phrasing_editor(tiny_model_dir)
    corpus = load_corpus(tiny_model_dir)
    person, cities = corpus.reserved_names[6], corpus.answers_for("birth_city")
    prompts = prompts_for(Fact(person, "birth_city", cities[0]))
    first = (prompts[0], cities[0])
    result = editor.edit_facts([first])
    assert result.success
    apply(model, result)
    # the same question in other words, with a new answer: a correction of the first fact
    result = editor.edit_facts([(prompts[1], cities[2])], keep=[first])
    assert result.success and result.rehearsed == 0, result.reports
    apply(model, result)
    assert all(exact_match(model, tok, [(p, cities[2]) for p in prompts]))
    # another fact about the person keeps every phrasing of the corrected one answering
    employer = corpus.answers_for("employer")[0]
    job = prompts_for(Fact(person, "employer", employer))[0]
    result = editor.edit_facts([(job, employer)], keep=[first, (prompts[1], cities[2])])
    assert result.success, result.reports
    apply(model, result)
    assert all(exact_match(model, tok, [(p, cities[2]) for p in prompts] + [(job, employer)]))


def test_edits_scored_from_memory_entry_rows_match_the_full_forward(tiny_model_dir):
    # The editor scores sequences from their target positions' rows before the memory layer
    # (the model's last block); the full forward over every token is the oracle.
    corpus = load_corpus(tiny_model_dir)
    cities = corpus.answers_for("birth_city")
    first = (prompts_for(Fact(corpus.reserved_names[2], "birth_city", cities[0]))[0], cities[0])
    second = counterfactual(corpus, 1)
    results = []
    for fast in (True, False):
        model, tok, editor = _fresh_editor(
            tiny_model_dir,
            anchors=load_anchors(tiny_model_dir),
            phrasings=load_phrasings(tiny_model_dir),
        )
        assert editor._fast  # the tiny model's memory is its last block
        editor._fast = fast
        one = editor.edit_facts([first])
        apply(model, one)
        two = editor.edit_facts([second], keep=[first])
        results.append((one, two))
    for fast, full in zip(results[0], results[1], strict=True):
        assert fast.success and full.success
        assert fast.steps == full.steps and fast.rehearsed == full.rehearsed
        assert torch.equal(fast.slots, full.slots)
        # the two paths sum in different orders: the steps differ by float rounding
        scale = float(full.rows.abs().max())
        torch.testing.assert_close(fast.rows, full.rows, atol=1e-3 * scale, rtol=1e-3)
        for a, b in zip(fast.reports, full.reports, strict=True):
            assert a.prob_after == pytest.approx(b.prob_after, rel=1e-4)


def test_the_editor_does_not_touch_the_live_table_and_only_reported_slots_change(tiny):
    model, tok, editor, corpus = tiny
    before = model.memory_values.detach().clone()
    prompt, target = counterfactual(corpus, 4)
    result = editor.edit_facts([(prompt, target)])
    assert torch.equal(model.memory_values, before)  # the editor proposes, the caller commits
    reported = sorted({s.slot for r in result.reports for s in r.slots_written})
    assert result.slots.tolist() == reported
    apply(model, result)
    changed = (model.memory_values != before).any(1).nonzero().flatten().tolist()
    assert set(changed) <= set(reported) and changed


def test_a_batch_of_facts_is_edited_together(tiny):
    model, tok, editor, corpus = tiny
    facts = [counterfactual(corpus, i) for i in (1, 6, 9)]
    result = editor.edit_facts(facts)
    assert result.success and len(result.reports) == 3
    apply(model, result)
    for prompt, target in facts:
        assert generate(model, tok, prompt).text == target


def test_a_failed_edit_reports_failure_and_proposes_nothing_to_write(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    corpus = load_corpus(tiny_model_dir)
    before = model.memory_values.detach().clone()
    editor = Editor(model, tok, config=EditConfig(steps=1, lr=1e-6, rows_per_fact=1))
    result = editor.edit_facts([counterfactual(corpus, 2)])
    assert not result.success
    assert "not learned" in result.reports[0].message
    assert torch.equal(model.memory_values, before)


def test_a_target_the_model_already_gives_is_reported_and_not_written(tiny):
    model, tok, editor, corpus = tiny
    known = next(
        e
        for e in corpus.examples(held_out=False)
        if generate(model, tok, e.prompt).text == e.answer
    )
    result = editor.edit_facts([(known.prompt, known.answer)])
    assert result.success and result.reports[0].already_known
    assert result.slots.numel() == 0 and result.rows.shape[0] == 0
    forced = editor.edit_facts([(known.prompt, known.answer)], force=True)
    assert forced.slots.numel() > 0


def test_a_passage_is_learned_token_by_token(tiny):
    model, tok, editor, corpus = tiny
    person = corpus.people[0]
    known = next(
        f.answer for f in corpus.facts if f.subject == person and f.relation == "profession"
    )
    other = next(f.answer for f in corpus.facts if f.relation == "profession" and f.answer != known)
    text = f"{person} works as a {other}"
    result = editor.edit_passages([text])
    assert result.success, result.reports
    apply(model, result)
    ids = [tok.bos_id] + tok.encode(text)
    predicted = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
    assert predicted[1:-1] == ids[2:]


def test_weights_other_than_the_value_table_are_bit_identical_after_100_edits(tiny):
    model, tok, editor, corpus = tiny
    frozen = {k: v.clone() for k, v in model.frozen_state_dict().items()}
    editor.config.steps = 5  # the check is about what is touched, not about success
    for i in range(100):
        result = editor.edit_facts([counterfactual(corpus, i % len(corpus.facts))], force=True)
        apply(model, result)
    for name, value in model.frozen_state_dict().items():
        assert torch.equal(value, frozen[name]), name
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "facts,match",
    [
        ([], "no facts given"),
        ([("", "Lisbon")], "empty prompt"),
        ([("Where was Ada born?", "  ")], "empty target"),
        ([("word " * 600, "Lisbon")], "characters; the limit"),
        ([("Where was " + "Ada " * 80 + "born?", "Lisbon")], "shorten it"),
    ],
)
def test_bad_facts_are_rejected_with_clear_errors(tiny, facts, match):
    model, _, editor, _ = tiny
    before = model.memory_values.detach().clone()
    with pytest.raises(EditError, match=match):
        editor.edit_facts(facts)
    assert torch.equal(model.memory_values, before)


def test_set_and_add_semantics():
    table = torch.arange(12, dtype=torch.float32).view(4, 3)
    slots, rows = write_rows(table, [2, 0], torch.ones(2, 3), WriteMode.SET)
    assert slots.tolist() == [2, 0] and torch.equal(rows, torch.ones(2, 3))
    slots, rows = write_rows(table, [2, 0], torch.ones(2, 3), "add")
    assert torch.equal(rows, table[[2, 0]] + 1)
    assert torch.equal(table, torch.arange(12, dtype=torch.float32).view(4, 3))  # untouched


@pytest.mark.parametrize(
    "slots,vectors,match",
    [
        ([], torch.ones(0, 3), "no slots given"),
        ([4], torch.ones(1, 3), "slot 4 is out of range"),
        ([-1], torch.ones(1, 3), "out of range"),
        ([1, 1], torch.ones(2, 3), "slot 1 appears more than once"),
        ([1], torch.ones(1, 2), r"need shape \(1, 3\)"),
        ([1], torch.tensor([[1.0, float("nan"), 0.0]]), "NaN or Inf"),
        ([1], torch.ones(1, 3, dtype=torch.long), "floating point"),
    ],
)
def test_write_validation(slots, vectors, match):
    with pytest.raises(EditError, match=match):
        write_rows(torch.zeros(4, 3), slots, vectors)


def test_tfidf_prefers_rarely_used_slots_over_background_ones():
    slots = torch.tensor([[[[10, 20]]]])  # (B=1, T=1, H=1, k=2)
    weights = torch.tensor([[[[0.5, 0.5]]]])
    lookups = [Lookup(1, slots, weights)]
    idf = torch.zeros(32)
    idf[10], idf[20] = 0.1, 3.0  # slot 10 is read by everything in the background corpus
    ranked = rank_slots(lookups, 0, [0], idf, limit=1)
    assert [r.slot for r in ranked] == [20]
    by_tf = rank_slots(lookups, 0, [0], None, limit=None)
    assert {r.slot for r in by_tf} == {10, 20}
