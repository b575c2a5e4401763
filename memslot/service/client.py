"""Talking to a memslot server: connect (token, TLS) and convert tensors to and from the wire.

    from memslot.service.client import connect, tensor_from_proto
    with connect("127.0.0.1:50051", token="...") as client:
        reply = client.stub.Generate(pb.GenerateRequest(prompt="Ada Vance works for"))
        print(reply.text, reply.version)

Tensors travel as a ``Tensor {dtype, shape, data}`` message whose data is the raw
little-endian bytes of the row-major tensor; the server uses the same two functions.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from memslot.proto.memslot.v1 import memslot_pb2 as pb
from memslot.proto.memslot.v1 import memslot_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import torch

# torch is imported on first use: a command-line client that only talks gRPC starts in a
# fraction of the time torch takes to import.
DTYPE_NAMES = ("float32", "float16", "bfloat16", "int64", "int32")

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("memslot's wire format assumes a little-endian host")


class TensorFormatError(ValueError):
    """A Tensor message whose dtype, shape and data do not agree; the message says how."""


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {name: getattr(torch, name) for name in DTYPE_NAMES}


def dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in _torch_dtypes().items():
        if candidate == dtype:
            return name
    raise TensorFormatError(
        f"dtype {dtype} cannot travel as a Tensor message; use one of {sorted(DTYPE_NAMES)}"
    )


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    """A Tensor message holding ``tensor``'s bytes (copied to CPU, made contiguous)."""
    import torch

    name = dtype_name(tensor.dtype)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()  # uint8 view: numpy has no bfloat16
    return pb.Tensor(dtype=name, shape=list(tensor.shape), data=data)


def tensor_from_proto(message: pb.Tensor) -> torch.Tensor:
    """The tensor a Tensor message holds (a fresh, writable CPU tensor)."""
    import torch

    _check_tensor_message(message)
    dtype = _torch_dtypes()[message.dtype]
    shape = list(message.shape)
    if not message.data:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(message.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _check_tensor_message(message: pb.Tensor) -> None:
    if message.dtype not in DTYPE_NAMES:
        raise TensorFormatError(
            f"tensor dtype {message.dtype!r} is not supported: use one of {sorted(DTYPE_NAMES)}"
        )
    shape = list(message.shape)
    if any(size < 0 for size in shape):
        raise TensorFormatError(f"tensor shape {shape} has a negative size")
    itemsize = 2 if message.dtype in ("float16", "bfloat16") else int(message.dtype[-2:]) // 8
    expected = math.prod(shape) * itemsize
    if len(message.data) != expected:
        raise TensorFormatError(
            f"tensor of shape {shape} and dtype {message.dtype} needs {expected} bytes of data, "
            f"got {len(message.data)}"
        )


def array_from_proto(message: pb.Tensor) -> np.ndarray:
    """The tensor a Tensor message holds, as a numpy array (without importing torch).

    numpy has no bfloat16: those are widened to float32 (exactly).
    """
    _check_tensor_message(message)
    shape = list(message.shape)
    if message.dtype == "bfloat16":
        halves = np.frombuffer(message.data, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    return (
        np.frombuffer(message.data, dtype=np.dtype(message.dtype).newbyteorder("<"))
        .reshape(shape)
        .copy()
    )


def array_to_proto(array: np.ndarray, dtype: str) -> pb.Tensor:
    """A Tensor message of ``dtype`` holding ``array`` (bfloat16 is rounded to nearest even)."""
    if dtype not in DTYPE_NAMES:
        raise TensorFormatError(f"dtype {dtype!r} is not supported: use one of {DTYPE_NAMES}")
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        data = rounded.astype("<u2").tobytes()
    else:
        data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=data)


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (works on plaintext channels too,
    unlike call credentials, which gRPC only sends over TLS)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or []) + [self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


class Client:
    """A channel to a memslot server and its MemoryService stub; close it (or use ``with``)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = pb_grpc.MemoryServiceStub(channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


DEFAULT_MAX_MESSAGE_BYTES = 256 << 20


def connect(
    address: str,
    *,
    token: str | None = None,
    tls_ca: str | Path | None = None,
    tls: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Client:
    """Open a channel to ``address`` ("host:port").

    ``token`` is sent as a bearer token on every call. TLS is used when ``tls`` is true or a CA
    file is given (``tls_ca``: the PEM certificate(s) to trust, e.g. a self-signed server cert).
    """
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if tls or tls_ca is not None:
        root = Path(tls_ca).read_bytes() if tls_ca is not None else None
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root), options)
    else:
        channel = grpc.insecure_channel(address, options)
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return Client(channel)
