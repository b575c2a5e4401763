"""The Engine: the model on its device, the live value table, and the version it serves.

One worker thread owns the model's forward passes and the live table. It executes a queue of
work items: *queries* (generate, lookup), taken in batches of up to ``max_batch``, and *swaps*
(the rows a new version changed), applied between two batches with one indexed copy. Every
query therefore runs entirely at one version, and its result says which (``served_version`` at
the time its batch ran).

A swap is prepared on the caller's thread (the changed slots from the commit records, their
rows from the store, moved to the device) so that the worker only does the copy: its cost
follows the rows changed, never the table size. Pending swaps go before pending queries, so a
commit is served at the next batch boundary.

The live table changes only through swaps, and swaps are only requested by the service's
writers, one at a time (see ``MemoryService``): a writer that holds the write lock and has
waited for its swap sees a table that is exactly the head version, which is what the editor
reads.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memslot.memstore import Store
from memslot.model.checkpoint import CONFIG, load_model
from memslot.model.config import ModelConfig
from memslot.model.generate import encode_prompt, pick_token
from memslot.model.tokenizer import Tokenizer
from memslot.model.transformer import MemoryTransformer

log = logging.getLogger(__name__)


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no more work."""


class DeadlineExpiredError(TimeoutError):
    """A query's deadline passed before the worker reached it; it was not run."""


@dataclass
class GenerateOptions:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 is greedy
    top_k: int | None = None
    seed: int | None = None
    return_logits: bool = False  # keep the first generated position's logits


@dataclass
class GenerateResult:
    text: str
    tokens: list[int]
    stopped_at_eos: bool
    version: int  # the version of the table the whole generation ran at
    first_logits: torch.Tensor | None = None  # (vocab,) fp32 on CPU, when asked for


@dataclass
class LayerLookup:
    layer: int
    slots: torch.Tensor  # (T, H, k) int64, CPU
    weights: torch.Tensor  # (T, H, k) fp32, CPU


@dataclass
class LookupResult:
    tokens: list[int]
    token_strings: list[str]
    layers: list[LayerLookup]
    version: int


@dataclass
class _Query:
    run: Callable[[int], object]  # called with the served version
    future: Future
    deadline: float | None  # time.monotonic() after which the query is not started
    is_active: Callable[[], bool]  # false once the caller went away


@dataclass
class _Swap:
    from_version: int
    to_version: int
    slots: torch.Tensor  # (M,) int64 on the device
    rows: torch.Tensor  # (M, D) on the device, the table's dtype
    future: Future


@dataclass
class SwapRecord:
    """One applied swap, for Status and the benchmark."""

    to_version: int
    rows: int
    seconds: float  # the indexed copy alone (synchronised on CUDA)


@dataclass
class EngineStats:
    requests: int = 0
    batches: int = 0
    swaps: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when present, else CPU; 'cuda' without CUDA is an error that says so."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use cpu")
    return torch.device(device)


def apply_rows(table: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """The hot-swap itself: one indexed copy of ``rows`` (M, D) into ``table`` at ``slots`` (M,).

    Synchronised on CUDA, so that the time it takes is the time it took.
    """
    table.index_copy_(0, slots, rows)
    if table.device.type == "cuda":
        torch.cuda.synchronize(table.device)


def check_table_shape(table_shape: tuple[int, ...], store: Store) -> None:
    if tuple(table_shape) != store.shape:
        raise ValueError(
            f"the model's value table is {tuple(table_shape)} but the store {store.path} holds "
            f"{store.shape}: the store was made for another model. Point --store at a new folder."
        )


class Engine:
    """The model and its live table at ``served_version``, driven by one worker thread."""

    def __init__(
        self,
        model: MemoryTransformer,
        tokenizer: Tokenizer,
        store: Store,
        served_version: int,
        *,
        max_batch: int = 8,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        check_table_shape(tuple(model.memory_values.shape), store)
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.device = model.memory_values.device
        self.max_batch = max_batch
        self.stats = EngineStats()
        self._served_version = served_version
        self._queued_version = served_version  # the version once every queued swap is applied
        self._swap_prepare_lock = threading.Lock()
        self._queries: collections.deque[_Query] = collections.deque()
        self._swaps: collections.deque[_Swap] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._run, name="memslot-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(
        cls, model_dir: str | Path, store: Store, device: str = "auto", *, max_batch: int = 8
    ) -> Engine:
        """Load the model with the store's head as its live table."""
        dev = resolve_device(device)
        cfg = ModelConfig.load(Path(model_dir) / CONFIG)
        check_table_shape((cfg.memory.n_slots, cfg.value_dim), store)
        head = store.head
        table = store.load_table(head)
        model, tokenizer = load_model(model_dir, "cpu", values=table.to(torch.float32))
        return cls(model.to(dev), tokenizer, store, head, max_batch=max_batch)

    @property
    def served_version(self) -> int:
        return self._served_version

    # --------------------------------------------------------------------------------- queries

    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` (begin token first); ValueError when empty or too long."""
        return encode_prompt(self.model, self.tokenizer, prompt)

    def generate(
        self,
        prompt: str,
        options: GenerateOptions,
        *,
        on_token: Callable[[int, int], None] | None = None,
        deadline: float | None = None,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Future:
        """Queue a generation; the future gives a GenerateResult.

        ``on_token(token, version)`` is called from the worker as each token is chosen (for
        streaming); generation stops early once ``is_active()`` turns false.
        """
        ids = self.encode(prompt)
        if options.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {options.max_new_tokens}")
        if options.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {options.temperature}")

        def run(version: int) -> GenerateResult:
            return self._decode(ids, options, version, on_token, is_active)

        return self._submit(run, deadline, is_active)

    def lookup(self, prompt: str, *, deadline: float | None = None) -> Future:
        """Queue a lookup of the slots each memory layer reads; the future gives a LookupResult."""
        ids = self.encode(prompt)

        def run(version: int) -> LookupResult:
            output = self.model(torch.tensor([ids], device=self.device))
            layers = [
                LayerLookup(
                    lookup.layer, lookup.slots[0].cpu(), lookup.weights[0].float().cpu()
                )  # (T, H, k)
                for lookup in output.lookups
            ]
            return LookupResult(ids, self.tokenizer.token_strings(ids), layers, version)

        return self._submit(run, deadline, lambda: True)

    def _submit(
        self, run: Callable[[int], object], deadline: float | None, is_active: Callable[[], bool]
    ) -> Future:
        future: Future = Future()
        with self._wake:
            if self._closing:
                raise EngineClosedError("the server is shutting down: retry on another replica")
            self._queries.append(_Query(run, future, deadline, is_active))
            self._wake.notify()
        return future

    def _decode(
        self,
        ids: list[int],
        options: GenerateOptions,
        version: int,
        on_token: Callable[[int, int], None] | None,
        is_active: Callable[[], bool],
    ) -> GenerateResult:
        # The same steps as memslot.model.generate.generate (tests check the outputs are equal),
        # with a per-token callback for streaming and the first position's logits kept.
        model, tokenizer = self.model, self.tokenizer
        generator = None
        if options.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(options.seed if options.seed is not None else torch.seed())
        budget = min(options.max_new_tokens, model.cfg.max_seq_len - len(ids))
        out: list[int] = []
        first_logits = None
        cache = model.new_cache()
        step_input = torch.tensor([ids], device=self.device)
        for _ in range(budget):
            logits = model(step_input, cache=cache).logits[0, -1].float()  # (vocab,)
            if options.return_logits and first_logits is None:
                first_logits = logits.cpu().clone()
            next_id = pick_token(logits, options.temperature, options.top_k, generator)
            out.append(next_id)
            if on_token is not None:
                on_token(next_id, version)
            if next_id == tokenizer.eos_id or not is_active():
                break
            step_input = torch.tensor([[next_id]], device=self.device)
        stopped = bool(out) and out[-1] == tokenizer.eos_id
        return GenerateResult(
            tokenizer.decode(out).strip(), out, stopped, version, first_logits=first_logits
        )

    # ----------------------------------------------------------------------------------- swaps

    def swap_to(
        self, version: int, committed: tuple[list[int], torch.Tensor] | None = None
    ) -> Future:
        """Queue the swap to ``version`` (newer than every version queued so far).

        The rows of the slots changed since the last queued version are read from the store,
        on this thread: ``store.read_rows(store.changed_slots(queued, version), version)``.
        A writer that has just committed ``version`` may pass the ``(slots, rows)`` it
        committed instead; they are the stored bytes (the store refuses rows of another dtype)
        and are used only when ``version`` is the very next version, saving the read-back
        (about 90% of a 1,000-row swap on CPU, see docs/BENCHMARKS.md).
        The future gives ``version`` once it is being served.
        """
        with self._swap_prepare_lock:
            from_version = self._queued_version
            if version <= from_version:
                raise ValueError(
                    f"cannot swap to version {version}: version {from_version} is already "
                    "queued or served (swaps only move forward)"
                )
            if committed is not None and version == from_version + 1:
                changed, rows = committed
            else:
                changed = self.store.changed_slots(from_version, version)
                rows = self.store.read_rows(changed, version)
            slots = torch.tensor(changed, dtype=torch.int64)
            dtype = self.model.memory_values.dtype
            swap = _Swap(
                from_version,
                version,
                slots.to(self.device, non_blocking=True),
                rows.to(self.device, dtype, non_blocking=True),
                Future(),
            )
            with self._wake:
                if self._closing:
                    raise EngineClosedError(
                        f"the server is shutting down: version {version} is committed and will "
                        "be served when the server starts again"
                    )
                self._swaps.append(swap)
                self._queued_version = version
                self._wake.notify()
        return swap.future

    def _apply(self, swap: _Swap) -> None:
        if swap.from_version != self._served_version:  # a bug, not a user error
            raise RuntimeError(
                f"swap from version {swap.from_version} found version {self._served_version} served"
            )
        started = time.perf_counter()
        apply_rows(self.model.memory_values.data, swap.slots, swap.rows)
        seconds = time.perf_counter() - started
        self._served_version = swap.to_version
        self.stats.swaps.append(SwapRecord(swap.to_version, int(swap.slots.numel()), seconds))

    # ---------------------------------------------------------------------------------- worker

    def _next_work(self) -> _Swap | list[_Query] | None:
        with self._wake:
            while not self._swaps and not self._queries:
                if self._closing:
                    return None
                self._wake.wait()
            if self._swaps:
                return self._swaps.popleft()
            batch = []
            while self._queries and len(batch) < self.max_batch:
                batch.append(self._queries.popleft())
            return batch

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread: the worker never needs it
        while True:
            work = self._next_work()
            if work is None:
                return
            if isinstance(work, _Swap):
                self._run_swap(work)
            else:
                self._run_batch(work)

    def _run_swap(self, swap: _Swap) -> None:
        try:
            self._apply(swap)
        except BaseException as exc:  # the writer waiting on it must hear about it
            log.exception("swap to version %d failed", swap.to_version)
            swap.future.set_exception(exc)
        else:
            swap.future.set_result(swap.to_version)

    def _run_batch(self, batch: list[_Query]) -> None:
        version = self._served_version  # fixed for the whole batch: swaps wait for it to end
        self.stats.batches += 1
        now = time.monotonic()
        for query in batch:
            if not query.future.set_running_or_notify_cancel():
                continue  # the caller gave up before the batch started
            if query.deadline is not None and now > query.deadline:
                query.future.set_exception(
                    DeadlineExpiredError("the deadline passed while the request was queued")
                )
                continue
            if not query.is_active():
                query.future.set_exception(DeadlineExpiredError("the caller went away"))
                continue
            try:
                result = query.run(version)
            except Exception as exc:
                query.future.set_exception(exc)
            else:
                self.stats.requests += 1
                query.future.set_result(result)

    # -------------------------------------------------------------------------------- shutdown

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the worker (idempotent)."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._worker.join(timeout)
