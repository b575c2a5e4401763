"""The `memslot` command line. Commands that query or change a model talk to a server.

`serve` and `train-demo` load the model; every other command is a gRPC client (see
`memslot.cli.remote` for the options, exit codes and output they share).
"""

from __future__ import annotations

import sys
import time

import click

from memslot import __version__
from memslot.cli import edits, history
from memslot.cli.remote import emit_json
from memslot.cli.serve import serve
from memslot.cli.store import store


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="memslot")
def cli() -> None:
    """memslot: a live-updatable knowledge memory for a frozen transformer.

    \b
    Start here:
      memslot train-demo            # build the demo knowledge model (a few minutes on a CPU)
      memslot serve                 # serve it, with a versioned store in ./data/store
      memslot query "Yusuf Nyberg was born in"
      memslot inject "Yusuf Nyberg was born in" "Oslo"
      memslot log; memslot rollback head~1

    \b
    Client commands talk to --server (env MEMSLOT_SERVER, default 127.0.0.1:50051) with the
    token in MEMSLOT_TOKEN; --json prints JSON. Exit codes: 0 ok, 1 refused or not learned,
    2 bad usage or input, 3 no server.
    """


@cli.command("train-demo")
@click.option("--out", default="models/demo", show_default=True, help="Model folder to write.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--recipe",
    type=click.Choice(["default", "tiny"]),
    default="default",
    show_default=True,
    help="'tiny' trains a toy model in seconds (for tests and trials).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def train_demo_cmd(out: str, device: str, recipe: str, as_json: bool) -> None:
    """Train the demo knowledge model and write its checkpoint, value table and report.

    \b
    Example:
      memslot train-demo --out models/demo --device cpu
    """
    from memslot.demo.recipe import RECIPES, train_demo

    started = time.perf_counter()
    try:
        report = train_demo(out, RECIPES[recipe], device=device, progress=not as_json)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        emit_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"demo model written to {out}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("facts / entities", f"{report['facts']} / {report['entities']}")
    table.add_row("memory slots", f"{report['slots']:,}")
    table.add_row("training facts answered", f"{report['train_exact_match']:.1%}")
    table.add_row("held-out phrasings answered", f"{report['heldout_exact_match']:.1%}")
    table.add_row("answered with the table zeroed", f"{report['zeroed_table_exact_match']:.1%}")
    table.add_row("steps / device", f"{report['train_steps']} / {report['device']}")
    Console().print(table)
    click.echo(f"wall time: {time.perf_counter() - started:.1f} s")


def main() -> None:  # pragma: no cover - console-script entry
    sys.exit(cli())


cli.add_command(serve)
cli.add_command(store)
for command in (*edits.commands.commands.values(), *history.commands.commands.values()):
    cli.add_command(command)


if __name__ == "__main__":  # pragma: no cover - `python -m memslot.cli.main`
    main()
