"""Commands that ask the model or change its memory: query, lookup, inject, learn, write."""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from pathlib import Path

import click

from memslot.cli.remote import (
    EXIT_BAD_INPUT,
    EXIT_REFUSED,
    CliError,
    Remote,
    console,
    emit_json,
    remote_command,
    short,
    table,
    version_dict,
)

commands = click.Group()  # a holder: main.py adds these commands to `memslot`


def default_author() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def edit_options(function: Callable) -> Callable:
    """-m/--message and --author, shared by every command that commits."""
    function = click.option(
        "--author", default=default_author, help="Recorded in the commit (default: $USER)."
    )(function)
    return click.option("-m", "--message", default="", help="Commit message.")(function)


# ----------------------------------------------------------------------------------- queries


@remote_command(commands, "query")
@click.argument("prompt")
@click.option("--max-tokens", default=16, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True, help="0 decodes greedily.")
@click.option("--top-k", default=0, help="Sample from the k likeliest tokens (0: all).")
@click.option("--seed", type=int, help="Seed for sampling (reproducible answers).")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
def query(
    remote: Remote,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    seed: int | None,
    stream: bool,
) -> None:
    """Ask the model: print the continuation of PROMPT and the version it was computed at.

    \b
    Example:
      memslot query "Yusuf Nyberg was born in"
      memslot query "Who founded Cobalt Labs?" --stream --max-tokens 8
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    request = pb.GenerateRequest(
        prompt=prompt, max_new_tokens=max_tokens, temperature=temperature, top_k=top_k
    )
    if seed is not None:
        request.seed = seed
    if not stream:
        reply = remote.call("Generate", request)
        if remote.as_json:
            emit_json(
                {
                    "prompt": prompt,
                    "text": reply.text,
                    "version": reply.version,
                    "tokens": list(reply.tokens),
                    "stopped_at_eos": reply.stopped_at_eos,
                }
            )
            return
        click.echo(reply.text.strip())
        click.echo(f"(version {reply.version})", err=True)
        return
    for chunk in remote.stream("GenerateStream", request):
        if remote.as_json:  # one JSON object per line: the tokens, then the whole text
            fields = {"version": chunk.version, "done": chunk.done}
            if chunk.done:
                fields.update(text=chunk.text, stopped_at_eos=chunk.stopped_at_eos)
            else:
                fields.update(token=chunk.token, token_text=chunk.token_text)
            click.echo(json.dumps(fields))
        elif chunk.done:
            click.echo()
            click.echo(f"(version {chunk.version})", err=True)
        else:
            click.echo(chunk.token_text, nl=False)


@remote_command(commands, "lookup")
@click.argument("prompt")
@click.option("--last", is_flag=True, help="Only the last token (the one that predicts next).")
def lookup(remote: Remote, prompt: str, last: bool) -> None:
    """Show the memory slots each token of PROMPT reads: token, layer, head, slot, weight.

    \b
    Example:
      memslot lookup "Yusuf Nyberg was born in" --last
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb
    from memslot.service.client import array_from_proto

    reply = remote.call("Lookup", pb.LookupRequest(prompt=prompt))
    first = len(reply.tokens) - 1 if last else 0
    reads = []
    for layer in reply.layers:
        slots, weights = array_from_proto(layer.slots), array_from_proto(layer.weights)
        for position in range(first, slots.shape[0]):  # slots: (tokens, heads, k)
            for head in range(slots.shape[1]):
                order = weights[position, head].argsort()[::-1]
                for k in order:
                    reads.append(
                        {
                            "position": position,
                            "token": reply.token_strings[position],
                            "layer": layer.layer,
                            "head": head,
                            "slot": int(slots[position, head, k]),
                            "weight": float(weights[position, head, k]),
                        }
                    )
    if remote.as_json:
        emit_json({"prompt": prompt, "version": reply.version, "reads": reads})
        return
    view = table(
        f"slots read at version {reply.version}", ">pos", "token", ">layer", ">head", ">slot",
        ">weight",
    )  # fmt: skip
    for read in reads:
        view.add_row(
            str(read["position"]),
            repr(read["token"]),
            str(read["layer"]),
            str(read["head"]),
            str(read["slot"]),
            f"{read['weight']:.3f}",
        )
    console().print(view)


# ------------------------------------------------------------------------------------- edits


def read_lines(path: Path, parse: Callable[[str, str], object]) -> list:
    """Parse every non-blank line of ``path`` with ``parse(line, where)``; nothing is sent
    when a line is malformed (CliError naming the line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"cannot read {path}: {err}", EXIT_BAD_INPUT) from None
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            items.append(parse(line, f"{path}:{number}"))
    if not items:
        raise CliError(f"{path} holds nothing to send: it has no non-blank lines", EXIT_BAD_INPUT)
    return items


def parse_fact(line: str, where: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise CliError(
            f"{where}: not JSON ({err.msg}); nothing was written", EXIT_BAD_INPUT
        ) from None
    if not isinstance(record, dict):
        raise CliError(
            f'{where}: expected an object {{"prompt": ..., "target": ...}}; nothing was written',
            EXIT_BAD_INPUT,
        )
    fields = [record.get("prompt"), record.get("target")]
    if not all(isinstance(value, str) and value.strip() for value in fields):
        raise CliError(
            f'{where}: "prompt" and "target" must be non-empty strings; nothing was written',
            EXIT_BAD_INPUT,
        )
    return fields[0], fields[1]


def parse_passage(line: str, where: str) -> str:
    if not line.lstrip().startswith("{"):
        return line.strip()
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise CliError(
            f"{where}: not JSON ({err.msg}); nothing was written", EXIT_BAD_INPUT
        ) from None
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise CliError(
            f'{where}: "text" must be a non-empty string; nothing was written', EXIT_BAD_INPUT
        )
    return text


def run_edits(remote: Remote, items: list, batch_size: int, send: Callable, what: str) -> list:
    """Send ``items`` in batches (one commit each) with a progress bar; the replies."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size or len(items))]
    replies = []
    if remote.as_json or len(batches) == 1:
        status = None if remote.as_json else console(stderr=True).status(f"learning {what}...")
        if status:
            status.start()
        try:
            for index, batch in enumerate(batches):
                replies.append(send(batch, index, len(batches)))
        finally:
            if status:
                status.stop()
        return replies
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
    ) as progress:
        task = progress.add_task(f"learning {what}", total=len(items))
        for index, batch in enumerate(batches):
            replies.append(send(batch, index, len(batches)))
            progress.advance(task, len(batch))
    return replies


def batch_message(message: str, index: int, count: int) -> str:
    """The commit message of one batch; empty lets the server write its own."""
    if not message or count == 1:
        return message
    return f"{message} (batch {index + 1}/{count})"


def report_edits(remote: Remote, replies: list, what: str, show_target: bool) -> None:
    """The summary of one or more EditResponses; exits 1 when anything did not hold."""
    rows = []
    for reply in replies:
        version = reply.version.version if reply.committed else None
        for report in reply.reports:
            rows.append(
                {
                    "prompt": report.prompt,
                    "target": report.target,
                    "held": report.success and reply.success,
                    "committed": reply.committed,
                    "already_known": report.already_known,
                    "prob_before": report.prob_before,
                    "prob_after": report.prob_after,
                    "steps": report.steps,
                    "slots_written": report.slots_written,
                    "version": version,
                    "message": report.message,
                }
            )
    committed = [reply for reply in replies if reply.committed]
    failures = [reply.message for reply in replies if not reply.success]
    held = sum(row["held"] for row in rows)
    if remote.as_json:
        emit_json(
            {
                "held": held,
                "total": len(rows),
                "items": rows,
                "versions": [version_dict(reply.version) for reply in committed],
                "served_version": max((r.served_version for r in replies), default=None),
                "errors": failures,
            }
        )
    else:
        columns = ["prompt", "target"] if show_target else ["passage"]
        view = table(None, *columns, "held", ">p before", ">p after", ">slots", ">version")
        for row in rows:
            mark = "yes" if row["held"] else "no"
            if row["already_known"]:
                mark += " (known)"
            texts = [short(row["prompt"]), row["target"]] if show_target else [short(row["prompt"])]
            view.add_row(
                *texts,
                mark,
                f"{row['prob_before']:.3f}",
                f"{row['prob_after']:.3f}",
                str(row["slots_written"]),
                "-" if row["version"] is None else str(row["version"]),
            )
        out = console()
        out.print(view)
        versions = ", ".join(str(reply.version.version) for reply in committed) or "none"
        out.print(f"{held} of {len(rows)} {what} held; committed version(s): {versions}")
    if failures:
        reason = failures[0]
        if len(failures) > 1:
            reason = (
                f"{len(failures)} of {len(replies)} batches were not learned and nothing of "
                f"them was committed; the first: {reason}"
            )
        error = CliError(reason, EXIT_REFUSED, "NOT_LEARNED")
        error.json_printed = remote.as_json
        raise error


@remote_command(commands, "inject")
@click.argument("prompt", required=False)
@click.argument("target", required=False)
@click.option(
    "--file",
    "facts_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help='JSONL file: one {"prompt": ..., "target": ...} per line.',
)
@click.option("--batch-size", default=8, show_default=True, help="Facts per commit (0: all).")
@click.option("--force", is_flag=True, help="Commit even the facts that were not learned.")
@edit_options
def inject(
    remote: Remote,
    prompt: str | None,
    target: str | None,
    facts_file: Path | None,
    batch_size: int,
    force: bool,
    message: str,
    author: str,
) -> None:
    """Teach the model that PROMPT continues with TARGET (or every fact of --file).

    Only the memory slots the prompt reads are rewritten; each batch of facts is one new
    version, committed only if every fact in it was learned.

    \b
    Example:
      memslot inject "Yusuf Nyberg was born in" "Oslo" -m "moved the birthplace"
      memslot inject --file examples/facts.jsonl
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    if facts_file is not None and (prompt or target):
        raise click.UsageError("give PROMPT TARGET or --file, not both")
    if facts_file is None:
        if not (prompt and target):
            raise click.UsageError("give PROMPT and TARGET, or --file facts.jsonl")
        facts = [(prompt, target)]
    else:
        facts = read_lines(facts_file, parse_fact)
    if batch_size < 0:
        raise click.UsageError("--batch-size must be 0 or more")

    def send(batch, index, count):
        return remote.call(
            "InjectFacts",
            pb.InjectFactsRequest(
                facts=[pb.Fact(prompt=p, target=t) for p, t in batch],
                force=force,
                message=batch_message(message, index, count),
                author=author,
            ),
        )

    replies = run_edits(remote, facts, batch_size, send, "facts")
    report_edits(remote, replies, "facts", show_target=True)


@remote_command(commands, "learn")
@click.argument("passages_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-size", default=8, show_default=True, help="Passages per commit (0: all).")
@edit_options
def learn(remote: Remote, passages_file: Path, batch_size: int, message: str, author: str) -> None:
    """Fine-tune the memory on the passages of PASSAGES_FILE (sparse memory fine-tuning).

    One passage per line, or JSONL with {"text": ...} per line.

    \b
    Example:
      memslot learn notes.txt -m "new staff list"
    """
    from memslot.proto.memslot.v1 import memslot_pb2 as pb

    passages = read_lines(passages_file, parse_passage)
    if batch_size < 0:
        raise click.UsageError("--batch-size must be 0 or more")

    def send(batch, index, count):
        return remote.call(
            "FineTune",
            pb.FineTuneRequest(
                passages=batch,
                message=batch_message(message, index, count),
                author=author,
            ),
        )

    replies = run_edits(remote, passages, batch_size, send, "passages")
    report_edits(remote, replies, "passages", show_target=False)


@remote_command(commands, "write")
@click.option("--slot", "slots", type=int, multiple=True, required=True, help="Slot to write.")
@click.option(
    "--values",
    "values_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=".npy array (slots, dim); (dim,) for one slot.",
)
@click.option("--add", is_flag=True, help="Add the values to the slots' rows instead of setting.")
@click.option("--parent", type=int, help="Fail unless the head is this version.")
@edit_options
def write(
    remote: Remote,
    slots: tuple[int, ...],
    values_file: Path,
    add: bool,
    parent: int | None,
    message: str,
    author: str,
) -> None:
    """Write rows into memory slots directly: one new version.

    \b
    Example:
      memslot write --slot 12 --slot 40 --values rows.npy -m "hand-made rows"
      memslot write --slot 12 --values delta.npy --add
    """
    import numpy as np

    from memslot.proto.memslot.v1 import memslot_pb2 as pb
    from memslot.service.client import array_to_proto

    try:
        values = np.load(values_file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CliError(
            f"cannot read {values_file} as a .npy array: {err}", EXIT_BAD_INPUT
        ) from None
    if values.ndim == 1 and len(slots) == 1:
        values = values[None, :]
    if values.ndim != 2 or values.shape[0] != len(slots):
        raise CliError(
            f"{values_file} holds an array of shape {values.shape}; {len(slots)} slot(s) need "
            f"({len(slots)}, dim)",
            EXIT_BAD_INPUT,
        )
    if not np.issubdtype(values.dtype, np.floating):
        raise CliError(f"{values_file} holds {values.dtype} values; write floats", EXIT_BAD_INPUT)
    status = remote.call("Status", pb.StatusRequest())
    request = pb.WriteSlotsRequest(
        slots=list(slots),
        rows=array_to_proto(values, status.dtype),
        mode=pb.ADD if add else pb.SET,
        message=message,
        author=author,
    )
    if parent is not None:
        request.expected_parent = parent
    reply = remote.call("WriteSlots", request)
    if remote.as_json:
        emit_json({"version": version_dict(reply.version), "served_version": reply.served_version})
        return
    console().print(
        f"wrote {len(slots)} slot(s) ({'add' if add else 'set'}): version "
        f"{reply.version.version}, served {reply.served_version}"
    )
