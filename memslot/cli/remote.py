"""What every command that talks to a server shares: options, the connection, errors, output.

Exit codes (also in the README):
    0  success
    1  the server refused the request, or an edit did not hold (nothing was committed)
    2  bad usage or a bad input file (nothing was sent)
    3  no server answered at the address

Nothing here imports torch: a command that only talks gRPC starts in a fraction of a second.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

DEFAULT_SERVER = "127.0.0.1:50051"

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_SERVER = 3


class CliError(click.ClickException):
    """A failure reported as one line on stderr (and as JSON on stdout under --json)."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED, code: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code or {EXIT_BAD_INPUT: "BAD_INPUT", EXIT_NO_SERVER: "NO_SERVER"}.get(
            exit_code, "FAILED"
        )
        self.as_json = False
        self.json_printed = False  # the command already printed its JSON (with the errors)

    def show(self, file=None) -> None:
        if self.as_json and not self.json_printed:
            click.echo(json.dumps({"error": {"code": self.code, "message": self.message}}))
        click.echo(f"memslot: error: {self.message}", err=True)


class Remote:
    """One command's view of the server: the address, credentials and output mode."""

    def __init__(self, server: str, tls_ca: str | None, timeout: float, as_json: bool) -> None:
        self.server = server
        self.token = os.environ.get("MEMSLOT_TOKEN") or None
        self.tls_ca = tls_ca or None
        self.timeout = timeout
        self.as_json = as_json
        self._client = None

    @property
    def stub(self):
        if self._client is None:
            from memslot.service.client import connect

            try:
                self._client = connect(self.server, token=self.token, tls_ca=self.tls_ca)
            except OSError as err:
                raise CliError(
                    f"cannot read the TLS CA file {self.tls_ca}: {err.strerror}", EXIT_BAD_INPUT
                ) from None
        return self._client.stub

    def call(self, method: str, request, timeout: float | None = None):
        """A unary call; gRPC errors become CliError with the server's reason."""
        import grpc

        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise self.failure(err) from None

    def stream(self, method: str, request, timeout: float | None = None) -> Iterator:
        """A server-streaming call, yielding its messages; errors as in ``call``."""
        import grpc

        try:
            yield from getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise self.failure(err) from None

    def failure(self, err) -> CliError:
        import grpc

        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and (
            "connect" in details or "resolving" in details or "Socket closed" in details
        ):
            if "handshake" in details.lower() or "ssl" in details.lower():
                return CliError(
                    f"TLS handshake with {self.server} failed ({details}): pass the server's "
                    "certificate with --tls-ca (or MEMSLOT_TLS_CA)",
                    EXIT_NO_SERVER,
                )
            return CliError(
                f"no memslot server at {self.server} - start one with `memslot serve`",
                EXIT_NO_SERVER,
            )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            details += " (set MEMSLOT_TOKEN)"
        return CliError(f"{details} [{code.name}]", EXIT_REFUSED, code.name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def remote_command(group: click.Group, name: str, **settings) -> Callable:
    """Register a command that talks to a server: adds --server, --tls-ca, --timeout, --json
    and passes a Remote as the first argument."""

    def decorate(function: Callable) -> click.Command:
        @functools.wraps(function)
        def run(server: str, tls_ca: str | None, timeout: float, as_json: bool, **kwargs):
            remote = Remote(server, tls_ca, timeout, as_json)
            try:
                return function(remote, **kwargs)
            except CliError as err:
                err.as_json = as_json
                raise
            finally:
                remote.close()

        for option in reversed(
            [
                click.option(
                    "--server",
                    envvar="MEMSLOT_SERVER",
                    default=DEFAULT_SERVER,
                    show_default=True,
                    help="host:port of the server (env MEMSLOT_SERVER). Token: env MEMSLOT_TOKEN.",
                ),
                click.option(
                    "--tls-ca",
                    envvar="MEMSLOT_TLS_CA",
                    type=click.Path(dir_okay=False),
                    help="PEM certificate to trust: talk TLS (env MEMSLOT_TLS_CA).",
                ),
                click.option(
                    "--timeout",
                    default=600.0,
                    show_default=True,
                    type=float,
                    help="Seconds to wait for the server's answer.",
                ),
                click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts."),
            ]
        ):
            run = option(run)
        return group.command(name, **settings)(run)

    return decorate


# ---------------------------------------------------------------------------------- output


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def console(stderr: bool = False):
    from rich.console import Console

    # Wide enough that tables do not wrap when the output goes to a file or a pipe.
    width = None if (sys.stderr if stderr else sys.stdout).isatty() else 120
    return Console(stderr=stderr, width=width, highlight=False)


def table(title: str | None, *columns: str, **settings):
    from rich.table import Table

    result = Table(title=title, title_justify="left", **settings)
    for column in columns:
        justify = "right" if column.startswith(">") else "left"
        result.add_column(column.lstrip(">"), justify=justify)
    return result


def version_dict(version) -> dict:
    """A Version message as a plain dict (what --json prints)."""
    return {
        "version": version.version,
        "parent": version.parent if version.HasField("parent") else None,
        "time": version.time,
        "author": version.author,
        "message": version.message,
        "kind": version.kind,
        "slots": list(version.slots),
        "checksum": version.checksum,
        "meta": json.loads(version.meta_json or "{}"),
        "tags": list(version.tags),
    }


def short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
