"""Durability: a writer killed with SIGKILL at random moments never leaves a partial version.

Like RocksDB's own crash tests: a real child process commits in a loop and prints each
acknowledged version; we kill -9 it at a random moment, reopen the store, and check that

- the head is the last acknowledged version or the one that was being written,
- every version up to the head matches the checksum in its record,
- no rows of a version above the head exist (nothing partial is stored, let alone visible),

twenty times over. Starting Python with torch takes seconds, so one helper process imports
memslot once and forks a fresh writer for each round; each writer is its own process and is
killed by pid.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch

from memslot.memstore import Store
from memslot.memstore.db import open_db
from memslot.memstore.layout import parse_row_key

ROUNDS = 20
N_SLOTS, DIM = 512, 64
REPO_ROOT = Path(__file__).resolve().parents[1]

WRITER_FORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    from memslot.memstore import Store

    path = sys.argv[1]
    print("forker ready", flush=True)
    for line in sys.stdin:
        seed = int(line)
        pid = os.fork()
        if pid == 0:  # the writer: commit until killed
            try:
                generator = torch.Generator().manual_seed(seed)
                store = Store.open(path)
                print(f"writer {os.getpid()} opened at {store.head}", flush=True)
                while True:
                    n_rows = int(torch.randint(1, 200, (1,), generator=generator))
                    slots = torch.randperm(512, generator=generator)[:n_rows]
                    rows = torch.randn(n_rows, 64, generator=generator).to(torch.bfloat16)
                    version = store.commit(slots, rows, expected_parent=store.head)
                    os.write(1, f"ack {version.version}\\n".encode())  # one atomic write
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        print(f"reaped {status}", flush=True)
    """
)


def start_forker(store_path: Path) -> tuple[subprocess.Popen, queue.Queue]:
    forker = subprocess.Popen(
        [sys.executable, "-c", WRITER_FORKER, str(store_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in forker.stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return forker, lines


def next_line(lines: queue.Queue) -> str:
    line = lines.get(timeout=60)
    assert line is not None, "the writer forker exited"
    return line


def rows_stored_above(store_path: Path, head: int) -> list[tuple[int, int]]:
    db = open_db(store_path, read_only=True)
    try:
        return [
            (slot, version)
            for slot, version in map(parse_row_key, db.get_column_family("rows").keys())
            if version > head
        ]
    finally:
        db.close()


def test_sigkilled_writer_never_leaves_a_partial_version(tmp_path):
    store_path = tmp_path / "store"
    table = torch.randn(N_SLOTS, DIM, generator=torch.Generator().manual_seed(0))
    Store.create(store_path, table.to(torch.bfloat16)).close()
    forker, lines = start_forker(store_path)
    rng = random.Random(1234)
    last_acked, verified_up_to = 0, -1
    try:
        assert next_line(lines) == "forker ready"
        for round_number in range(ROUNDS):
            forker.stdin.write(f"{round_number}\n")
            forker.stdin.flush()
            opened = next_line(lines).split()
            writer_pid, head_at_open = int(opened[1]), int(opened[-1])
            assert head_at_open >= last_acked
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(writer_pid, signal.SIGKILL)
            while not (line := next_line(lines)).startswith("reaped"):
                last_acked = max(last_acked, int(line.split()[1]))
            assert line == f"reaped {signal.SIGKILL}", line  # killed, not crashed on its own

            with Store.open(store_path) as store:
                assert store.head in (last_acked, last_acked + 1), (store.head, last_acked)
                for version in range(verified_up_to + 1, store.head + 1):
                    store.verify(version)
                assert [v.version for v in store.log(limit=1)] == [store.head]
                verified_up_to = store.head
                last_acked = store.head
            assert rows_stored_above(store_path, verified_up_to) == []
        assert last_acked > ROUNDS  # the writers did commit between kills
    finally:
        forker.stdin.close()
        forker.wait(timeout=60)
