"""The examples run as documented: quickstart.sh and client.py against the TINY model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from test_cli import CliServer, counterfactuals

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def example_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSLOT_")}
    env["MEMSLOT_BIN"] = str(Path(sys.executable).with_name("memslot"))
    env.update(extra)
    return env


def answers_in(output: str) -> list[str]:
    """The line printed after each `$ memslot query ...` command."""
    return re.findall(r"^\$ memslot query .*\n(.*)$", output, flags=re.MULTILINE)


def test_quickstart_changes_the_answer_then_rolls_it_back(tiny_model_dir):
    corpus = json.loads((tiny_model_dir / "corpus.json").read_text())
    fact = counterfactuals(corpus, 1)[0]
    result = subprocess.run(
        ["bash", str(EXAMPLES / "quickstart.sh")],
        env=example_env(
            MEMSLOT_MODEL=str(tiny_model_dir),
            MEMSLOT_PROMPT=fact["prompt"],
            MEMSLOT_TARGET=fact["target"],
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    before, injected, restored = answers_in(result.stdout)
    assert before != fact["target"] and injected == fact["target"] and restored == before, output
    for step in ("1 of 1 facts held", "memslot log", "memslot diff"):
        assert step in output
    assert "rolled back to version 0" in output and "stopped" in output


def test_client_py_runs_the_same_flow(tiny_model_dir, tmp_path):
    corpus = json.loads((tiny_model_dir / "corpus.json").read_text())
    fact = counterfactuals(corpus, 1, first_person=5)[0]
    server = CliServer(tiny_model_dir, tmp_path).start()
    try:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "client.py"), "--prompt", fact["prompt"],
             "--target", fact["target"]],
            env=example_env(MEMSLOT_SERVER=server.address),
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    answers = re.findall(r"-> '(.*)' \(version (\d+)\)", result.stdout)
    assert [version for _, version in answers] == ["0", "1", "2"]
    assert answers[1][0] == fact["target"] and answers[2][0] == answers[0][0] != fact["target"]


def test_facts_jsonl_is_about_demo_people():
    from memslot.demo.corpus import build_corpus

    people = set(build_corpus().people)
    facts = [json.loads(line) for line in (EXAMPLES / "facts.jsonl").read_text().splitlines()]
    assert len(facts) >= 5
    for fact in facts:
        assert set(fact) == {"prompt", "target"}
        assert any(fact["prompt"].startswith(person + " ") for person in people), fact
