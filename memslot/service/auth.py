"""Who may call what: bearer tokens with two roles, and where an open server may listen.

A tokens file has one ``<role> <token>`` per line, role ``reader`` (read RPCs only) or
``editor`` (everything); blank lines and ``#`` comments are ignored. With tokens configured,
every MemoryService call needs ``authorization: Bearer <token>`` metadata: a missing or unknown
token gets UNAUTHENTICATED, a reader calling a write gets PERMISSION_DENIED. The health and
reflection services stay open so that generic tools (grpc_health_probe, grpcurl) work.

Without tokens anyone who can reach the port could rewrite the memory, so an open server may
only listen on a loopback address.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import ipaddress
import threading
from pathlib import Path

import grpc

SERVICE = "memslot.v1.MemoryService"
WRITE_METHODS = frozenset(
    {
        "WriteSlots",
        "InjectFacts",
        "FineTune",
        "Rollback",
        "Tag",
        "Backup",
        "Compact",
        "ImportVersion",
    }
)
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Role(enum.IntEnum):
    READER = 1
    EDITOR = 2


class AuthConfigError(ValueError):
    """A tokens file or listen address that the server refuses; the message says what to fix."""


def load_tokens(path: str | Path) -> dict[str, Role]:
    """Parse a tokens file into {token: role}."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise AuthConfigError(f"cannot read tokens file {path}: {exc.strerror}") from None
    tokens: dict[str, Role] = {}
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2 or parts[0] not in ("reader", "editor"):
            raise AuthConfigError(
                f"{path}:{number}: expected '<role> <token>' with role 'reader' or 'editor', "
                f"got {text!r}"
            )
        role, token = Role[parts[0].upper()], parts[1]
        if len(token) < 8:
            raise AuthConfigError(f"{path}:{number}: tokens must be at least 8 characters long")
        if token in tokens and tokens[token] != role:
            raise AuthConfigError(f"{path}:{number}: this token is listed with two roles")
        tokens[token] = role
    if not tokens:
        raise AuthConfigError(
            f"{path} lists no tokens: add lines such as 'editor <token>' and 'reader <token>'"
        )
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen_address(host: str, tokens: dict[str, Role] | None) -> None:
    """Refuse to serve an unauthenticated API beyond this machine."""
    if not tokens and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to listen on {host} without tokens: anyone who can reach it could rewrite "
            "the memory. Pass --tokens FILE (lines 'editor <token>' / 'reader <token>'), or "
            "listen on 127.0.0.1."
        )


def method_name(full_method: str) -> str:
    """'/memslot.v1.MemoryService/Generate' -> 'Generate'."""
    return full_method.rsplit("/", 1)[-1]


class TokenAuth(grpc.ServerInterceptor):
    """Checks the bearer token of every MemoryService call against the configured roles."""

    def __init__(self, tokens: dict[str, Role]) -> None:
        self._tokens = list(tokens.items())

    def role_of(self, metadata) -> Role | None:
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return None
        presented = header[len("Bearer ") :].strip().encode()
        role = None
        for token, token_role in self._tokens:  # compare with every token: constant time
            if hmac.compare_digest(presented, token.encode()):
                role = token_role
        return role

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        role = self.role_of(handler_call_details.invocation_metadata)
        if role is None:
            return refusal(
                continuation(handler_call_details),
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown token: send 'authorization: Bearer <token>' metadata with a "
                "token from the server's tokens file",
            )
        if method_name(method) in WRITE_METHODS and role < Role.EDITOR:
            return refusal(
                continuation(handler_call_details),
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method_name(method)} changes the memory and needs an editor token; this "
                "token is a reader's",
            )
        return continuation(handler_call_details)


def _same_shape(handler):
    """The gRPC constructor of a method handler with ``handler``'s streaming on each side."""
    if handler.request_streaming:
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler
        return grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler
    return grpc.unary_unary_rpc_method_handler


def refusal(handler, code: grpc.StatusCode, message: str):
    """A handler of the same shape as ``handler`` that fails with ``code``."""
    if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
        return None

    def refuse(_request, context):
        context.abort(code, message)

    return _same_shape(handler)(refuse)


class DrainGate(grpc.ServerInterceptor):
    """Counts the MemoryService calls in flight; once closed, answers new ones UNAVAILABLE.

    A draining server closes the gate and waits for the calls in flight before it stops gRPC:
    gRPC answers a call that reaches a stopping server CANCELLED, which a client cannot tell
    from its own cancellation, while UNAVAILABLE says to retry elsewhere. Health and reflection
    calls pass (health reports NOT_SERVING while draining)."""

    def __init__(self) -> None:
        self._closed = False
        self._in_flight = 0
        self._changed = threading.Condition()

    def close(self) -> None:
        with self._changed:
            self._closed = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight (True) or ``timeout`` seconds pass (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == 0, timeout)

    @contextlib.contextmanager
    def _call(self):
        with self._changed:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        if self._closed:
            return refusal(
                handler,
                grpc.StatusCode.UNAVAILABLE,
                "the server is shutting down: retry on another server or after it restarts",
            )
        return self._counted(handler)

    def _counted(self, handler):
        """``handler`` with each call counted in flight until it returns or its stream ends."""
        behaviour = (  # the one of the four that is set
            handler.stream_stream
            or handler.stream_unary
            or handler.unary_stream
            or handler.unary_unary
        )
        if handler.response_streaming:

            def call(request, context):
                with self._call():
                    yield from behaviour(request, context)

        else:

            def call(request, context):
                with self._call():
                    return behaviour(request, context)

        return _same_shape(handler)(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
