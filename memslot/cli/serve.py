"""`memslot serve`: run the gRPC service over a model folder and its versioned store."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from memslot.service.auth import AuthConfigError, check_listen_address, load_tokens


@click.command("serve")
@click.option(
    "--model", "model_dir", default="models/demo", show_default=True, help="Model folder."
)
@click.option(
    "--store",
    "store_dir",
    default="data/store",
    show_default=True,
    help="Versioned store folder; created from the model's values.safetensors on first start.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=50051, show_default=True, type=int, help="0 picks a free port.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--tokens",
    "tokens_file",
    type=click.Path(dir_okay=False),
    help="Tokens file: lines 'reader <token>' / 'editor <token>'. Required off loopback.",
)
@click.option(
    "--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate (with --tls-key)."
)
@click.option(
    "--tls-key", type=click.Path(dir_okay=False), help="PEM private key (with --tls-cert)."
)
@click.option("--max-batch", default=8, show_default=True, type=int, help="Queries per batch.")
@click.option(
    "--max-message-mb",
    default=256,
    show_default=True,
    type=int,
    help="Largest request or reply, in MiB (bigger ones get RESOURCE_EXHAUSTED).",
)
@click.option(
    "--grace",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds in-flight calls may take to finish on SIGTERM.",
)
def serve(
    model_dir: str,
    store_dir: str,
    host: str,
    port: int,
    device: str,
    tokens_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    max_batch: int,
    max_message_mb: int,
    grace: float,
) -> None:
    """Serve a model over gRPC; edits are committed to the store and hot-swapped in.

    \b
    Example:
      memslot serve --model models/demo --store data/store
      memslot serve --host 0.0.0.0 --tokens tokens.txt --tls-cert cert.pem --tls-key key.pem

    SIGTERM (or Ctrl-C) stops taking calls, lets in-flight calls finish and closes the store.
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        tokens = load_tokens(tokens_file) if tokens_file else None
        check_listen_address(host, tokens)
    except AuthConfigError as err:
        raise click.ClickException(str(err)) from err
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("TLS needs both --tls-cert and --tls-key")
    if not (Path(model_dir) / "config.json").exists():
        raise click.ClickException(
            f"{model_dir} is not a model folder (no config.json): build the demo model with "
            "`memslot train-demo`, or pass --model DIR"
        )

    # Imported here so that the checks above answer without loading torch.
    from memslot.memstore import StoreError
    from memslot.service.server import (
        Engine,
        Limits,
        MemoryService,
        TlsFiles,
        build_server,
        drain,
        editor_factory_for,
        open_or_create_store,
    )

    try:
        store, created = open_or_create_store(store_dir, model_dir)
    except (StoreError, OSError) as err:
        raise click.ClickException(str(err)) from err
    try:
        try:
            engine = Engine.load(model_dir, store, device, max_batch=max_batch)
        except ValueError as err:
            raise click.ClickException(str(err)) from err
        service = MemoryService(
            engine,
            store,
            model_dir=model_dir,
            limits=Limits(max_message_bytes=max_message_mb << 20),
            editor_factory=editor_factory_for(engine, model_dir),
        )
        tls = TlsFiles(Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None
        try:
            server, bound_port, health_servicer = build_server(
                service, host=host, port=port, tokens=tokens, tls=tls
            )
        except (OSError, ValueError) as err:
            engine.close()
            raise click.ClickException(str(err)) from err
        stop = threading.Event()

        def request_stop(signum: int, _frame) -> None:
            click.echo(f"memslot: {signal.Signals(signum).name}, draining", err=True)
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        server.start()
        note = " (store created)" if created else ""
        security = ", TLS" if tls else ""
        security += ", tokens required" if tokens else ""
        click.echo(
            f"memslot serving {model_dir} (store {store_dir}{note}, version "
            f"{engine.served_version}) on {host}:{bound_port} [device {engine.device}{security}]"
        )
        while not stop.wait(0.5):
            pass
        drain(server, service, health_servicer, grace)
        click.echo(f"memslot: stopped at version {engine.served_version}", err=True)
    finally:
        store.close()
