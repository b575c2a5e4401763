"""The `memslot` executable end to end: every command against one real server (TINY model).

Each test runs `.venv/bin/memslot` as a subprocess, the way a person or a script would. The
server runs with tokens (the CLI sends MEMSLOT_TOKEN), so the commands that need an editor are
checked too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import serverproc
from click.testing import CliRunner

from memslot.cli.main import cli

MEMSLOT = str(Path(sys.executable).with_name("memslot"))
EDITOR = "cli-editor-token-0123"
READER = "cli-reader-token-0123"


class CliServer(serverproc.ServerProcess):
    """The `memslot` executable serving ``model_dir`` with a store and log in ``folder``."""

    def __init__(self, model_dir: Path, folder: Path, *extra: str) -> None:
        store, log = folder / "store", folder / "server.log"
        super().__init__([MEMSLOT], model_dir, store, log, *extra, startup_seconds=120)


def run_memslot(*args: str, server: str, token: str | None = EDITOR, timeout: float = 300):
    """Run the executable; returns the CompletedProcess (text stdout/stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSLOT_")}
    env["MEMSLOT_SERVER"] = server
    if token:
        env["MEMSLOT_TOKEN"] = token
    return subprocess.run(
        [MEMSLOT, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "tokens.txt").write_text(f"editor {EDITOR}\nreader {READER}\n")
    process = CliServer(tiny_model_dir, folder, "--tokens", str(folder / "tokens.txt")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def corpus(tiny_model_dir) -> dict:
    return json.loads((tiny_model_dir / "corpus.json").read_text())


def counterfactuals(corpus: dict, count: int, first_person: int = 0) -> list[dict]:
    """Birth-city facts about the corpus' people, each with another city of the corpus."""
    truth = {(f["subject"], f["relation"]): f["answer"] for f in corpus["facts"]}
    cities = sorted({f["answer"] for f in corpus["facts"] if f["relation"] == "birth_city"})
    facts = []
    for index, person in enumerate(corpus["people"][first_person : first_person + count]):
        true_city = truth[(person, "birth_city")]
        other = [city for city in cities if city != true_city][index]
        facts.append({"prompt": f"{person} was born in", "target": other})
    return facts


@pytest.fixture
def memslot(server):
    def run(*args: str, expect: int | None = 0, token: str | None = EDITOR):
        """Run a command; check its exit code unless ``expect`` is None."""
        result = run_memslot(*args, server=server.address, token=token)
        if expect is not None:
            assert result.returncode == expect, (args, result.stdout, result.stderr)
        return result

    return run


def json_of(result) -> dict:
    return json.loads(result.stdout)


def head_of(memslot) -> int:
    return json_of(memslot("status", "--json"))["head_version"]


def answer(memslot, prompt: str) -> tuple[str, int]:
    reply = json_of(memslot("query", prompt, "--json"))
    return reply["text"], reply["version"]


# ------------------------------------------------------------------------------------- basics


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    names = [n for n in cli.commands if n != "store"] + [
        f"store {n}" for n in cli.commands["store"].commands
    ]
    assert {"query", "inject", "learn", "write", "lookup", "log", "show", "diff"} <= set(names)
    assert {"rollback", "tag", "status", "serve", "train-demo"} <= set(names)
    assert {"store backup", "store compact", "store export", "store import"} <= set(names)
    for name in names:
        result = runner.invoke(cli, [*name.split(), "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Example:" in result.output and "memslot " in result.output, name


def test_client_commands_do_not_import_torch():
    code = "import sys; import memslot.cli.main; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_status_human_and_json(memslot, server):
    status = json_of(memslot("status", "--json"))
    assert status["server"] == server.address
    assert status["n_slots"] == 1024 and status["dim"] == 64 and status["dtype"] == "float32"
    assert status["served_version"] == status["head_version"]
    human = memslot("status").stdout
    assert "served_version" in human and server.address in human


def test_query_plain_json_and_stream(memslot, corpus):
    prompt = f"{corpus['people'][0]} was born in"
    text, version = answer(memslot, prompt)
    assert text and version == head_of(memslot)
    plain = memslot("query", prompt)
    assert plain.stdout.strip() == text and f"(version {version})" in plain.stderr
    streamed = memslot("query", prompt, "--stream")
    assert streamed.stdout.strip() == text
    chunks = [
        json.loads(line)
        for line in memslot("query", prompt, "--stream", "--json").stdout.splitlines()
    ]
    assert chunks[-1]["done"] and chunks[-1]["text"] == text
    assert "".join(c["token_text"] for c in chunks[:-1]).strip() == text


def test_lookup_table_and_json(memslot, corpus):
    prompt = f"{corpus['people'][0]} was born in"
    reads = json_of(memslot("lookup", prompt, "--json"))["reads"]
    assert {r["layer"] for r in reads} == {1} and {r["head"] for r in reads} == {0, 1}
    assert all(0 <= r["slot"] < 1024 and 0 <= r["weight"] <= 1 for r in reads)
    last = json_of(memslot("lookup", prompt, "--last", "--json"))["reads"]
    assert len(last) == 2 * 4 and len({r["position"] for r in last}) == 1  # heads x top-k
    table = memslot("lookup", prompt, "--last").stdout
    for column in ("token", "layer", "head", "slot", "weight"):
        assert column in table
    assert str(last[0]["slot"]) in table


# ------------------------------------------------------------------------ edits and history


def test_inject_changes_the_answer_and_rollback_brings_it_back(memslot, corpus):
    fact = counterfactuals(corpus, 1)[0]
    before, start = answer(memslot, fact["prompt"])
    assert before != fact["target"]

    reply = json_of(memslot("inject", fact["prompt"], fact["target"], "-m", "cf", "--json"))
    assert reply["held"] == reply["total"] == 1 and not reply["errors"]
    (version,) = reply["versions"]
    assert version["version"] == start + 1 and version["kind"] == "inject"
    assert version["message"] == "cf" and reply["served_version"] == start + 1
    assert answer(memslot, fact["prompt"]) == (fact["target"], start + 1)

    log = json_of(memslot("log", "-n", "2", "--json"))
    assert log["head"] == start + 1 and [v["version"] for v in log["versions"]] == [
        start + 1,
        start,
    ]
    assert "cf" in memslot("log").stdout
    shown = json_of(memslot("show", "head", "--json"))
    assert shown["meta"]["facts"] == [fact] and shown["slots"] == version["slots"]
    assert "inject" in memslot("show", str(start + 1)).stdout
    diff = json_of(memslot("diff", "head~1", "head", "--json"))
    assert (diff["from_version"], diff["to_version"]) == (start, start + 1)
    assert diff["slots"] == sorted(version["slots"]) and diff["changes"]
    assert f"{len(diff['slots'])} slot(s) differ" in memslot("diff", str(start)).stdout

    tagged = json_of(memslot("tag", "before-cf", str(start), "--json"))
    assert tagged["version"] == start and tagged["tags"]["before-cf"] == start
    rolled = json_of(memslot("rollback", "before-cf", "--json"))
    assert rolled["version"]["kind"] == "rollback" and rolled["version"]["meta"]["target"] == start
    assert answer(memslot, fact["prompt"]) == (before, start + 2)
    assert "removed tag" in memslot("tag", "before-cf", "--delete").stdout


def test_inject_a_file_in_batches_with_a_summary(memslot, corpus, tmp_path):
    facts = counterfactuals(corpus, 3, first_person=1)
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts) + "\n")
    start = head_of(memslot)
    result = memslot("inject", "--file", str(path), "--batch-size", "2")
    assert "3 of 3 facts held" in result.stdout and "learning facts" in result.stderr
    for fact in facts:
        assert fact["target"] in result.stdout
    assert head_of(memslot) == start + 2  # one version per batch
    # The last batch was learned at the head; a later batch may move an earlier fact's slots.
    assert answer(memslot, facts[-1]["prompt"])[0] == facts[-1]["target"]
    known = facts[-1]  # already answered: held, and nothing to commit
    again = json_of(memslot("inject", known["prompt"], known["target"], "--json"))
    assert again["held"] == 1 and again["items"][0]["already_known"]
    assert again["versions"] == [] and head_of(memslot) == start + 2
    memslot("rollback", str(start))


def test_a_malformed_facts_file_names_the_line_and_writes_nothing(memslot, tmp_path):
    start = head_of(memslot)
    path = tmp_path / "facts.jsonl"
    cases = [
        ('{"prompt": "a", "target": "b"}\n{"prompt": "c",\n', ":2:", "not JSON"),
        ('{"prompt": "a", "target": "b"}\n\n{"prompt": "c"}\n', ":3:", '"target" must be'),
        ('["a", "b"]\n', ":1:", "expected an object"),
    ]
    for text, line_number, reason in cases:
        path.write_text(text)
        line = memslot("inject", "--file", str(path), expect=2).stderr.strip()
        assert "\n" not in line and f"{path}{line_number}" in line and reason in line, line
        assert "nothing was written" in line
    error = json_of(memslot("inject", "--file", str(path), "--json", expect=2))["error"]
    assert error["code"] == "BAD_INPUT" and f"{path}:1:" in error["message"]
    assert head_of(memslot) == start


def test_learn_passages_from_text_and_jsonl(memslot, corpus, tmp_path):
    fact = corpus["facts"][0]
    passage = f"{fact['subject']} was born in {fact['answer']}"
    (tmp_path / "notes.txt").write_text(passage + "\n")
    (tmp_path / "notes.jsonl").write_text(json.dumps({"text": passage}) + "\n")
    for name in ("notes.txt", "notes.jsonl"):
        start = head_of(memslot)
        result = memslot("learn", str(tmp_path / name), "--json", expect=None)
        reply = json.loads(result.stdout)
        assert reply["total"] == 1 and reply["items"][0]["prompt"] == passage
        if result.returncode == 0:
            assert all(v["kind"] == "finetune" for v in reply["versions"])
            assert head_of(memslot) == start + len(reply["versions"])
        else:  # not learned: exit 1 with the reason, and nothing was written
            assert result.returncode == 1 and reply["errors"] and head_of(memslot) == start
            assert "nothing was committed" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n')
    assert f"{bad}:1:" in memslot("learn", str(bad), expect=2).stderr


def test_write_set_and_add_then_diff(memslot, tmp_path):
    rows = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    start = head_of(memslot)
    written = json_of(
        memslot("write", "--slot", "40", "--slot", "41", "--values", str(tmp_path / "rows.npy"),
                "-m", "hand rows", "--json")
    )  # fmt: skip
    assert written["version"]["version"] == start + 1 and written["version"]["slots"] == [40, 41]
    assert written["version"]["meta"]["mode"] == "set" and written["served_version"] == start + 1
    np.save(tmp_path / "one.npy", np.ones(64, dtype=np.float32))
    added = memslot("write", "--slot", "40", "--values", str(tmp_path / "one.npy"), "--add")
    assert f"version {start + 2}" in added.stdout
    diff = json_of(memslot("diff", str(start + 1), str(start + 2), "--json"))
    (change,) = diff["changes"]
    assert change["slot"] == 40 and change["norm_change"] == pytest.approx(8.0)  # |ones(64)|
    bad = memslot("write", "--slot", "1", "--values", str(tmp_path / "rows.npy"), expect=2)
    assert "shape (2, 64)" in bad.stderr
    stale = memslot(
        "write", "--slot", "1", "--values", str(tmp_path / "one.npy"), "--parent", "0", expect=1
    )
    assert "ABORTED" in stale.stderr
    memslot("rollback", str(start))


# ------------------------------------------------------------------------------------ store


def test_store_backup_export_import_and_compact(memslot, server, tmp_path):
    np.save(tmp_path / "rows.npy", np.full((1, 64), 3.0, dtype=np.float32))
    memslot("write", "--slot", "77", "--values", str(tmp_path / "rows.npy"))
    exported_at = head_of(memslot)

    backup = json_of(memslot("store", "backup", str(tmp_path / "backup"), "--json"))
    assert backup["head_version"] == exported_at and (tmp_path / "backup").is_dir()
    again = memslot("store", "backup", str(tmp_path / "backup"), expect=1)
    assert "not empty" in again.stderr

    table = tmp_path / "table.safetensors"
    exported = json_of(memslot("store", "export", "head", str(table), "--json"))
    assert exported["version"] == exported_at and table.stat().st_size == exported["bytes"]

    memslot("rollback", "head~1")
    imported = json_of(memslot("store", "import", str(table), "-m", "restore", "--json"))
    assert imported["version"]["kind"] == "import" and imported["version"]["slots"] == [77]
    assert imported["served_version"] == imported["version"]["version"]
    assert imported["version"]["meta"]["source_version"] == str(exported_at)
    assert "nothing to import" in memslot("store", "import", str(table), expect=1).stderr
    (tmp_path / "junk.safetensors").write_bytes(b"not a table")
    junk = memslot("store", "import", str(tmp_path / "junk.safetensors"), expect=1)
    assert "INVALID_ARGUMENT" in junk.stderr

    head = head_of(memslot)
    compacted = json_of(memslot("store", "compact", "--keep-from", str(head), "--json"))
    assert compacted["oldest_readable"] == head and compacted["rows_dropped"] > 0
    assert json_of(memslot("status", "--json"))["oldest_readable"] == head
    gone = memslot("rollback", "0", expect=1)
    assert "compacted" in gone.stderr and "NOT_FOUND" in gone.stderr
    assert json_of(memslot("log", "-n", "1000", "--json"))["versions"][-1]["version"] == 0


def test_store_changes_need_an_editor_token(memslot, tmp_path):
    for args in (
        ["store", "backup", str(tmp_path / "b")],
        ["store", "compact", "--keep-from", "head"],
        ["store", "import", str(tmp_path / "missing.safetensors")],
    ):
        if args[1] == "import":
            (tmp_path / "missing.safetensors").write_bytes(b"x")
        result = memslot(*args, token=READER, expect=1)
        assert "PERMISSION_DENIED" in result.stderr and "editor token" in result.stderr
    assert memslot("store", "export", "head", str(tmp_path / "t.st"), token=READER).returncode == 0
    denied = memslot("status", token=None, expect=1)
    assert "UNAUTHENTICATED" in denied.stderr and "MEMSLOT_TOKEN" in denied.stderr


# ----------------------------------------------------------------------------------- errors


def test_unknown_versions_fail_with_the_reason(memslot):
    for args in (
        ["show", "99999"],
        ["diff", "no-such-tag"],
        ["rollback", "head~99999"],
        ["store", "export", "99999", "/dev/null"],
    ):
        result = memslot(*args, expect=1)
        line = result.stderr.strip()
        assert "\n" not in line and "NOT_FOUND" in line and "version" in line, line
    error = json_of(memslot("show", "nope", "--json", expect=1))["error"]
    assert error["code"] == "NOT_FOUND" and "nope" in error["message"]


def test_no_server_says_how_to_start_one(tmp_path):
    result = run_memslot("status", server="127.0.0.1:1")
    assert result.returncode == 3
    assert result.stderr.strip() == (
        "memslot: error: no memslot server at 127.0.0.1:1 - start one with `memslot serve`"
    )
    as_json = run_memslot("query", "hello", "--json", server="127.0.0.1:1")
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["error"]["code"] == "NO_SERVER"
    flag = run_memslot("log", "--server", "127.0.0.1:2", server="127.0.0.1:1")
    assert "127.0.0.1:2" in flag.stderr


def test_usage_errors_exit_2(memslot):
    assert "PROMPT and TARGET" in memslot("inject", "only-a-prompt", expect=2).stderr
    assert "Missing option" in memslot("write", "--slot", "1", expect=2).stderr
