"""Commands over the version history: log, show, diff, rollback, tag, status.

A VERSION is a number ("3"), a tag ("before-fix"), "head" or "head~N" (N versions before the
head); the server resolves it.
"""

from __future__ import annotations

import json

import click

from memslot.cli.edits import edit_options
from memslot.cli.remote import (
    Remote,
    console,
    emit_json,
    remote_command,
    short,
    table,
    version_dict,
)

commands = click.Group()  # a holder: main.py adds these commands to `memslot`


def slot_list(slots: list[int], limit: int = 12) -> str:
    shown = ", ".join(str(s) for s in slots[:limit])
    return shown + (f", ... ({len(slots)} in all)" if len(slots) > limit else "")


@remote_command(commands, "log")
@click.option("-n", "limit", default=20, show_default=True, help="How many versions to list.")
@click.option("--before", default="", help="List versions older than this one.")
def log(remote: Remote, limit: int, before: str) -> None:
    """List versions, newest first.

    \b
    Example:
      memslot log -n 5
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    reply = remote.call("ListVersions", pb.ListVersionsRequest(limit=limit, before=before))
    if remote.as_json:
        emit_json({"head": reply.head, "versions": [version_dict(v) for v in reply.versions]})
        return
    view = table(None, ">version", "time", "kind", "author", ">slots", "message", "tags")
    for version in reply.versions:
        view.add_row(
            str(version.version) + (" (head)" if version.version == reply.head else ""),
            version.time.split(".")[0].replace("T", " "),
            version.kind,
            version.author,
            str(len(version.slots)),
            short(version.message, 50),
            ", ".join(version.tags),
        )
    console().print(view)


@remote_command(commands, "show")
@click.argument("version", default="head")
def show(remote: Remote, version: str) -> None:
    """Show one version's commit record (default: the head).

    \b
    Example:
      memslot show head~1
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    record = version_dict(remote.call("GetVersion", pb.GetVersionRequest(version=version)))
    if remote.as_json:
        emit_json(record)
        return
    view = table(f"version {record['version']}", "field", "value", show_header=False)
    for field in ("parent", "time", "author", "kind", "message", "checksum"):
        view.add_row(field, "-" if record[field] is None else str(record[field]))
    view.add_row("tags", ", ".join(record["tags"]) or "-")
    view.add_row("slots", f"{len(record['slots'])}: {slot_list(record['slots'])}")
    for key, value in record["meta"].items():
        view.add_row(f"meta.{key}", short(json.dumps(value), 100))
    console().print(view)


@remote_command(commands, "diff")
@click.argument("from_version")
@click.argument("to_version", default="head")
@click.option("-n", "limit", default=20, show_default=True, help="Slots to show at most.")
def diff(remote: Remote, from_version: str, to_version: str, limit: int) -> None:
    """Show the slots whose rows differ between two versions, and by how much.

    \b
    Example:
      memslot diff 0 head
      memslot diff before-fix head~1
    """
    import numpy as np

    from memslot.proto.memslot.v1 import memslot_pb2 as pb
    from memslot.service.client import array_from_proto

    request = pb.DiffRequest(from_version=from_version, to_version=to_version)
    reply = remote.call("Diff", request)
    slots = list(reply.slots)
    changes = []
    if slots and limit > 0:
        shown = slots[:limit]
        rows = remote.call(
            "ReadSlots", pb.ReadSlotsRequest(slots=shown, version=str(reply.from_version))
        )
        after = remote.call(
            "ReadSlots", pb.ReadSlotsRequest(slots=shown, version=str(reply.to_version))
        )
        before_rows, after_rows = array_from_proto(rows.rows), array_from_proto(after.rows)
        for slot, old, new in zip(shown, before_rows, after_rows, strict=True):
            changes.append(
                {
                    "slot": slot,
                    "norm_before": float(np.linalg.norm(old)),
                    "norm_after": float(np.linalg.norm(new)),
                    "norm_change": float(np.linalg.norm(new - old)),
                }
            )
    if remote.as_json:
        emit_json(
            {
                "from_version": reply.from_version,
                "to_version": reply.to_version,
                "slots": slots,
                "changes": changes,
            }
        )
        return
    out = console()
    out.print(
        f"{len(slots)} slot(s) differ between version {reply.from_version} and version "
        f"{reply.to_version}"
    )
    if changes:
        view = table(None, ">slot", ">|before|", ">|after|", ">|after - before|")
        for change in changes:
            view.add_row(
                str(change["slot"]),
                f"{change['norm_before']:.3f}",
                f"{change['norm_after']:.3f}",
                f"{change['norm_change']:.3f}",
            )
        out.print(view)
        if len(slots) > len(changes):
            out.print(f"... and {len(slots) - len(changes)} more (-n to show more)")


@remote_command(commands, "rollback")
@click.argument("version")
@click.option("--parent", type=int, help="Fail unless the head is this version.")
@edit_options
def rollback(remote: Remote, version: str, parent: int | None, message: str, author: str) -> None:
    """Restore VERSION's rows as a new version (history is kept) and serve it.

    \b
    Example:
      memslot rollback head~1
      memslot rollback before-fix -m "undo the bad import"
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    request = pb.RollbackRequest(target=version, message=message, author=author)
    if parent is not None:
        request.expected_parent = parent
    reply = remote.call("Rollback", request)
    record = version_dict(reply.version)
    if remote.as_json:
        emit_json({"version": record, "served_version": reply.served_version})
        return
    console().print(
        f"rolled back to version {record['meta'].get('target', version)}: new version "
        f"{record['version']} restores {len(record['slots'])} slot(s); serving version "
        f"{reply.served_version}"
    )


@remote_command(commands, "tag")
@click.argument("name")
@click.argument("version", default="head")
@click.option("--delete", is_flag=True, help="Remove the tag NAME.")
def tag(remote: Remote, name: str, version: str, delete: bool) -> None:
    """Name a version (default: the head), or remove a name with --delete.

    \b
    Example:
      memslot tag before-import
      memslot tag good 12
      memslot tag good --delete
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    reply = remote.call("Tag", pb.TagRequest(name=name, version=version, delete=delete))
    if remote.as_json:
        emit_json({"name": reply.name, "version": reply.version, "tags": dict(reply.tags)})
        return
    what = "removed tag" if delete else "tagged"
    console().print(f"{what} {reply.name!r} (version {reply.version})")


@remote_command(commands, "status")
def status(remote: Remote) -> None:
    """Show what the server serves: model, store, versions, device.

    \b
    Example:
      memslot status --server 10.0.0.5:50051
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    reply = remote.call("Status", pb.StatusRequest())
    fields = {
        "server": remote.server,
        "model": reply.model,
        "store": reply.store,
        "head_version": reply.head_version,
        "served_version": reply.served_version,
        "oldest_readable": reply.oldest_readable,
        "n_slots": reply.n_slots,
        "dim": reply.dim,
        "dtype": reply.dtype,
        "device": reply.device,
        "memory_layers": list(reply.memory_layers),
        "max_seq_len": reply.max_seq_len,
        "editor_available": reply.editor_available,
        "requests_served": reply.requests_served,
        "uptime_seconds": round(reply.uptime_seconds, 1),
        "memslot_version": reply.memslot_version,
    }
    if remote.as_json:
        emit_json(fields)
        return
    view = table("memslot server", "field", "value", show_header=False)
    for key, value in fields.items():
        view.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
    console().print(view)
