"""Benchmark of the service (memslot.service): hot-swap cost, commit-to-served latency, and
Generate throughput with and without a concurrent stream of edits.

Target (the service issue): the swap adds at most 5 ms to a 1,000-row commit on CPU.

The model is a randomly initialised memslot model (no training: speed does not depend on what
the weights know) with a 65,536 x 256 fp32 value table; `--quick` uses 16,384 slots and fewer
repetitions. Part A drives an in-process Engine (no gRPC): the swap alone, split into reading
the changed rows from the store and the indexed copy, against rows changed and table size.
Part B starts a real `memslot serve` process and measures through the gRPC client.

    python bench/service.py            # about 2 minutes on 2 CPU cores
    python bench/service.py --quick    # about 30 seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version as package_version
from pathlib import Path

import torch
from machine import cpu_model

from memslot.memstore import Store
from memslot.model.checkpoint import VALUES, load_values, save_model
from memslot.model.config import MemoryConfig, ModelConfig
from memslot.model.tokenizer import Tokenizer
from memslot.model.transformer import MemoryTransformer
from memslot.proto.memslot.v1 import memslot_pb2 as pb
from memslot.service.client import connect, tensor_to_proto
from memslot.service.engine import Engine, GenerateOptions

DIM = 256
PROMPTS = [f"Person {i} works for the company called" for i in range(32)]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def build_model(folder: Path, n_keys: int) -> Path:
    """A random-weight model folder whose value table is (n_keys**2, DIM) fp32."""
    torch.manual_seed(0)
    texts = PROMPTS + [f"company {i} makes things in city {i % 7}" for i in range(200)]
    tokenizer = Tokenizer.train(texts, vocab_size=512)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=DIM,
        n_layers=4,
        n_heads=4,
        ffn_hidden=512,
        memory=MemoryConfig(n_keys=n_keys, heads=4, topk=8, k_dim=64, layers=(1, 3)),
    )
    model = MemoryTransformer(cfg)
    model.memory_values.data *= 10  # a non-trivial table, so edits move the outputs
    return save_model(model, tokenizer, folder)


# ---------------------------------------------------------------------------- part A: swaps


def bench_swaps(
    model_dir: Path, workdir: Path, row_counts: tuple[int, ...], reps: int
) -> list[list[str]]:
    """The swap alone (queue to served), against rows changed, on both of the Engine's paths:
    reading the changed rows back from the store (rollbacks), and taking the rows a writer
    has just committed (writes and edits). The commit itself is shown for scale."""
    store = Store.create(workdir / f"swap-store-{model_dir.name}", load_values(model_dir / VALUES))
    engine = Engine.load(model_dir, store, "cpu")
    generator = torch.Generator().manual_seed(1)
    n_slots = store.shape[0]
    out = []
    try:
        for n_rows in row_counts:
            commit_s, read_s, read_copy_s, handed_s, handed_copy_s = [], [], [], [], []
            for _ in range(reps if n_rows < 10_000 else max(5, reps // 4)):
                for hand_over in (False, True):
                    slots = torch.randperm(n_slots, generator=generator)[:n_rows].tolist()
                    rows = torch.randn(n_rows, DIM, generator=generator)
                    started = time.perf_counter()
                    record = store.commit(slots, rows, expected_parent=store.head)
                    committed = time.perf_counter()
                    engine.swap_to(record.version, (slots, rows) if hand_over else None).result()
                    swapped = time.perf_counter()
                    commit_s.append(committed - started)
                    (handed_s if hand_over else read_s).append(swapped - committed)
                    copy = engine.stats.swaps[-1].seconds
                    (handed_copy_s if hand_over else read_copy_s).append(copy)
            table = f"{n_slots:,} x {DIM} table"
            for label, total, copy in (
                ("rows read back from the store", read_s, read_copy_s),
                ("rows handed over by the writer", handed_s, handed_copy_s),
            ):
                out.append(
                    [
                        f"swap {n_rows:,} row(s), {table}, {label}",
                        f"{ms(percentile(total, 50))} (copy {ms(percentile(copy, 50))})",
                        f"{ms(percentile(total, 99))} (copy {ms(percentile(copy, 99))})",
                        f"{len(total)} swaps; the commit itself p50 {ms(percentile(commit_s, 50))}",
                    ]
                )
    finally:
        engine.close()
        store.close()
    return out


def bench_engine_generate(model_dir: Path, workdir: Path) -> float:
    """In-process decode time per request (no gRPC), for scale."""
    store = Store.create(workdir / "gen-store", load_values(model_dir / VALUES))
    engine = Engine.load(model_dir, store, "cpu")
    try:
        options = GenerateOptions(max_new_tokens=16)
        engine.generate(PROMPTS[0], options).result()  # warm up
        started = time.perf_counter()
        for prompt in PROMPTS[:16]:
            engine.generate(prompt, options).result()
        return (time.perf_counter() - started) / 16
    finally:
        engine.close()
        store.close()


# ----------------------------------------------------------------------- part B: the server


class Server:
    def __init__(self, model_dir: Path, store_dir: Path, log_path: Path) -> None:
        command = "import sys; from memslot.cli.main import cli; sys.exit(cli())"
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-c", command, "serve", "--model", str(model_dir), "--store",
             str(store_dir), "--port", "0", "--device", "cpu"],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )  # fmt: skip
        for line in self.process.stdout:
            if "memslot serving" in line:
                self.address = "127.0.0.1:" + line.split(" on 127.0.0.1:")[1].split()[0]
                return
        raise RuntimeError(f"the server did not start: see {log_path}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


def bench_commit_to_served(stub, n_slots: int, reps: int) -> list[list[str]]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for n_rows in (1, 100, 10_000):
        samples = []
        for _ in range(reps if n_rows < 10_000 else max(5, reps // 3)):
            slots = torch.randperm(n_slots, generator=generator)[:n_rows].tolist()
            rows = tensor_to_proto(torch.randn(n_rows, DIM, generator=generator))
            request = pb.WriteSlotsRequest(slots=slots, rows=rows)
            started = time.perf_counter()
            reply = stub.WriteSlots(request)
            samples.append(time.perf_counter() - started)
            assert reply.served_version == reply.version.version
        out.append(
            [
                f"WriteSlots {n_rows:,} row(s): commit to served, over gRPC",
                ms(percentile(samples, 50)),
                ms(percentile(samples, 99)),
                f"{len(samples)} writes",
            ]
        )
    return out


def generate_load(stub, seconds: float, clients: int, edit_stream: bool, n_slots: int) -> dict:
    """Closed-loop Generate load from `clients` threads, optionally with an editor thread."""
    stop = threading.Event()
    counts = {"requests": 0, "tokens": 0, "errors": 0, "commits": 0, "versions": set()}
    lock = threading.Lock()

    def ask(index: int) -> None:
        i = index
        while not stop.is_set():
            request = pb.GenerateRequest(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=16)
            try:
                reply = stub.Generate(request)
            except Exception:
                with lock:
                    counts["errors"] += 1
                continue
            with lock:
                counts["requests"] += 1
                counts["tokens"] += len(reply.tokens)
                counts["versions"].add(reply.version)
            i += clients

    def edit() -> None:
        generator = torch.Generator().manual_seed(4)
        while not stop.is_set():
            slots = torch.randperm(n_slots, generator=generator)[:100].tolist()
            rows = tensor_to_proto(torch.randn(100, DIM, generator=generator))
            stub.WriteSlots(pb.WriteSlotsRequest(slots=slots, rows=rows))
            counts["commits"] += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(clients)]
    if edit_stream:
        threads.append(threading.Thread(target=edit))
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "rps": counts["requests"] / elapsed,
        "tps": counts["tokens"] / elapsed,
        "errors": counts["errors"],
        "commits": counts["commits"],
        "versions": len(counts["versions"]),
    }


def merge_loads(loads: list[dict]) -> dict:
    return {
        "rps": statistics.mean(load["rps"] for load in loads),
        "tps": statistics.mean(load["tps"] for load in loads),
        "errors": sum(load["errors"] for load in loads),
        "commits": sum(load["commits"] for load in loads),
        "versions": sum(load["versions"] for load in loads),
    }


def bench_server(
    model_dir: Path, workdir: Path, reps: int, seconds: float, rounds: int
) -> list[list[str]]:
    server = Server(model_dir, workdir / "server-store", workdir / "server.log")
    try:
        with connect(server.address) as client:
            n_slots = client.stub.Status(pb.StatusRequest()).n_slots
            rows = bench_commit_to_served(client.stub, n_slots, reps)
            generate_load(client.stub, 1.0, 4, False, n_slots)  # warm up
            # Alternate the two conditions so that drifting background load hits both alike.
            windows = {False: [], True: []}
            for _ in range(rounds):
                for edits in (False, True):
                    windows[edits].append(generate_load(client.stub, seconds, 4, edits, n_slots))
            quiet, busy = (merge_loads(windows[edits]) for edits in (False, True))
    finally:
        server.stop()
    for label, load in (("no edits", quiet), ("with an edit stream", busy)):
        rows.append(
            [
                f"Generate, 4 clients x 16 tokens, {label} ({rounds} x {seconds:.0f} s)",
                f"{load['rps']:.1f} req/s",
                f"{load['tps']:.0f} tokens/s",
                f"{load['errors']} errors, {load['commits']} commits",
            ]
        )
    rows.append(
        [
            "Generate throughput with edits / without",
            f"{busy['rps'] / quiet['rps']:.0%}",
            "",
            "same run, same server",
        ]
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few repetitions")
    args = parser.parse_args()
    n_keys = 128 if args.quick else 256
    reps = 10 if args.quick else 60
    seconds, rounds = (2.0, 2) if args.quick else (4.0, 4)  # Generate load windows
    sweep_keys = (256,) if args.quick else (128, 512, 1024)  # tables of n_keys**2 slots
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    print(
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"grpcio {package_version('grpcio')}, rocksdict {package_version('rocksdict')}."
    )
    print(
        f"Model: random weights, d_model {DIM}, 4 layers, memory in layers 1 and 3, value table "
        f"{n_keys**2:,} x {DIM} fp32; swaps on CPU; every commit fsyncs the WAL."
    )
    table = []
    with tempfile.TemporaryDirectory(prefix="memslot-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = build_model(workdir / "model", n_keys)
        table += bench_swaps(model_dir, workdir, (1, 100, 1_000, 10_000), reps)
        for other_keys in sweep_keys:  # the same 1,000-row swap into larger and smaller tables
            other_dir = build_model(workdir / f"model-{other_keys}", other_keys)
            table += bench_swaps(other_dir, workdir, (1_000,), reps)
            shutil.rmtree(other_dir)
        per_request = bench_engine_generate(model_dir, workdir)
        table.append(["Engine generate, 16 tokens, in process", ms(per_request), "", "mean of 16"])
        table += bench_server(model_dir, workdir, reps, seconds, rounds)
    print()
    print("| measurement | p50 / rate | p99 / rate | notes |")
    print("|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
