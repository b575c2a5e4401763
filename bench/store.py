"""Benchmark of the versioned store (memslot.memstore): commit latency, row reads, table load.

Targets (the store issue): a 1,000-row commit of 1,024-dim bf16 rows has p50 <= 10 ms, and
loading a 1M x 256 fp32 table (1 GiB) runs at >= 50% of the rate of reading the same bytes from
a plain file in the same run. Prints how it was run, then a markdown table.

    python bench/store.py            # full sizes (needs ~3 GiB of disk and ~3 GiB of RAM)
    python bench/store.py --quick    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from importlib.metadata import version as package_version
from pathlib import Path

import torch
from machine import cpu_model

from memslot.memstore import Store


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_commits(workdir: Path, n_slots: int, reps: int) -> tuple[list[list[str]], Store]:
    """Commit latency for 1, 100 and 1,000 rows of 1,024 bf16, each commit synced (WAL fsync)."""
    dim = 1024
    table = torch.randn(n_slots, dim).to(torch.bfloat16)
    store = Store.create(workdir / "commits", table)
    generator = torch.Generator().manual_seed(0)
    results = []
    for n_rows in (1, 100, 1000):
        samples = []
        for _ in range(reps):
            slots = torch.randperm(n_slots, generator=generator)[:n_rows].tolist()
            rows = torch.randn(n_rows, dim, generator=generator).to(torch.bfloat16)
            start = time.perf_counter()
            store.commit(slots, rows, expected_parent=store.head)
            samples.append(time.perf_counter() - start)
        results.append(
            [
                f"commit {n_rows:,} row(s) x 1,024 bf16",
                f"{percentile(samples, 50) * 1e3:.2f} ms",
                f"{percentile(samples, 99) * 1e3:.2f} ms",
                f"{reps} commits",
            ]
        )
    results.append(fsync_floor(workdir, 1000 * dim * 2, reps))
    return results, store


def fsync_floor(workdir: Path, n_bytes: int, reps: int) -> list[str]:
    """What this disk needs to make a 1,000-row commit's bytes durable outside RocksDB."""
    samples = []
    payload = os.urandom(n_bytes)
    with open(workdir / "fsync.bin", "wb") as handle:
        for _ in range(reps):
            start = time.perf_counter()
            handle.write(payload)
            handle.flush()
            os.fdatasync(handle.fileno())
            samples.append(time.perf_counter() - start)
    return [
        f"plain file: append {n_bytes / 2**20:.1f} MiB + fdatasync (disk floor)",
        f"{percentile(samples, 50) * 1e3:.2f} ms",
        f"{percentile(samples, 99) * 1e3:.2f} ms",
        f"{reps} writes",
    ]


def bench_row_reads(store: Store, reps: int) -> list[list[str]]:
    """read_rows latency at the head and at version 1 (rows from commits and from the base)."""
    generator = torch.Generator().manual_seed(1)
    n_slots = store.shape[0]
    results = []
    for n_rows in (1, 100, 1000):
        for label, version in (("head", store.head), ("version 1", 1)):
            samples = []
            for _ in range(reps):
                slots = torch.randint(0, n_slots, (n_rows,), generator=generator).tolist()
                start = time.perf_counter()
                store.read_rows(slots, version)
                samples.append(time.perf_counter() - start)
            results.append(
                [
                    f"read_rows {n_rows} random slot(s) at {label}",
                    f"{percentile(samples, 50) * 1e3:.3f} ms",
                    f"{percentile(samples, 99) * 1e3:.3f} ms",
                    f"{reps} reads",
                ]
            )
    return results


def bench_load(workdir: Path, n_slots: int, dim: int, reps: int) -> tuple[list[list[str]], float]:
    """load_table of an fp32 table against readinto of the same bytes from a plain file."""
    table = torch.randn(n_slots, dim)
    size = table.numel() * table.element_size()
    start = time.perf_counter()
    store = Store.create(workdir / "load", table)
    create_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(2)
    for _ in range(10):  # some history to overlay: 10 commits of 100 rows
        slots = torch.randperm(n_slots, generator=generator)[:100].tolist()
        store.commit(slots, torch.randn(100, dim, generator=generator), expected_parent=store.head)
    expected = store.load_table()
    plain = workdir / "table.bin"
    expected.numpy().tofile(plain)
    out = torch.empty(n_slots, dim)
    store_s, file_s = [], []
    for _ in range(reps):  # interleaved, so both see the same machine state
        out.zero_()
        start = time.perf_counter()
        store.load_table(out=out)
        store_s.append(time.perf_counter() - start)
        assert torch.equal(out, expected)
        out.zero_()
        start = time.perf_counter()
        with open(plain, "rb") as handle:
            handle.readinto(memoryview(out.numpy()).cast("B"))
        file_s.append(time.perf_counter() - start)
        assert torch.equal(out, expected)
    base_reads = []  # rows none of the commits wrote: each from its base chunk (1,024 of 1 MiB)
    for _ in range(reps):
        slots = torch.randint(0, n_slots, (1000,), generator=generator).tolist()
        start = time.perf_counter()
        rows = store.read_rows(slots, 0)
        base_reads.append(time.perf_counter() - start)
        assert torch.equal(rows, table[slots])
    store.close()
    store_rate = size / statistics.median(store_s) / 2**30
    file_rate = size / statistics.median(file_s) / 2**30
    ratio = store_rate / file_rate
    shape = f"{n_slots:,} x {dim} fp32 ({size / 2**30:.2f} GiB)"
    return [
        [
            f"load_table {shape}",
            f"{store_rate:.2f} GiB/s",
            f"{statistics.median(store_s) * 1e3:.0f} ms",
            f"median of {reps}",
        ],
        [
            "plain file readinto, same bytes",
            f"{file_rate:.2f} GiB/s",
            f"{statistics.median(file_s) * 1e3:.0f} ms",
            f"median of {reps}",
        ],
        ["load_table / plain file", f"{ratio:.0%}", "", "target >= 50%"],
        [
            f"read_rows 1,000 random slot(s) at version 0 of the {size / 2**30:.2f} GiB table",
            f"{statistics.median(base_reads) * 1e3:.1f} ms",
            f"{max(base_reads) * 1e3:.1f} ms (slowest)",
            f"median of {reps}",
        ],
        [
            f"Store.create {shape}",
            f"{size / create_s / 2**30:.2f} GiB/s",
            f"{create_s * 1e3:.0f} ms",
            "once",
        ],
    ], ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to put the stores (default: a temporary folder)",
    )
    args = parser.parse_args()
    if args.quick:
        commit_slots, commit_reps, read_reps, load_slots, load_reps = 8_192, 30, 100, 65_536, 3
    else:
        commit_slots, commit_reps, read_reps, load_slots, load_reps = 65_536, 200, 500, 1 << 20, 5
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        print(
            f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch "
            f"{torch.__version__}, rocksdict {package_version('rocksdict')}"
        )
        print(f"store folder: {workdir} (page cache warm; every commit fsyncs the WAL)")
        print(
            f"sizes: commits into a {commit_slots:,} x 1,024 bf16 table; load of a "
            f"{load_slots:,} x 256 fp32 table{' (--quick)' if args.quick else ''}\n"
        )
        commit_rows, store = bench_commits(workdir, commit_slots, commit_reps)
        with store:
            read_rows = bench_row_reads(store, read_reps)
        load_rows, _ = bench_load(workdir, load_slots, 256, load_reps)
    header = ["measurement", "p50 / rate", "p99 / time", "repetitions"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in commit_rows + read_rows + load_rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
