"""`memslot store ...`: backups, compaction, export and import, done by the server.

The server holds the store's only read-write handle (RocksDB allows one writer), so these go
through the API too. Backup, compact and import need an editor token when tokens are on.
"""

from __future__ import annotations

from pathlib import Path

import click

from memslot.cli.edits import edit_options
from memslot.cli.remote import (
    EXIT_BAD_INPUT,
    CliError,
    Remote,
    console,
    emit_json,
    remote_command,
    version_dict,
)

IMPORT_CHUNK_BYTES = 1 << 20


@click.group("store")
def store() -> None:
    """Back up, compact, export and import the server's versioned store.

    \b
    Example:
      memslot store backup /var/backups/memslot-$(date +%F)
      memslot store export head table.safetensors
    """


@remote_command(store, "backup")
@click.argument("dest_dir", type=click.Path(file_okay=False, path_type=Path))
def backup(remote: Remote, dest_dir: Path) -> None:
    """Write a consistent copy of the store to DEST_DIR, on the server's machine.

    DEST_DIR must not exist or be empty; a relative path is made absolute against this
    directory. `memslot serve --store DEST_DIR` serves the copy.

    \b
    Example:
      memslot store backup backups/2025-01-31
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    reply = remote.call("Backup", pb.BackupRequest(dest_dir=str(dest_dir.resolve())))
    if remote.as_json:
        emit_json({"dest_dir": reply.dest_dir, "head_version": reply.head_version})
        return
    console().print(f"backed up the store (head version {reply.head_version}) to {reply.dest_dir}")


@remote_command(store, "compact")
@click.option(
    "--keep-from", required=True, help="Oldest version whose rows stay readable (number, tag...)."
)
def compact(remote: Remote, keep_from: str) -> None:
    """Drop row history older than --keep-from; every version from it on reads as before.

    Records stay (log and show still list old versions); reading or rolling back to a version
    before --keep-from fails afterwards.

    \b
    Example:
      memslot store compact --keep-from head~100
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    reply = remote.call("Compact", pb.CompactRequest(keep_from=keep_from))
    stats = {
        "keep_from": reply.keep_from,
        "rows_folded": reply.rows_folded,
        "rows_dropped": reply.rows_dropped,
        "chunks_rewritten": reply.chunks_rewritten,
        "oldest_readable": reply.oldest_readable,
    }
    if remote.as_json:
        emit_json(stats)
        return
    console().print(
        f"compacted: {reply.rows_dropped} old row(s) dropped, {reply.rows_folded} folded into "
        f"the base table; versions from {reply.oldest_readable} on stay readable"
    )


@remote_command(store, "export")
@click.argument("version")
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=Path))
def export(remote: Remote, version: str, out_file: Path) -> None:
    """Save the whole value table at VERSION to OUT_FILE (safetensors, tensor "values").

    \b
    Example:
      memslot store export head~2 table.safetensors
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    partial = out_file.with_name(out_file.name + ".part")
    exported, size = None, 0
    try:
        with open(partial, "wb") as handle:
            for chunk in remote.stream("ExportVersion", pb.ExportVersionRequest(version=version)):
                handle.write(chunk.data)
                exported, size = chunk.version, size + len(chunk.data)
        partial.replace(out_file)
    except OSError as err:
        raise CliError(f"cannot write {out_file}: {err.strerror}", EXIT_BAD_INPUT) from None
    finally:
        partial.unlink(missing_ok=True)
    if remote.as_json:
        emit_json({"version": exported, "file": str(out_file), "bytes": size})
        return
    console().print(f"exported version {exported} to {out_file} ({size:,} bytes)")


@remote_command(store, "import")
@click.argument("in_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--parent", type=int, help="Fail unless the head is this version.")
@edit_options
def import_(remote: Remote, in_file: Path, parent: int | None, message: str, author: str) -> None:
    """Commit the rows of IN_FILE (from `store export`) that differ from the head, and serve it.

    \b
    Example:
      memslot store import table.safetensors -m "restore last week's table"
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    def chunks():
        first = pb.ImportVersionRequest(message=message, author=author, source_name=in_file.name)
        if parent is not None:
            first.expected_parent = parent
        with open(in_file, "rb") as handle:
            first.data = handle.read(IMPORT_CHUNK_BYTES)
            yield first
            while data := handle.read(IMPORT_CHUNK_BYTES):
                yield pb.ImportVersionRequest(data=data)

    reply = remote.call("ImportVersion", chunks())
    record = version_dict(reply.version)
    if remote.as_json:
        emit_json({"version": record, "served_version": reply.served_version})
        return
    console().print(
        f"imported {in_file}: version {record['version']} changes {len(record['slots'])} "
        f"slot(s); serving version {reply.served_version}"
    )
