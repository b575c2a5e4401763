"""The wire contract: generated modules, the Tensor message, tokens files, listen addresses."""

from __future__ import annotations

import re
import threading
from concurrent import futures

import grpc
import pytest
import torch

from memslot.memstore import ConflictError, ValidationError, VersionNotFoundError
from memslot.proto import build
from memslot.proto.memslot.v1 import memslot_pb2 as pb
from memslot.proto.memslot.v1 import memslot_pb2_grpc as pb_grpc
from memslot.service.auth import (
    AuthConfigError,
    DrainGate,
    Role,
    check_listen_address,
    load_tokens,
)
from memslot.service.client import TensorFormatError, tensor_from_proto, tensor_to_proto
from memslot.service.server import RpcFailure, status_of

# the generator's own version, which each release of grpcio-tools (and its protobuf) writes
_TOOL_STAMPS = [
    (rb"GRPC_GENERATED_VERSION = '[^']*'", b"GRPC_GENERATED_VERSION = '?'"),
    (rb"# Protobuf Python Version: \S+", b"# Protobuf Python Version: ?"),
    (rb"ValidateProtobufRuntimeVersion\([^)]*\)", b"ValidateProtobufRuntimeVersion(?)"),
]


def _without_tool_stamps(text: bytes) -> bytes:
    for pattern, stamp in _TOOL_STAMPS:
        text = re.sub(pattern, stamp, text)
    return text


def test_checked_in_generated_modules_are_not_stale(tmp_path):
    """`make proto` output equals what is checked in, but for the generator's version stamps
    (a newer grpcio-tools than the one that wrote them is fine); regenerate after editing the
    .proto."""
    for fresh in build.generate(tmp_path):
        checked_in = build.PROTO_ROOT / "memslot" / "v1" / fresh.name
        assert _without_tool_stamps(fresh.read_bytes()) == _without_tool_stamps(
            checked_in.read_bytes()
        ), f"{checked_in} is stale: run `make proto` and commit the result"


def test_the_staleness_check_sees_a_changed_message_but_not_a_newer_generator():
    checked_in = (build.PROTO_ROOT / "memslot" / "v1" / "memslot_pb2_grpc.py").read_bytes()
    grpc_stamp = _TOOL_STAMPS[0][0]
    newer = re.sub(grpc_stamp, b"GRPC_GENERATED_VERSION = '9.9.9'", checked_in)
    assert newer != checked_in
    assert _without_tool_stamps(newer) == _without_tool_stamps(checked_in)
    changed = checked_in.replace(b"ReadSlots", b"ReadSlotz", 1)
    assert _without_tool_stamps(changed) != _without_tool_stamps(checked_in)


def test_generated_modules_import_as_memslot_proto_package():
    service = pb.DESCRIPTOR.services_by_name["MemoryService"]
    assert service.full_name == "memslot.v1.MemoryService"
    assert {m.name for m in service.methods} == {
        "Generate",
        "GenerateStream",
        "Lookup",
        "ReadSlots",
        "WriteSlots",
        "InjectFacts",
        "FineTune",
        "Rollback",
        "Tag",
        "ListVersions",
        "GetVersion",
        "Diff",
        "WatchVersions",
        "Status",
        "Backup",
        "Compact",
        "ExportVersion",
        "ImportVersion",
    }
    assert service.methods_by_name["WatchVersions"].server_streaming
    assert service.methods_by_name["GenerateStream"].server_streaming
    assert hasattr(pb_grpc, "MemoryServiceStub")


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 5),
        torch.randn(4, 2).to(torch.bfloat16),
        torch.randn(7).to(torch.float16),
        torch.arange(24, dtype=torch.int64).reshape(2, 3, 4),
        torch.tensor([-1, 2**31 - 1], dtype=torch.int32),
        torch.empty(0, 8),
        torch.randn(6, 4).t(),  # not contiguous
    ],
)
def test_tensor_round_trips_bit_for_bit(tensor):
    message = tensor_to_proto(tensor)
    assert message.dtype in {"float32", "bfloat16", "float16", "int64", "int32"}
    back = tensor_from_proto(pb.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(
        back.view(-1).view(torch.uint8), tensor.contiguous().view(-1).view(torch.uint8)
    )


def test_tensor_data_is_raw_little_endian():
    message = tensor_to_proto(torch.tensor([1.0, -2.0]))
    assert message.data == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
    assert list(message.shape) == [2]


def test_malformed_tensor_messages_say_what_is_wrong():
    with pytest.raises(TensorFormatError, match="needs 24 bytes"):
        tensor_from_proto(pb.Tensor(dtype="float32", shape=[2, 3], data=b"\x00" * 20))
    with pytest.raises(TensorFormatError, match="float64.*not supported"):
        tensor_from_proto(pb.Tensor(dtype="float64", shape=[1], data=b"\x00" * 8))
    with pytest.raises(TensorFormatError, match="negative"):
        tensor_from_proto(pb.Tensor(dtype="float32", shape=[-1], data=b""))


def test_tokens_file_maps_tokens_to_roles(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("# who may call\nreader rrrrrrrrrr\n\neditor eeeeeeeeee  # the admin\n")
    assert load_tokens(path) == {"rrrrrrrrrr": Role.READER, "eeeeeeeeee": Role.EDITOR}


@pytest.mark.parametrize(
    "text, message",
    [
        ("admin abcdefghij\n", "role 'reader' or 'editor'"),
        ("reader short\n", "at least 8"),
        ("# nothing\n", "lists no tokens"),
        ("reader abcdefghij\neditor abcdefghij\n", "two roles"),
    ],
)
def test_bad_tokens_files_are_refused_with_the_line(tmp_path, text, message):
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    with pytest.raises(AuthConfigError, match=message):
        load_tokens(path)


def test_an_open_server_may_only_listen_on_loopback():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_listen_address(host, None)
    with pytest.raises(AuthConfigError, match="without tokens.*--tokens"):
        check_listen_address("0.0.0.0", None)
    check_listen_address("0.0.0.0", {"abcdefghij": Role.EDITOR})


@pytest.mark.parametrize(
    "error, code",
    [
        (ConflictError("stale", expected_parent=1, head=2), grpc.StatusCode.ABORTED),
        (VersionNotFoundError("no such version"), grpc.StatusCode.NOT_FOUND),
        (ValidationError("bad rows"), grpc.StatusCode.INVALID_ARGUMENT),
        (ValueError("prompt is empty"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (KeyError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_map_to_status_codes(error, code):
    assert status_of(error)[0] == code


def test_taught_facts_are_the_injections_of_the_versions_the_head_is_made_of(tmp_path):
    from memslot.memstore import Store
    from memslot.service.server import taught_facts

    store = Store.create(tmp_path / "store", torch.zeros(8, 2))

    def inject(slot: int, *facts: tuple[str, str]) -> None:
        meta = {"facts": [{"prompt": p, "target": t} for p, t in facts]}
        store.commit([slot], torch.ones(1, 2), expected_parent=store.head, kind="inject", meta=meta)

    a, b, c = ("A is", "1"), ("B is", "2"), ("C is", "3")
    assert taught_facts(store) == []
    inject(0, a)  # v1
    store.commit([1], torch.ones(1, 2), expected_parent=1, kind="write")  # v2: no facts
    inject(2, b, c)  # v3
    assert taught_facts(store) == [a, b, c]
    store.rollback(1)  # v4 undoes v2 and v3
    assert taught_facts(store) == [a]
    store.rollback(3)  # v5 undoes v4: v3's facts are back
    assert taught_facts(store) == [a, b, c]
    store.rollback(0)  # v6
    assert taught_facts(store) == []
    inject(3, a)  # v7
    inject(4, ("A is", "9"))  # v8: a correction supersedes the earlier target
    assert taught_facts(store) == [("A is", "9")]


def test_the_server_s_taught_facts_cache_follows_the_head_like_the_full_walk(tmp_path):
    from memslot.memstore import Store
    from memslot.service.server import TaughtFacts, taught_facts

    store = Store.create(tmp_path / "store", torch.zeros(8, 2))
    cached = TaughtFacts()
    seen = []

    def inject(slot: int, *facts: tuple[str, str]) -> None:
        meta = {"facts": [{"prompt": p, "target": t} for p, t in facts]}
        store.commit([slot], torch.ones(1, 2), expected_parent=store.head, kind="inject", meta=meta)

    def check() -> None:
        seen.append(cached(store))
        assert seen[-1] == taught_facts(store)

    check()
    inject(0, ("A is", "1"))
    check()
    inject(1, ("B is", "2"), ("C is", "3"), ("B is", "4"))  # one record, B twice: the last wins
    check()
    assert seen[-1] == [("A is", "1"), ("C is", "3"), ("B is", "4")]
    inject(2, ("A is", "5"))  # a correction moves A to the end with its new target
    check()
    assert seen[-1] == [("C is", "3"), ("B is", "4"), ("A is", "5")]
    store.rollback(2)  # not an injection: the cache walks the records again
    check()
    inject(3, ("D is", "6"))
    inject(4, ("E is", "7"))  # two commits since the last look: the head's parent is not cached
    check()
    store.commit([5], torch.ones(1, 2), expected_parent=store.head, kind="write")
    check()


def test_a_closed_drain_gate_answers_new_calls_unavailable_and_waits_for_calls_in_flight():
    # A real gRPC server with the gate in front of two methods: a unary call that blocks until
    # released and a stream. Closing the gate refuses new calls with UNAVAILABLE (not the
    # CANCELLED a stopping gRPC server gives), and the call already running is counted until
    # it returns.
    release, entered = threading.Event(), threading.Event()

    def slow(request, context):
        entered.set()
        release.wait(10)
        return request

    def stream(request, context):
        yield request
        yield request

    def identity(b):
        return b

    gate = DrainGate()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[gate])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Gate",
                {
                    "Slow": grpc.unary_unary_rpc_method_handler(slow, identity, identity),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream, identity, identity),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            slow_call = channel.unary_unary("/test.Gate/Slow")
            stream_call = channel.unary_stream("/test.Gate/Stream")
            assert list(stream_call(b"x", timeout=10)) == [b"x", b"x"]
            assert gate.wait_idle(1)  # the finished stream is no longer counted
            pending = slow_call.future(b"a", timeout=10)
            assert entered.wait(10)
            gate.close()
            assert not gate.wait_idle(0.2)  # the slow call is still in flight
            for call in (lambda: slow_call(b"b", timeout=10), lambda: list(stream_call(b"c"))):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in refused.value.details()
            release.set()
            assert pending.result(10) == b"a"  # the call in flight finished normally
            assert gate.wait_idle(5)
    finally:
        server.stop(None)
