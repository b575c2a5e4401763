"""End-to-end: a real `memslot serve` process on a loopback port, driven by the generated client.

The shared server runs with tokens and TLS (when openssl is present), a 4 MiB message limit and
the TINY model. Tests that kill or stop a server start their own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from itertools import islice
from pathlib import Path

import grpc
import pytest
import serverproc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memslot.demo.corpus import prompts_for
from memslot.demo.recipe import load_corpus
from memslot.memstore import Store
from memslot.model.checkpoint import load_model
from memslot.model.generate import generate
from memslot.proto.memslot.v1 import memslot_pb2 as pb
from memslot.service.client import Client, connect, tensor_from_proto, tensor_to_proto

EDITOR = "editor-token-0123456789"
READER = "reader-token-0123456789"
SERVE = [sys.executable, "-c", "import sys; from memslot.cli.main import cli; sys.exit(cli())"]
STARTUP_SECONDS = 90


class ServerProcess(serverproc.ServerProcess):
    """The server run through this interpreter (no console script needed)."""

    def __init__(self, model_dir: Path, store_dir: Path, log_path: Path, *extra: str) -> None:
        super().__init__(
            SERVE, model_dir, store_dir, log_path, *extra, startup_seconds=STARTUP_SECONDS
        )


def make_tls_files(folder: Path) -> tuple[Path, Path] | None:
    if shutil.which("openssl") is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("service")
    (folder / "tokens.txt").write_text(f"editor {EDITOR}\nreader {READER}\n")
    extra = ["--tokens", str(folder / "tokens.txt"), "--max-message-mb", "4"]
    tls = make_tls_files(folder)
    if tls is not None:
        extra += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    process = ServerProcess(tiny_model_dir, folder / "store", folder / "server.log", *extra)
    process.start()
    process.store_dir = folder / "store"
    process.tls_ca = tls[0] if tls else None
    yield process
    process.stop()


def client_for(server: ServerProcess, token: str | None) -> Client:
    return connect(server.address, token=token, tls_ca=server.tls_ca)


@pytest.fixture(scope="module")
def editor(server):
    with client_for(server, EDITOR) as client:
        yield client.stub


@pytest.fixture(scope="module")
def reader(server):
    with client_for(server, READER) as client:
        yield client.stub


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    return [e.prompt for e in load_corpus(tiny_model_dir).examples(held_out=False)][:8]


def answer_slots(stub, prompt: str) -> list[int]:
    """The slots the prompt reads at the position that predicts the answer."""
    reply = stub.Lookup(pb.LookupRequest(prompt=prompt))
    slots = {int(s) for layer in reply.layers for s in tensor_from_proto(layer.slots)[-1].flatten()}
    return sorted(slots)


def random_rows(n: int, dim: int, seed: int, scale: float = 5.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale


def head_of(stub) -> int:
    return stub.Status(pb.StatusRequest()).head_version


def logits_bytes(reply: pb.GenerateResponse) -> bytes:
    assert reply.first_logits.dtype == "float32"
    return reply.first_logits.data


def write(stub, slots, rows, **fields) -> pb.CommitResponse:
    return stub.WriteSlots(pb.WriteSlotsRequest(slots=slots, rows=tensor_to_proto(rows), **fields))


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return info.value.code(), info.value.details()


# ----------------------------------------------------------------------------------- behaviour


def test_status_describes_the_served_model(editor, server):
    status = editor.Status(pb.StatusRequest())
    assert status.n_slots == 1024 and status.dim == 64 and status.dtype == "float32"
    assert status.device == "cpu"
    assert status.served_version == status.head_version
    assert list(status.memory_layers) == [1]
    assert "version 0" in server.ready_line and server.address in server.ready_line


def test_write_changes_the_answer_and_rollback_restores_it_bit_for_bit(editor, prompts):
    prompt = prompts[0]
    before = editor.Generate(pb.GenerateRequest(prompt=prompt, return_logits=True))
    assert before.version == head_of(editor)
    slots = answer_slots(editor, prompt)
    rows = random_rows(len(slots), 64, seed=1)

    written = write(editor, slots, rows, expected_parent=before.version, message="overwrite")
    assert written.version.version == before.version + 1
    assert written.served_version == written.version.version  # served when the reply comes
    assert list(written.version.slots) == slots and written.version.kind == "write"
    after = editor.Generate(pb.GenerateRequest(prompt=prompt, return_logits=True))
    assert after.version == written.version.version
    assert logits_bytes(after) != logits_bytes(before)
    read = editor.ReadSlots(pb.ReadSlotsRequest(slots=slots, version=str(after.version)))
    assert torch.equal(tensor_from_proto(read.rows), rows)

    rolled = editor.Rollback(pb.RollbackRequest(target=str(before.version)))
    assert rolled.version.kind == "rollback" and rolled.served_version == rolled.version.version
    assert json.loads(rolled.version.meta_json)["target"] == before.version
    restored = editor.Generate(pb.GenerateRequest(prompt=prompt, return_logits=True))
    assert restored.version == rolled.version.version
    assert (restored.text, list(restored.tokens)) == (before.text, list(before.tokens))
    assert logits_bytes(restored) == logits_bytes(before)  # bit-identical logits


def test_a_write_that_changes_the_text(editor, prompts):
    """Some overwrite of the answer's slots changes the generated text, and it is reported."""
    prompt = prompts[1]
    original = editor.Generate(pb.GenerateRequest(prompt=prompt))
    slots = answer_slots(editor, prompt)
    for seed in range(10):
        write(editor, slots, random_rows(len(slots), 64, seed=100 + seed, scale=20.0))
        changed = editor.Generate(pb.GenerateRequest(prompt=prompt))
        if changed.text != original.text:
            break
    assert changed.text != original.text
    editor.Rollback(pb.RollbackRequest(target=str(original.version)))
    assert editor.Generate(pb.GenerateRequest(prompt=prompt)).text == original.text


def test_add_mode_adds_to_the_rows_at_the_parent(editor):
    slots = [5, 9]
    base = tensor_from_proto(editor.ReadSlots(pb.ReadSlotsRequest(slots=slots)).rows)
    delta = random_rows(2, 64, seed=2, scale=0.1)
    reply = write(editor, slots, delta, mode=pb.ADD)
    after = editor.ReadSlots(pb.ReadSlotsRequest(slots=slots, version=str(reply.version.version)))
    assert torch.equal(tensor_from_proto(after.rows), base + delta)
    assert json.loads(reply.version.meta_json)["mode"] == "add"


def test_generate_stream_sends_each_token_then_the_whole_text(editor, prompts):
    expected = editor.Generate(pb.GenerateRequest(prompt=prompts[2]))
    chunks = list(editor.GenerateStream(pb.GenerateRequest(prompt=prompts[2])))
    assert chunks[-1].done and chunks[-1].text == expected.text
    assert [c.token for c in chunks[:-1]] == list(expected.tokens)
    assert len({c.version for c in chunks}) == 1


def test_lookup_shows_slots_and_weights_per_token_layer_and_head(editor, prompts):
    reply = editor.Lookup(pb.LookupRequest(prompt=prompts[0]))
    assert reply.token_strings[1:] and len(reply.tokens) == len(reply.token_strings)
    (layer,) = reply.layers
    slots, weights = tensor_from_proto(layer.slots), tensor_from_proto(layer.weights)
    assert layer.layer == 1
    assert slots.shape == weights.shape == (len(reply.tokens), 2, 4)  # (T, heads, top-k)
    assert slots.dtype == torch.int64 and int(slots.max()) < 1024
    torch.testing.assert_close(weights.sum(-1), torch.ones(slots.shape[:2]))


def test_history_log_show_tag_and_diff(editor):
    first = write(editor, [100, 101], random_rows(2, 64, seed=3)).version.version
    second = write(editor, [101, 102], random_rows(2, 64, seed=4)).version.version
    tagged = editor.Tag(pb.TagRequest(name="before-fix", version=str(first)))
    assert tagged.version == first and tagged.tags["before-fix"] == first

    log = editor.ListVersions(pb.ListVersionsRequest(limit=2))
    assert [v.version for v in log.versions] == [second, first] and log.head == second
    assert list(editor.GetVersion(pb.GetVersionRequest(version="before-fix")).tags) == [
        "before-fix"
    ]
    assert editor.GetVersion(pb.GetVersionRequest(version="head~1")).version == first
    assert editor.GetVersion(pb.GetVersionRequest()).version == second

    diff = editor.Diff(pb.DiffRequest(from_version="before-fix", to_version="head", rows=True))
    assert (diff.from_version, diff.to_version, list(diff.slots)) == (first, second, [101, 102])
    assert tensor_from_proto(diff.after).shape == (2, 64)
    editor.Tag(pb.TagRequest(name="before-fix", delete=True))
    assert code_of(editor.GetVersion, pb.GetVersionRequest(version="before-fix"))[0] == (
        grpc.StatusCode.NOT_FOUND
    )


def test_watch_versions_sees_every_commit_in_order(editor):
    start = head_of(editor) + 1
    stream = editor.WatchVersions(pb.WatchVersionsRequest(from_version=str(start)))
    seen: list[pb.Version] = []
    watcher = threading.Thread(target=lambda: seen.extend(islice(stream, 6)))
    watcher.start()
    committed = [write(editor, [7 + i], random_rows(1, 64, seed=10 + i)).version for i in range(5)]
    committed.append(editor.Rollback(pb.RollbackRequest(target=str(start - 1))).version)
    watcher.join(30)
    stream.cancel()
    assert [v.version for v in seen] == list(range(start, start + 6))
    assert [(v.kind, list(v.slots)) for v in seen] == [(v.kind, list(v.slots)) for v in committed]

    replay = editor.WatchVersions(pb.WatchVersionsRequest(from_version="0"))
    assert [v.version for v in islice(replay, 3)] == [0, 1, 2]
    replay.cancel()


def test_inject_fact_changes_the_answer(editor, tiny_model_dir):
    pytest.importorskip("memslot.edit")
    corpus = load_corpus(tiny_model_dir)
    example = next(iter(corpus.examples(held_out=False)))
    before = editor.Generate(pb.GenerateRequest(prompt=example.prompt))
    answers = corpus.answers_for(example.fact.relation)
    target = next(a for a in answers if a != example.answer and a not in before.text)
    reply = editor.InjectFacts(
        pb.InjectFactsRequest(facts=[pb.Fact(prompt=example.prompt, target=target)])
    )
    assert reply.success and reply.committed, reply.message
    assert reply.version.kind == "inject" and reply.served_version == reply.version.version
    assert json.loads(reply.version.meta_json)["facts"] == [
        {"prompt": example.prompt, "target": target}
    ]
    assert reply.reports[0].prob_after > reply.reports[0].prob_before
    after = editor.Generate(pb.GenerateRequest(prompt=example.prompt))
    assert after.version == reply.version.version and after.text == target
    # the server's editor has the model folder's phrasings: the fact answers asked other ways
    for prompt in prompts_for(example.fact)[1:]:
        assert editor.Generate(pb.GenerateRequest(prompt=prompt)).text == target, prompt

    code, _ = code_of(editor.InjectFacts, pb.InjectFactsRequest(facts=[pb.Fact(prompt="x")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_fine_tune_commits_a_finetune_version(editor, tiny_model_dir):
    pytest.importorskip("memslot.edit")
    example = next(iter(load_corpus(tiny_model_dir).examples(held_out=False)))
    passage = f"{example.prompt} {example.answer}"
    reply = editor.FineTune(pb.FineTuneRequest(passages=[passage], message="refresh"))
    if reply.committed:
        assert reply.version.kind == "finetune" and reply.version.message == "refresh"
        assert json.loads(reply.version.meta_json)["passages"] == [passage]
        assert reply.served_version == reply.version.version == head_of(editor)
    else:  # the editor could not learn it: nothing was written, and the reply says why
        assert not reply.success and "nothing was committed" in reply.message
    code, _ = code_of(editor.FineTune, pb.FineTuneRequest(passages=[""]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# ----------------------------------------------------------------------------------------- auth


def test_tokens_decide_who_may_call_what(server, reader):
    with client_for(server, None) as anonymous, client_for(server, "wrong-token-000") as wrong:
        for stub in (anonymous.stub, wrong.stub):
            code, details = code_of(stub.Status, pb.StatusRequest())
            assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
            code, _ = code_of(stub.WatchVersions, pb.WatchVersionsRequest(from_version="0"))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        # Health and reflection stay open for generic tools.
        health = health_pb2_grpc.HealthStub(anonymous.channel)
        check = health.Check(health_pb2.HealthCheckRequest(service="memslot.v1.MemoryService"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(anonymous.channel)
        answer = next(
            reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {"memslot.v1.MemoryService", "grpc.health.v1.Health"} <= names

    assert reader.Generate(pb.GenerateRequest(prompt="Where was")).version >= 0
    assert reader.ReadSlots(pb.ReadSlotsRequest(slots=[1])).rows.shape == [1, 64]
    writes = [
        (
            reader.WriteSlots,
            pb.WriteSlotsRequest(slots=[1], rows=tensor_to_proto(torch.zeros(1, 64))),
        ),
        (reader.Rollback, pb.RollbackRequest(target="0")),
        (reader.Tag, pb.TagRequest(name="x", version="0")),
        (reader.InjectFacts, pb.InjectFactsRequest(facts=[pb.Fact(prompt="a", target="b")])),
        (reader.FineTune, pb.FineTuneRequest(passages=["a"])),
    ]
    for call, request in writes:
        code, details = code_of(call, request)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "editor token" in details


# --------------------------------------------------------------------------------------- errors


def test_invalid_requests_get_invalid_argument_with_the_reason(editor, prompts):
    too_many = list(range(100_001))
    cases = [
        (editor.Generate, pb.GenerateRequest(prompt=""), "empty"),
        (editor.Generate, pb.GenerateRequest(prompt="word " * 200), "shorten"),
        (editor.Generate, pb.GenerateRequest(prompt="x" * 5000), "at most 4000"),
        (editor.Generate, pb.GenerateRequest(prompt="a", max_new_tokens=100_000), "max_new_tokens"),
        (editor.GenerateStream, pb.GenerateRequest(prompt=""), "empty"),
        (editor.Lookup, pb.LookupRequest(prompt=""), "empty"),
        (editor.ReadSlots, pb.ReadSlotsRequest(slots=too_many), "at most 100000"),
        (editor.ReadSlots, pb.ReadSlotsRequest(slots=[5000]), "out of range"),
        (
            editor.WriteSlots,
            pb.WriteSlotsRequest(slots=[3, 3], rows=tensor_to_proto(torch.zeros(2, 64))),
            "more than once",
        ),
        (
            editor.WriteSlots,
            pb.WriteSlotsRequest(slots=[3], rows=tensor_to_proto(torch.zeros(1, 32))),
            "shape",
        ),
        (
            editor.WriteSlots,
            pb.WriteSlotsRequest(
                slots=[3], rows=tensor_to_proto(torch.full((1, 64), float("nan")))
            ),
            "NaN",
        ),
        (
            editor.WriteSlots,
            pb.WriteSlotsRequest(
                slots=[3], rows=pb.Tensor(dtype="float32", shape=[1, 64], data=b"x")
            ),
            "bytes",
        ),
        (editor.Rollback, pb.RollbackRequest(target="head"), "already the head"),
        (editor.Diff, pb.DiffRequest(), "from_version"),
        (editor.InjectFacts, pb.InjectFactsRequest(), "no facts"),
    ]
    for call, request, reason in cases:
        code, details = code_of(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (request, details)
        assert reason in details, details


def test_unknown_versions_get_not_found(editor):
    for call, request in [
        (editor.ReadSlots, pb.ReadSlotsRequest(slots=[1], version="99999")),
        (editor.GetVersion, pb.GetVersionRequest(version="no-such-tag")),
        (editor.Rollback, pb.RollbackRequest(target="head~99999")),
        (editor.Diff, pb.DiffRequest(from_version="99999")),
        (editor.WatchVersions, pb.WatchVersionsRequest(from_version="no-such-tag")),
    ]:
        code, details = code_of(call, request)
        assert code == grpc.StatusCode.NOT_FOUND and "version" in details, details


def test_a_stale_expected_parent_gets_aborted(editor):
    head = head_of(editor)
    write(editor, [11], random_rows(1, 64, seed=5), expected_parent=head)
    for call, request in [
        (
            editor.WriteSlots,
            pb.WriteSlotsRequest(
                slots=[11], rows=tensor_to_proto(torch.zeros(1, 64)), expected_parent=head
            ),
        ),
        (
            editor.WriteSlots,
            pb.WriteSlotsRequest(
                slots=[11],
                rows=tensor_to_proto(torch.zeros(1, 64)),
                mode=pb.ADD,
                expected_parent=head,
            ),
        ),
        (editor.Rollback, pb.RollbackRequest(target="0", expected_parent=head)),
    ]:
        code, details = code_of(call, request)
        assert (
            code == grpc.StatusCode.ABORTED and f"retry with expected_parent={head + 1}" in details
        )
    assert head_of(editor) == head + 1  # nothing was written


def test_deadlines_and_message_size_are_enforced(editor):
    code, _ = code_of(
        editor.Generate, pb.GenerateRequest(prompt="Where was", max_new_tokens=60), timeout=0.0005
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    big = tensor_to_proto(torch.zeros(20_000, 64))  # 5 MiB, over the server's 4 MiB limit
    code, details = code_of(
        editor.WriteSlots, pb.WriteSlotsRequest(slots=list(range(1000)), rows=big)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details


# ---------------------------------------------------------------------------------- consistency


def test_answers_under_a_stream_of_edits_match_the_offline_answer_at_their_version(
    server, editor, prompts, tiny_model_dir
):
    """Readers race writes and rollbacks: zero torn reads, zero failed requests."""
    slot_sets = [answer_slots(editor, p) for p in prompts]
    start_version = head_of(editor)
    answers: list[tuple[str, pb.GenerateResponse]] = []
    failures: list[Exception] = []
    done = threading.Event()

    def ask(thread_index: int) -> None:
        i = thread_index
        try:
            while not done.is_set():
                prompt = prompts[i % len(prompts)]
                answers.append(
                    (prompt, editor.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=4)))
                )
                i += 1
        except Exception as exc:  # any failure fails the test
            failures.append(exc)

    readers = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for thread in readers:
        thread.start()
    try:
        for step in range(16):
            if step % 4 == 3:
                editor.Rollback(pb.RollbackRequest(target=str(start_version + step // 2)))
            else:
                slots = slot_sets[step % len(slot_sets)]
                write(editor, slots, random_rows(len(slots), 64, seed=1000 + step, scale=20.0))
            time.sleep(0.02)
    finally:
        done.set()
        for thread in readers:
            thread.join(60)
    assert not failures, failures[:3]

    versions = sorted({reply.version for _, reply in answers})
    assert len(versions) >= 8, versions
    texts_per_prompt = {p: {r.text for q, r in answers if q == p} for p in prompts}
    assert max(len(t) for t in texts_per_prompt.values()) >= 2  # the edits did change answers
    with Store.open(server.store_dir, read_only=True) as store:
        for version in versions:
            model, tokenizer = load_model(tiny_model_dir, values=store.load_table(version))
            for prompt in {p for p, reply in answers if reply.version == version}:
                expected = generate(model, tokenizer, prompt, max_new_tokens=4)
                for asked, reply in answers:
                    if asked == prompt and reply.version == version:
                        assert (reply.text, list(reply.tokens)) == (expected.text, expected.tokens)


# ------------------------------------------------------------------------------------ lifecycle


def test_an_open_server_refuses_to_listen_beyond_loopback(tiny_model_dir, tmp_path):
    result = subprocess.run(
        [
            *SERVE,
            "serve",
            "--model",
            str(tiny_model_dir),
            "--store",
            str(tmp_path / "s"),
            "--host",
            "0.0.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "without tokens" in result.stderr and "--tokens" in result.stderr
    assert not (tmp_path / "s").exists()


def test_sigkill_during_edits_then_restart_serves_every_acknowledged_version(
    tiny_model_dir, tmp_path
):
    store_dir = tmp_path / "store"
    first = ServerProcess(tiny_model_dir, store_dir, tmp_path / "first.log").start()
    acknowledged: list[tuple[int, list[int], torch.Tensor]] = []

    def edit_until_killed(client: Client) -> None:
        generator = torch.Generator().manual_seed(0)
        for step in range(10_000):
            slots = torch.randperm(1024, generator=generator)[: 1 + step % 50].tolist()
            rows = torch.randn(len(slots), 64, generator=generator)
            try:
                reply = write(client.stub, slots, rows)
            except grpc.RpcError:
                return  # the server died under this request: it was never acknowledged
            acknowledged.append((reply.version.version, slots, rows))

    with connect(first.address) as client:
        editor_thread = threading.Thread(target=edit_until_killed, args=(client,))
        editor_thread.start()
        while len(acknowledged) < 8 and editor_thread.is_alive():
            time.sleep(0.01)
        assert first.signal_and_wait(kill=True) == -9
        editor_thread.join(30)
    first.stop()
    assert len(acknowledged) >= 8

    second = ServerProcess(tiny_model_dir, store_dir, tmp_path / "second.log").start()
    try:
        with connect(second.address) as client:
            status = client.stub.Status(pb.StatusRequest())
            assert status.served_version == status.head_version
            assert status.head_version >= acknowledged[-1][0]
            assert f"version {status.head_version}" in second.ready_line
            log = client.stub.ListVersions(pb.ListVersionsRequest(limit=1000))
            logged = {v.version: list(v.slots) for v in log.versions}
            for version, slots, rows in acknowledged:
                assert logged[version] == slots
                read = client.stub.ReadSlots(pb.ReadSlotsRequest(slots=slots, version=str(version)))
                assert torch.equal(tensor_from_proto(read.rows), rows)

        # A second writer on the same store is refused with a message naming the holder.
        third = subprocess.run(
            [
                *SERVE,
                "serve",
                "--model",
                str(tiny_model_dir),
                "--store",
                str(store_dir),
                "--port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert third.returncode == 1 and "in use by process" in third.stderr
    finally:
        second.stop()


def test_sigterm_drains_in_flight_calls_and_closes_the_store(tiny_model_dir, prompts, tmp_path):
    server = ServerProcess(tiny_model_dir, tmp_path / "store", tmp_path / "server.log").start()
    outcomes: list[tuple[float, float, grpc.StatusCode]] = []
    stop = threading.Event()

    def ask(client: Client, index: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                client.stub.Generate(
                    pb.GenerateRequest(prompt=prompts[index % len(prompts)], max_new_tokens=8)
                )
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            outcomes.append((started, time.monotonic(), code))
            if code != grpc.StatusCode.OK:
                return

    with connect(server.address) as client:
        threads = [threading.Thread(target=ask, args=(client, n)) for n in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        signalled = time.monotonic()
        assert server.signal_and_wait(kill=False) == 0
        stop.set()
        for thread in threads:
            thread.join(30)
    server.stop()

    codes = {code for _, _, code in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    drained = [o for o in outcomes if o[0] < signalled < o[1] and o[2] == grpc.StatusCode.OK]
    assert drained, "no call was in flight at SIGTERM and finished"
    assert "stopped at version 0" in (tmp_path / "server.log").read_text()
    Store.open(tmp_path / "store").close()  # the writer lock was released
