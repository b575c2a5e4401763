"""The memory-layer transformer: config validation, decoding, checkpoints, lookups."""

import pytest
import torch

from memslot.model.checkpoint import load_model, save_model
from memslot.model.config import ConfigError, MemoryConfig, ModelConfig
from memslot.model.generate import generate
from memslot.model.memory import PatchedValues
from memslot.model.train import exact_match
from memslot.model.transformer import MemoryTransformer, PromptTooLongError


def small_config(**memory) -> ModelConfig:
    mem = dict(n_keys=8, heads=2, topk=3, k_dim=8, layers=(1,))
    mem.update(memory)
    return ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=2,
        ffn_hidden=16,
        max_seq_len=24,
        memory=MemoryConfig(**mem),
    )


def random_model(seed=0, **memory) -> MemoryTransformer:
    torch.manual_seed(seed)
    model = MemoryTransformer(small_config(**memory))
    model.memory_values.data.normal_()  # large values make the memory visible in the logits
    return model.eval()


@pytest.mark.parametrize(
    "memory,model,match",
    [
        (dict(n_keys=0), {}, "n_keys must be a positive integer"),
        (dict(n_keys=2.5), {}, "n_keys must be a positive integer"),
        (dict(n_keys=4, topk=5), {}, r"topk \(5\) is larger than memory.n_keys \(4\)"),
        (dict(k_dim=7), {}, "k_dim must be an even integer"),
        (dict(layers=(5,)), {}, "memory layer index 5 is outside"),
        ({}, dict(n_heads=5), r"n_heads \(5\) must divide d_model \(32\)"),
        ({}, dict(d_model=0), "d_model must be a positive integer"),
    ],
)
def test_invalid_configs_are_rejected_with_a_message_that_says_what_to_fix(memory, model, match):
    mem = dict(n_keys=8, heads=2, topk=3, k_dim=8, layers=(1,))
    mem.update(memory)
    kwargs = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=2)
    kwargs.update(model)
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs, memory=MemoryConfig(**mem))


def test_config_round_trips_through_json(tmp_path):
    cfg = small_config(qk_norm=False)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg


def test_kv_cache_decoding_equals_full_recomputation():
    model = random_model()
    for seed in range(3):
        tokens = torch.randint(3, 50, (1, 6), generator=torch.Generator().manual_seed(seed))
        full = model(tokens).logits
        cache = model.new_cache()
        first = model(tokens[:, :4], cache=cache).logits
        rest = [model(tokens[:, i : i + 1], cache=cache).logits for i in (4, 5)]
        stepped = torch.cat([first] + rest, dim=1)
        torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_is_the_same_with_and_without_the_cache(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    for prompt in ["Where was", "The founder of", "Q: Who"]:
        with_cache = generate(model, tok, prompt, max_new_tokens=8)
        without = generate(model, tok, prompt, max_new_tokens=8, use_cache=False)
        assert with_cache.tokens == without.tokens


def test_sampling_is_reproducible_with_a_seed_and_greedy_at_temperature_zero(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    a = generate(model, tok, "The job of", max_new_tokens=6, temperature=1.5, seed=7)
    b = generate(model, tok, "The job of", max_new_tokens=6, temperature=1.5, seed=7)
    assert a.tokens == b.tokens
    greedy = generate(model, tok, "The job of", max_new_tokens=6)
    assert len(greedy.tokens) <= 6


def test_generation_stops_at_the_token_limit_or_the_end_token(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    g = generate(model, tok, "Where was", max_new_tokens=2)
    assert len(g.tokens) <= 2
    g = generate(model, tok, "Where was", max_new_tokens=30)
    assert g.stopped_at_eos == (g.tokens[-1] == tok.eos_id)
    assert tok.eos_id not in g.tokens[:-1]


def test_over_long_and_empty_prompts_give_clear_errors(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    with pytest.raises(PromptTooLongError, match="shorten"):
        generate(model, tok, "word " * 500)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, tok, "")
    with pytest.raises(PromptTooLongError, match="max_seq_len"):
        model(torch.zeros(1, model.cfg.max_seq_len + 1, dtype=torch.long))


def test_checkpoint_round_trip_is_bit_exact_and_generates_identically(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir)
    save_model(model, tok, tmp_path / "copy")
    again, tok2 = load_model(tmp_path / "copy")
    for (name, a), (name2, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert name == name2 and torch.equal(a, b), name
    assert tok2.encode("Where was Ada Vance born?") == tok.encode("Where was Ada Vance born?")
    for prompt in ["Where was", "The employer of"]:
        assert generate(model, tok, prompt).tokens == generate(again, tok2, prompt).tokens


def test_lookup_reports_exactly_the_rows_the_output_depends_on():
    model = random_model(seed=1)
    tokens = torch.tensor([[5, 9, 13, 2]])
    out = model(tokens)
    (lookup,) = out.lookups
    assert lookup.slots.shape == (1, 4, 2, 3) and lookup.weights.shape == (1, 4, 2, 3)
    torch.testing.assert_close(lookup.weights.sum(-1), torch.ones(1, 4, 2))
    read = set(lookup.slots.flatten().tolist())
    unread = next(s for s in range(model.cfg.memory.n_slots) if s not in read)
    reported = next(iter(read))

    patched = model.memory_values.detach().clone()
    patched[unread] += 10.0
    assert torch.equal(model(tokens, values=patched).logits, out.logits)

    patched = model.memory_values.detach().clone()
    patched[reported] += 10.0
    assert not torch.allclose(model(tokens, values=patched).logits, out.logits)


def test_patched_values_read_and_differentiate_like_a_patched_copy_of_the_table():
    # The editor reads a few replaced rows through PatchedValues instead of copying the table.
    model = random_model(seed=3, layers=(0, 1))  # two memory layers: reads chain through both
    tokens = torch.tensor([[5, 9, 13, 2, 7, 7], [1, 4, 4, 8, 30, 11]])
    read = sorted(set(model(tokens).lookups[0].slots.flatten().tolist()))
    slots = torch.tensor(read[::2] + [model.cfg.memory.n_slots - 1])  # read and unread rows
    table = model.memory_values.detach()
    new_rows = torch.randn(len(slots), table.shape[1], generator=torch.Generator().manual_seed(4))

    rows_copy = new_rows.clone().requires_grad_(True)
    with torch.enable_grad():
        expected = model(tokens, values=table.index_put((slots,), rows_copy)).logits
        expected.pow(2).sum().backward()
    rows = new_rows.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(tokens, values=PatchedValues(table, slots, rows)).logits
        logits.pow(2).sum().backward()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.grad, rows_copy.grad, rtol=1e-4, atol=1e-5)
    assert rows.grad[:-1].abs().sum() > 0  # read rows get gradients
    assert table.grad is None


def test_memory_entry_and_exit_give_the_model_s_logits_when_memory_is_the_last_block():
    # The editor scores target positions from their memory-entry rows: that split must give
    # the full forward's logits, with a patched table too.
    model = random_model(seed=3)  # memory in block 1 of 2: the last one
    assert model.memory_is_last
    assert not random_model(seed=3, layers=(0,)).memory_is_last
    assert not random_model(seed=3, layers=(0, 1)).memory_is_last
    tokens = torch.randint(0, 50, (3, 11))
    slots = torch.tensor([2, 9, 40])
    rows = torch.randn(3, model.cfg.value_dim)
    patched = PatchedValues(model.memory_values.detach(), slots, rows)
    with torch.no_grad():
        x = model.memory_entry(tokens)  # (B, T, D)
        for values, topk in ((None, None), (patched, None), (patched, 5)):
            full = model(tokens, values=values, memory_topk=topk).logits
            flat = x.reshape(-1, x.shape[-1])
            read_slots, read_weights = model.memory_read(flat, topk)
            table = model.memory_values if values is None else values
            split = model.memory_exit(flat, table, read_slots, read_weights)
            torch.testing.assert_close(split, full.reshape(split.shape), atol=1e-5, rtol=1e-5)


def test_lookup_slots_match_the_layer_lookup_method():
    model = random_model(seed=2)
    tokens = torch.tensor([[3, 4, 5]])
    (lookup,) = model(tokens).lookups
    assert lookup.layer == 1
    assert int(lookup.slots.max()) < model.cfg.memory.n_slots


def test_qk_norm_switch_changes_the_lookup():
    on, off = random_model(seed=3, qk_norm=True), random_model(seed=3, qk_norm=False)
    assert on.blocks[1].ffn.query_norm_weight is not None
    assert off.blocks[1].ffn.query_norm_weight is None
    tokens = torch.tensor([[7, 8, 9, 10]])
    assert not torch.equal(on(tokens).lookups[0].slots, off(tokens).lookups[0].slots)


def test_zeroed_value_table_silences_the_memory_layer():
    model = random_model(seed=4)
    tokens = torch.tensor([[1, 2, 3]])
    zero = torch.zeros_like(model.memory_values)
    x = torch.randn(1, 3, 32)
    y, _ = model.blocks[1].ffn(x, zero)
    assert torch.all(y == 0)
    assert model(tokens, values=zero).logits.shape == (1, 3, 50)


def test_teacher_forced_exact_match_agrees_with_greedy_decoding(tiny_model_dir):
    from memslot.demo.recipe import load_corpus

    model, tok = load_model(tiny_model_dir)
    corpus = load_corpus(tiny_model_dir)
    examples = corpus.examples(held_out=False)[:40] + corpus.examples(held_out=True)[:20]
    pairs = [(e.prompt, e.answer) for e in examples]
    fast = exact_match(model, tok, pairs)
    slow = []
    for prompt, answer in pairs:
        g = generate(model, tok, prompt, max_new_tokens=12)
        slow.append(g.stopped_at_eos and g.text == answer)
    assert fast == slow
    assert any(fast), "the tiny model should know some of its training facts"


def test_normalised_keys_are_reused_while_the_keys_stay_the_same_and_follow_every_update():
    from memslot.kernels.reference import rms_normalise
    from memslot.model.memory import ProductKeyMemory

    cfg = MemoryConfig(n_keys=8, heads=2, topk=3, k_dim=8, layers=(0,))
    torch.manual_seed(0)
    layer = ProductKeyMemory(16, 16, cfg, 0)
    other = ProductKeyMemory(16, 16, cfg, 0)  # other keys, for a load
    x = torch.randn(1, 5, 16)

    def fresh(keys):  # what every call computed before: both halves normalised now
        return rms_normalise(keys[:, 0]), rms_normalise(keys[:, 1])

    with torch.no_grad():  # serving: normalised once, then reused
        first = layer.normalised_keys()
        assert all(a is b for a, b in zip(first, layer.normalised_keys(), strict=True))
        for got, want in zip(first, fresh(layer.keys), strict=True):
            assert torch.equal(got, want)
        slots, _ = layer.lookup(x)
        layer.keys.mul_(-1.5)  # an in-place update: a new version of the keys
        assert not torch.equal(layer.lookup(x)[0], slots)  # halves' signs flipped: other picks
        for got, want in zip(layer.normalised_keys(), fresh(layer.keys), strict=True):
            assert torch.equal(got, want)
    layer.load_state_dict(other.state_dict())  # a load copies in place: a new version again
    with torch.inference_mode():
        got = layer.lookup(x)
        want = other.lookup(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # made under inference_mode, the cached keys still serve a call that builds a graph
    layer.keys.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    layer.lookup(xg)[1].pow(2).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # training: the keys normalised on every call, differentiably
    layer.keys.requires_grad_(True)
    layer.lookup(x)[1].pow(2).sum().backward()
    assert layer.keys.grad is not None and layer.keys.grad.abs().sum() > 0
