"""The Engine in-process: decoding equals memslot.model.generate, swaps copy only changed rows,
and every result is computed at the one version it reports."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from memslot.demo.recipe import load_corpus
from memslot.memstore import Store
from memslot.model.checkpoint import load_model, load_values
from memslot.model.generate import generate
from memslot.service.engine import (
    DeadlineExpiredError,
    Engine,
    EngineClosedError,
    GenerateOptions,
)


@pytest.fixture
def engine(tiny_model_dir, tmp_path):
    store = Store.create(tmp_path / "store", load_values(tiny_model_dir / "values.safetensors"))
    engine = Engine.load(tiny_model_dir, store, "cpu", max_batch=4)
    yield engine
    engine.close()
    store.close()


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    return [e.prompt for e in load_corpus(tiny_model_dir).examples(held_out=False)][:6]


def answer_slots(engine: Engine, prompt: str) -> list[int]:
    """The slots read at the position that predicts the answer's first token."""
    result = engine.lookup(prompt).result()
    return sorted({int(s) for layer in result.layers for s in layer.slots[-1].flatten()})


def test_decoding_equals_generate_greedy_and_seeded(engine, prompts):
    for prompt in prompts:
        for options in (GenerateOptions(), GenerateOptions(temperature=0.9, top_k=5, seed=7)):
            result = engine.generate(prompt, options).result()
            expected = generate(
                engine.model,
                engine.tokenizer,
                prompt,
                max_new_tokens=options.max_new_tokens,
                temperature=options.temperature,
                top_k=options.top_k,
                seed=options.seed,
            )
            assert (result.text, result.tokens) == (expected.text, expected.tokens)
            assert result.version == 0


def test_first_logits_are_the_first_decoding_step(engine, prompts):
    result = engine.generate(prompts[0], GenerateOptions(return_logits=True)).result()
    ids = engine.encode(prompts[0])
    with torch.no_grad():
        expected = engine.model(torch.tensor([ids])).logits[0, -1]
    assert result.first_logits.shape == (engine.model.cfg.vocab_size,)
    assert int(result.first_logits.argmax()) == result.tokens[0]
    torch.testing.assert_close(result.first_logits, expected, rtol=1e-5, atol=1e-5)


def test_swap_copies_only_the_changed_rows_and_serves_the_new_version(engine, prompts):
    store = engine.store
    slots = answer_slots(engine, prompts[0])
    rows = torch.randn(len(slots), store.shape[1]) * 5
    record = store.commit(slots, rows, expected_parent=store.head)
    assert engine.swap_to(record.version).result() == record.version
    assert engine.served_version == record.version
    assert torch.equal(engine.model.memory_values.detach(), store.load_table(record.version))
    assert engine.stats.swaps[-1].rows == len(slots)
    result = engine.generate(prompts[0], GenerateOptions()).result()
    assert result.version == record.version


def test_swap_spanning_several_commits_reads_their_union(engine):
    store = engine.store
    dim = store.shape[1]
    store.commit([1, 2], torch.ones(2, dim), expected_parent=store.head)
    store.commit([2, 3], torch.full((2, dim), 2.0), expected_parent=store.head)
    engine.swap_to(store.head).result()
    assert engine.stats.swaps[-1].rows == 3
    assert torch.equal(engine.model.memory_values.detach(), store.load_table(store.head))


def test_a_writer_may_hand_over_the_rows_it_committed(engine):
    store = engine.store
    slots, rows = [40, 3, 17], torch.randn(3, store.shape[1])
    record = store.commit(slots, rows, expected_parent=store.head)
    engine.swap_to(record.version, (slots, rows)).result()
    assert torch.equal(engine.model.memory_values.detach(), store.load_table(record.version))


def test_swaps_only_move_forward(engine):
    with pytest.raises(ValueError, match="already queued or served"):
        engine.swap_to(0)


def test_every_result_is_computed_at_the_version_it_reports(engine, tiny_model_dir, prompts):
    """Queries race a stream of swaps; each answer equals the offline answer at its version."""
    store = engine.store
    generator = torch.Generator().manual_seed(0)
    slot_sets = [answer_slots(engine, p) for p in prompts]
    futures = []
    stop = threading.Event()

    def submit_queries():
        while not stop.is_set():
            for prompt in prompts:
                futures.append((prompt, engine.generate(prompt, GenerateOptions(max_new_tokens=4))))
            time.sleep(0.001)

    submitter = threading.Thread(target=submit_queries)
    submitter.start()
    for i in range(6):
        slots = slot_sets[i % len(slot_sets)]
        rows = torch.randn(len(slots), store.shape[1], generator=generator) * 5
        engine.swap_to(store.commit(slots, rows, expected_parent=store.head).version).result()
    stop.set()
    submitter.join()
    results = [(prompt, future.result()) for prompt, future in futures]
    versions = {r.version for _, r in results}
    assert len(versions) >= 3, versions
    for version in versions:
        model, tokenizer = load_model(tiny_model_dir, values=store.load_table(version))
        for prompt, result in results:
            if result.version == version:
                expected = generate(model, tokenizer, prompt, max_new_tokens=4)
                assert result.tokens == expected.tokens, (prompt, version)


def test_a_query_whose_deadline_passed_in_the_queue_is_not_run(engine, prompts):
    future = engine.generate(prompts[0], GenerateOptions(), deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExpiredError):
        future.result()


def test_bad_prompts_are_refused_before_queueing(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate("", GenerateOptions())
    with pytest.raises(ValueError, match="shorten"):
        engine.generate("word " * 500, GenerateOptions())


def test_closed_engine_finishes_queued_work_and_refuses_more(engine, prompts):
    queued = [engine.generate(p, GenerateOptions()) for p in prompts]
    engine.close()
    assert all(f.result().text for f in queued)
    with pytest.raises(EngineClosedError, match="shutting down"):
        engine.generate(prompts[0], GenerateOptions())


def test_engine_refuses_a_store_of_another_shape(tiny_model_dir, tmp_path):
    store = Store.create(tmp_path / "other", torch.zeros(16, 8))
    try:
        with pytest.raises(ValueError, match="another model"):
            Engine.load(tiny_model_dir, store, "cpu")
    finally:
        store.close()
