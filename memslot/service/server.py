"""The gRPC MemoryService: queries through the Engine, writes through the store, then a swap.

Every write (WriteSlots, InjectFacts, FineTune, Rollback, ImportVersion) runs under one write lock:
commit to the store first (durable when it returns), tell the watchers, queue the swap, and
reply once the new version is being served. Holding the lock across the swap keeps the live
table equal to the head whenever a writer starts, which is what ADD writes and the editor read.

Errors are gRPC status codes with a message a person can act on:
INVALID_ARGUMENT (bad request, store validation, over a limit), NOT_FOUND (unknown or
compacted version), ABORTED (stale expected parent), DEADLINE_EXCEEDED, UNAVAILABLE (shutting
down), FAILED_PRECONDITION (no editor installed), DATA_LOSS (a corrupt store).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memslot import __version__
from memslot.memstore import (
    CompactedError,
    ConflictError,
    CorruptionError,
    Store,
    StoreError,
    ValidationError,
    Version,
    VersionNotFoundError,
)
from memslot.proto.memslot.v1 import memslot_pb2 as pb
from memslot.proto.memslot.v1 import memslot_pb2_grpc as pb_grpc
from memslot.service.auth import DrainGate, Role, TokenAuth, check_listen_address
from memslot.service.client import DEFAULT_MAX_MESSAGE_BYTES, tensor_from_proto, tensor_to_proto

if TYPE_CHECKING:
    from memslot.edit import FactReport

from memslot.service.engine import (
    DeadlineExpiredError,
    Engine,
    EngineClosedError,
    GenerateOptions,
)

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name


@dataclass
class Limits:
    """Request limits; a request over one gets INVALID_ARGUMENT naming the limit."""

    max_prompt_chars: int = 4000
    max_new_tokens: int = 256  # also capped by the model's max_seq_len
    max_slots: int = 100_000  # slots per ReadSlots / WriteSlots request
    max_facts: int = 256  # facts per InjectFacts, passages per FineTune
    max_watchers: int = 16  # each open watch holds one of the server's worker threads
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


class RpcFailure(Exception):
    """Raised by handlers to end a call with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a handler's exception maps to."""
    if isinstance(exc, RpcFailure):
        return exc.code, str(exc)
    if isinstance(exc, ConflictError):
        return grpc.StatusCode.ABORTED, str(exc)
    if isinstance(exc, VersionNotFoundError | CompactedError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, CorruptionError):
        return grpc.StatusCode.DATA_LOSS, str(exc)
    if isinstance(exc, ValidationError | ValueError):  # EditError, PromptTooLongError, ...
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, EngineClosedError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, DeadlineExpiredError | futures.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, (
            "the request did not finish before its deadline: the server is busy, retry with a "
            "longer deadline"
        )
    if isinstance(exc, StoreError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): see the server log"


def rpc(handler: Callable) -> Callable:
    """Turn a handler's exceptions into gRPC statuses (for unary and streaming handlers)."""

    def fail(context: grpc.ServicerContext, exc: Exception) -> None:
        code, message = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", handler.__name__)
        context.abort(code, message)

    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def stream(self, request, context):
            try:
                yield from handler(self, request, context)
            except Exception as exc:
                failure = exc
            else:
                return
            fail(context, failure)

        return stream

    @functools.wraps(handler)
    def unary(self, request, context):
        try:
            return handler(self, request, context)
        except Exception as exc:
            failure = exc
        fail(context, failure)

    return unary


def version_to_proto(record: Version, tags: list[str] | None = None) -> pb.Version:
    message = pb.Version(
        version=record.version,
        time=record.time,
        author=record.author,
        message=record.message,
        kind=record.kind,
        slots=list(record.slots),
        checksum=record.checksum,
        meta_json=json.dumps(record.meta, separators=(",", ":")),
        tags=tags or [],
    )
    if record.parent is not None:
        message.parent = record.parent
    return message


def _deadline_of(context: grpc.ServicerContext) -> tuple[float | None, float | None]:
    """(seconds left, monotonic deadline), or (None, None) when the call has no deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:  # gRPC's "no deadline" is a far-future time
        return None, None
    return remaining, time.monotonic() + remaining


def _wait(future: futures.Future, context: grpc.ServicerContext):
    timeout, _ = _deadline_of(context)
    try:
        return future.result(timeout=timeout)
    except futures.TimeoutError:
        future.cancel()
        raise


class MemoryService(pb_grpc.MemoryServiceServicer):
    """The MemoryService handlers over one Engine and its Store."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        *,
        model_dir: str | Path,
        limits: Limits | None = None,
        editor_factory: Callable[[], object] | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.model_dir = str(model_dir)
        self.limits = limits or Limits()
        self._editor_factory = editor_factory
        self._editor = None
        self._taught = TaughtFacts()  # the facts new injections rehearse
        self._write_lock = threading.Lock()
        self._commits = threading.Condition()  # notified after every commit
        self._watchers = 0
        self._stopping = False
        self._started = time.monotonic()
        # counts calls in flight; closed by ``begin_shutdown`` (``build_server`` installs it)
        self.gate = DrainGate()

    # --------------------------------------------------------------------------------- queries

    def _generate_options(self, request: pb.GenerateRequest) -> GenerateOptions:
        if len(request.prompt) > self.limits.max_prompt_chars:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt is {len(request.prompt)} characters; this server takes at most "
                f"{self.limits.max_prompt_chars}: shorten it",
            )
        max_new_tokens = request.max_new_tokens or 16
        if not 1 <= max_new_tokens <= self.limits.max_new_tokens:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_new_tokens must be 1..{self.limits.max_new_tokens}, got {max_new_tokens}",
            )
        if request.temperature < 0 or request.top_k < 0:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"temperature and top_k must be >= 0, got {request.temperature} and "
                f"{request.top_k}",
            )
        return GenerateOptions(
            max_new_tokens=max_new_tokens,
            temperature=request.temperature,
            top_k=request.top_k or None,
            seed=request.seed if request.HasField("seed") else None,
            return_logits=request.return_logits,
        )

    @rpc
    def Generate(self, request, context):
        options = self._generate_options(request)
        _, deadline = _deadline_of(context)
        future = self.engine.generate(
            request.prompt, options, deadline=deadline, is_active=context.is_active
        )
        result = _wait(future, context)
        reply = pb.GenerateResponse(
            text=result.text,
            tokens=result.tokens,
            stopped_at_eos=result.stopped_at_eos,
            version=result.version,
        )
        if result.first_logits is not None:
            reply.first_logits.CopyFrom(tensor_to_proto(result.first_logits))
        return reply

    @rpc
    def GenerateStream(self, request, context):
        options = self._generate_options(request)
        _, deadline = _deadline_of(context)
        tokens: queue.Queue = queue.Queue()
        future = self.engine.generate(
            request.prompt,
            options,
            on_token=lambda token, version: tokens.put((token, version)),
            deadline=deadline,
            is_active=context.is_active,
        )
        future.add_done_callback(lambda _: tokens.put(None))
        while True:
            try:
                item = tokens.get(timeout=None if deadline is None else deadline - time.monotonic())
            except (queue.Empty, ValueError):  # ValueError: the deadline has passed
                future.cancel()
                raise futures.TimeoutError() from None
            if item is None:
                break
            token, version = item
            yield pb.GenerateChunk(
                token=token,
                token_text=self.engine.tokenizer.token_strings([token])[0],
                version=version,
            )
        result = future.result()  # raises what the generation raised
        yield pb.GenerateChunk(
            version=result.version,
            done=True,
            text=result.text,
            stopped_at_eos=result.stopped_at_eos,
        )

    @rpc
    def Lookup(self, request, context):
        self._check_prompt_length(request.prompt)
        _, deadline = _deadline_of(context)
        result = _wait(self.engine.lookup(request.prompt, deadline=deadline), context)
        return pb.LookupResponse(
            tokens=result.tokens,
            token_strings=result.token_strings,
            layers=[
                pb.LayerLookup(
                    layer=layer.layer,
                    slots=tensor_to_proto(layer.slots),
                    weights=tensor_to_proto(layer.weights),
                )
                for layer in result.layers
            ],
            version=result.version,
        )

    def _check_prompt_length(self, prompt: str) -> None:
        if len(prompt) > self.limits.max_prompt_chars:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt is {len(prompt)} characters; this server takes at most "
                f"{self.limits.max_prompt_chars}: shorten it",
            )

    def _check_slot_count(self, count: int) -> None:
        if count > self.limits.max_slots:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} slots in one request; this server takes at most "
                f"{self.limits.max_slots}: split the request",
            )

    @rpc
    def ReadSlots(self, request, context):
        self._check_slot_count(len(request.slots))
        version = self.store.resolve(request.version or "head")
        rows = self.store.read_rows(list(request.slots), version)
        return pb.ReadSlotsResponse(rows=tensor_to_proto(rows), version=version)

    # ---------------------------------------------------------------------------------- writes

    def _commit_and_serve(
        self, commit: Callable[[], Version], rows: torch.Tensor | None = None
    ) -> Version:
        """Run ``commit`` (under the write lock), tell watchers, and wait until it is served.

        ``rows`` are the rows ``commit`` writes, in its slot order, when the caller has them:
        the swap then skips reading them back from the store.
        """
        record = commit()
        with self._commits:
            self._commits.notify_all()
        committed = (list(record.slots), rows) if rows is not None else None
        self.engine.swap_to(record.version, committed).result()
        return record

    def _commit_response(self, record: Version) -> pb.CommitResponse:
        return pb.CommitResponse(
            version=version_to_proto(record, self._tags_by_version().get(record.version)),
            served_version=self.engine.served_version,
        )

    @staticmethod
    def _expected_parent(request, head: int) -> int:
        return request.expected_parent if request.HasField("expected_parent") else head

    def _check_parent(self, parent: int) -> None:
        head = self.store.head
        if parent != head:
            raise ConflictError(
                f"expected parent version {parent} but the head is {head}: another commit "
                f"landed first. Re-read what you need at version {head} and retry with "
                f"expected_parent={head}.",
                expected_parent=parent,
                head=head,
            )

    @rpc
    def WriteSlots(self, request, context):
        self._check_slot_count(len(request.slots))
        slots = list(request.slots)
        rows = tensor_from_proto(request.rows)
        with self._write_lock:
            parent = self._expected_parent(request, self.store.head)
            if request.mode == pb.ADD:
                # The rows are added to the parent's rows: a stale parent must fail first.
                self._check_parent(parent)
                expected = (len(slots), self.store.shape[1])
                if tuple(rows.shape) != expected or rows.dtype != self.store.dtype:
                    raise ValidationError(
                        f"rows are {tuple(rows.shape)} {rows.dtype}; {len(slots)} slot(s) of "
                        f"this store need {expected} {self.store.dtype}"
                    )
                rows = self.store.read_rows(slots, parent) + rows
            mode = pb.WriteMode.Name(request.mode).lower()
            record = self._commit_and_serve(
                lambda: self.store.commit(
                    slots,
                    rows,
                    expected_parent=parent,
                    author=request.author or "api",
                    message=request.message or f"write {len(slots)} slot(s) ({mode})",
                    kind="write",
                    meta={"mode": mode},
                ),
                rows,
            )
        return self._commit_response(record)

    @rpc
    def Rollback(self, request, context):
        if not request.target:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                "target is empty: name the version to restore (a number, tag or 'head~N')",
            )
        with self._write_lock:
            parent = self._expected_parent(request, self.store.head)
            record = self._commit_and_serve(
                lambda: self.store.rollback(
                    request.target,
                    expected_parent=parent,
                    author=request.author or "api",
                    message=request.message,
                )
            )
        return self._commit_response(record)

    def editor(self):
        """The slot editor, created on first use (it needs memslot.edit and slot usage)."""
        if self._editor is None:
            if self._editor_factory is None:
                raise RpcFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "this server has no editor: InjectFacts and FineTune need memslot.edit and "
                    "the model folder's slot_usage.safetensors",
                )
            self._editor = self._editor_factory()
        return self._editor

    def _check_edit_count(self, count: int, what: str) -> None:
        if count == 0:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT, f"no {what} given: send at least one"
            )
        if count > self.limits.max_facts:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} {what} in one request; this server takes at most "
                f"{self.limits.max_facts}: split the request",
            )

    def _edit(self, request, kind: str, run_editor: Callable, meta: dict, default_message: str):
        """Run the editor at the head, under the write lock, and commit its rows if it worked."""
        with self._write_lock:
            editor = self.editor()  # created once, under the lock
            parent = self._expected_parent(request, self.store.head)
            self._check_parent(parent)  # before the edit, which may take seconds
            # The live table is the head here: every swap is queued under this lock and waited.
            result = run_editor(editor)
            reports = [_fact_report(report) for report in result.reports]
            if not result.success:
                failed = [r for r in result.reports if not r.success]
                reasons = "; ".join(f"{r.prompt!r}: {r.message}" for r in failed[:5])
                return pb.EditResponse(
                    success=False,
                    committed=False,
                    served_version=self.engine.served_version,
                    reports=reports,
                    seconds=result.seconds,
                    message=(
                        f"nothing was committed: {len(failed)} of {len(result.reports)} "
                        f"item(s) were not learned ({reasons})"
                    ),
                )
            slots = result.slots.tolist()
            if not slots:  # every item was already known: a version must change something
                return pb.EditResponse(
                    success=True,
                    committed=False,
                    served_version=self.engine.served_version,
                    reports=reports,
                    seconds=result.seconds,
                    message="nothing to commit: the model already answers every item "
                    "(force edits them anyway)",
                )
            rows = result.rows.detach().to("cpu", self.store.dtype)
            record = self._commit_and_serve(
                lambda: self.store.commit(
                    slots,
                    rows,
                    expected_parent=parent,
                    author=request.author or "api",
                    message=request.message or default_message,
                    kind=kind,
                    meta=meta,
                ),
                rows,
            )
        return pb.EditResponse(
            success=True,
            committed=True,
            version=version_to_proto(record),
            served_version=self.engine.served_version,
            reports=reports,
            slots_written=len(slots),
            seconds=result.seconds,
        )

    @rpc
    def InjectFacts(self, request, context):
        self._check_edit_count(len(request.facts), "facts")
        facts = [(fact.prompt, fact.target) for fact in request.facts]
        for prompt, target in facts:
            self._check_prompt_length(prompt + target)
        return self._edit(
            request,
            "inject",
            lambda editor: editor.edit_facts(
                facts, force=request.force, keep=self._taught(self.store)
            ),
            {"facts": [{"prompt": p, "target": t} for p, t in facts]},
            f"inject {len(facts)} fact(s)",
        )

    @rpc
    def FineTune(self, request, context):
        self._check_edit_count(len(request.passages), "passages")
        passages = list(request.passages)
        for passage in passages:
            self._check_prompt_length(passage)
        return self._edit(
            request,
            "finetune",
            lambda editor: editor.edit_passages(passages),
            {"passages": passages},
            f"fine-tune on {len(passages)} passage(s)",
        )

    @rpc
    def Tag(self, request, context):
        with self._write_lock:
            if request.delete:
                version = self.store.resolve(request.name)
                self.store.delete_tag(request.name)
            else:
                version = self.store.resolve(request.version or "head")
                self.store.tag(request.name, version)
        return pb.TagResponse(name=request.name, version=version, tags=self.store.tags())

    # --------------------------------------------------------------------------------- history

    def _tags_by_version(self) -> dict[int, list[str]]:
        by_version: dict[int, list[str]] = {}
        for name, version in sorted(self.store.tags().items()):
            by_version.setdefault(version, []).append(name)
        return by_version

    @rpc
    def ListVersions(self, request, context):
        records = self.store.log(request.limit or 20, request.before or None)
        tags = self._tags_by_version()
        return pb.ListVersionsResponse(
            versions=[version_to_proto(r, tags.get(r.version)) for r in records],
            head=self.store.head,
        )

    @rpc
    def GetVersion(self, request, context):
        record = self.store.show(request.version or "head")
        return version_to_proto(record, self._tags_by_version().get(record.version))

    @rpc
    def Diff(self, request, context):
        if not request.from_version:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                "from_version is empty: name the older version (a number, tag or 'head~N')",
            )
        diff = self.store.diff(
            request.from_version, request.to_version or "head", rows=request.rows
        )
        reply = pb.DiffResponse(from_version=diff.v1, to_version=diff.v2, slots=diff.slots)
        if request.rows:
            reply.before.CopyFrom(tensor_to_proto(diff.before))
            reply.after.CopyFrom(tensor_to_proto(diff.after))
        return reply

    def _watch_start(self, spec: str) -> int:
        text = spec.strip()
        if not text:
            return self.store.head + 1
        if text.isdigit():  # a future version is fine: the stream waits for it
            return int(text)
        return self.store.resolve(text)

    @rpc
    def WatchVersions(self, request, context):
        next_version = self._watch_start(request.from_version)
        with self._commits:
            if self._watchers >= self.limits.max_watchers:
                raise RpcFailure(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server already has {self._watchers} watchers (the limit): retry later",
                )
            self._watchers += 1
        try:
            while context.is_active() and not self._stopping:
                while next_version <= self.store.head:
                    record = self.store.show(next_version)
                    yield version_to_proto(record, self._tags_by_version().get(next_version))
                    next_version += 1
                with self._commits:
                    self._commits.wait_for(
                        lambda wanted=next_version: self._stopping or self.store.head >= wanted,
                        timeout=1.0,
                    )
        finally:
            with self._commits:
                self._watchers -= 1

    @rpc
    def Status(self, request, context):
        cfg = self.engine.model.cfg
        return pb.StatusResponse(
            model=self.model_dir,
            store=str(self.store.path),
            n_slots=self.store.shape[0],
            dim=self.store.shape[1],
            dtype=str(self.store.dtype).removeprefix("torch."),
            device=str(self.engine.device),
            head_version=self.store.head,
            served_version=self.engine.served_version,
            uptime_seconds=time.monotonic() - self._started,
            memory_layers=list(cfg.memory.layers),
            max_seq_len=cfg.max_seq_len,
            editor_available=self._editor_factory is not None,
            requests_served=self.engine.stats.requests,
            memslot_version=__version__,
            oldest_readable=self.store.oldest_readable,
        )

    # ------------------------------------------------------------------------------ store admin

    @rpc
    def Backup(self, request, context):
        dest = Path(request.dest_dir)
        if not request.dest_dir or not dest.is_absolute():
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"dest_dir must be an absolute path on the server's machine, got "
                f"{request.dest_dir!r}",
            )
        head = self.store.head  # a checkpoint holds at least this version
        try:
            self.store.backup(dest)
        except OSError as exc:
            raise RpcFailure(
                grpc.StatusCode.FAILED_PRECONDITION, f"cannot back up to {dest}: {exc}"
            ) from None
        return pb.BackupResponse(dest_dir=str(dest), head_version=head)

    @rpc
    def Compact(self, request, context):
        if not request.keep_from:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                "keep_from is empty: name the oldest version to keep readable "
                "(a number, tag or 'head~N')",
            )
        with self._write_lock:  # the swap of a concurrent write reads rows this may fold
            stats = self.store.compact(request.keep_from)
        return pb.CompactResponse(**stats)

    @rpc
    def ExportVersion(self, request, context):
        version = self.store.resolve(request.version or "head")
        chunk_bytes = min(1 << 20, self.limits.max_message_bytes // 2)
        with tempfile.TemporaryDirectory(prefix="memslot-export-") as tmp:
            path = Path(tmp) / f"version-{version}.safetensors"
            self.store.export_version(version, path)
            with open(path, "rb") as handle:
                while data := handle.read(chunk_bytes):
                    yield pb.FileChunk(data=data, version=version)

    @rpc
    def ImportVersion(self, request_iterator, context):
        n_slots, dim = self.store.shape
        itemsize = torch.empty((), dtype=self.store.dtype).element_size()
        max_bytes = n_slots * dim * itemsize + (1 << 20)  # the table plus a safetensors header
        first = None
        received = 0
        with tempfile.TemporaryDirectory(prefix="memslot-import-") as tmp:
            path = Path(tmp) / "import.safetensors"
            with open(path, "wb") as handle:
                for chunk in request_iterator:
                    first = first or chunk
                    received += len(chunk.data)
                    if received > max_bytes:
                        raise RpcFailure(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"the import is over {max_bytes} bytes, more than a "
                            f"{n_slots}x{dim} {self.store.dtype} table needs: is it the right "
                            "file?",
                        )
                    handle.write(chunk.data)
            if first is None or received == 0:
                raise RpcFailure(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the import is empty: send a safetensors file written by ExportVersion",
                )
            source = os.path.basename(first.source_name).strip(".") or "import.safetensors"
            path = path.rename(Path(tmp) / source)  # the commit's metadata names the source
            _check_safetensors(path, source)
            with self._write_lock:
                parent = self._expected_parent(first, self.store.head)
                record = self._commit_and_serve(
                    lambda: self.store.import_version(
                        path,
                        expected_parent=parent,
                        author=first.author or "api",
                        message=first.message or f"import {source}",
                    )
                )
        return self._commit_response(record)

    # -------------------------------------------------------------------------------- shutdown

    def begin_shutdown(self) -> None:
        """Answer new calls UNAVAILABLE and end the watch streams (they never finish on their
        own); the other calls in flight drain."""
        self.gate.close()
        with self._commits:
            self._stopping = True
            self._commits.notify_all()


def _fact_report(report: FactReport) -> pb.FactReport:
    return pb.FactReport(
        prompt=report.prompt,
        target=report.target,
        success=report.success,
        prob_before=report.prob_before,
        prob_after=report.prob_after,
        loss_before=report.loss_before,
        loss_after=report.loss_after,
        steps=report.steps,
        slots_written=len(report.slots_written),
        message=report.message,
        already_known=report.already_known,
        slots=[s.slot for s in report.slots_written],
    )


def _check_safetensors(path: Path, name: str) -> None:
    """Refuse a file that safetensors cannot read, naming it (the store checks the rest)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # safetensors raises its own error types
        raise RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name} is not a safetensors file ({exc}): export one with `memslot store export`",
        ) from None


def taught_facts(store) -> list[tuple[str, str]]:
    """The facts injected by the versions that make up the head, oldest first; for a prompt
    injected more than once, only its latest target.

    Walks the records down from the head; a rollback to version t undoes everything after t, so
    the walk continues at t. New edits rehearse these facts where they read the rows being
    changed, so that an edit does not silently undo an earlier one.
    """
    injections: list[list[dict]] = []  # newest first
    version = store.head
    while version > 0:
        record = store.show(version)
        if record.kind == "rollback":
            version = int(record.meta["target"])
            continue
        if record.kind == "inject":
            injections.append(record.meta.get("facts", []))
        version = record.parent if record.parent is not None else 0
    return _supersede([], [fact for facts in reversed(injections) for fact in facts])


class TaughtFacts:
    """``taught_facts(store)``, remembered for the last head seen.

    The walk reads one record per version, which grows with every edit; the server's own
    injections extend the list from its parent's instead (a version's history never changes)."""

    def __init__(self) -> None:
        self._version: int | None = None
        self._facts: list[tuple[str, str]] = []

    def __call__(self, store) -> list[tuple[str, str]]:
        head = store.head
        if head != self._version:
            record = store.show(head) if head > 0 else None
            if (
                record is not None
                and record.kind == "inject"
                and self._version is not None
                and record.parent == self._version
            ):
                self._facts = _supersede(self._facts, record.meta.get("facts", []))
            else:
                self._facts = taught_facts(store)
            self._version = head
        return list(self._facts)


def _supersede(facts: list[tuple[str, str]], new: list[dict]) -> list[tuple[str, str]]:
    """``facts`` then ``new``, keeping for each prompt only its latest target."""
    merged = dict.fromkeys(facts)  # ordered set of (prompt, target)
    by_prompt = {p: (p, t) for p, t in facts}
    for fact in new:
        pair = (fact["prompt"], fact["target"])
        merged.pop(by_prompt.get(pair[0]), None)
        merged[pair] = None
        by_prompt[pair[0]] = pair
    return list(merged)


def editor_factory_for(engine: Engine, model_dir: str | Path) -> Callable[[], object] | None:
    """A factory for the slot editor, or None when memslot.edit is not installed."""
    try:
        from memslot.edit import EditConfig, Editor
    except ImportError:
        return None

    def make_editor():
        from memslot.edit.phrasings import load_phrasings
        from memslot.model.checkpoint import load_anchors, load_slot_usage

        counts, tokens = load_slot_usage(model_dir)
        return Editor(
            engine.model,
            engine.tokenizer,
            counts,
            EditConfig(),
            tokens,
            anchors=load_anchors(model_dir),
            phrasings=load_phrasings(model_dir),
        )

    return make_editor


@dataclass
class TlsFiles:
    cert: Path
    key: Path


def build_server(
    service: MemoryService,
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    tokens: dict[str, Role] | None = None,
    tls: TlsFiles | None = None,
    max_workers: int = 32,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready (not yet started) server with MemoryService, health and reflection.

    Returns the server, the port it bound (useful with port 0) and the health servicer.
    """
    check_listen_address(host, tokens)
    max_bytes = service.limits.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="memslot-rpc"),
        interceptors=[service.gate, *([TokenAuth(tokens)] if tokens else [])],
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share
        ],
    )
    pb_grpc.add_MemoryServiceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(tls.key.read_bytes(), tls.cert.read_bytes())]
            )
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc} (is the port in use?)") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address}: is the port in use?")
    return server, bound, health_servicer


def open_or_create_store(store_dir: str | Path, model_dir: str | Path) -> tuple[Store, bool]:
    """Open the store, or create it from the model's shipped value table on first start."""
    from memslot.memstore.db import holds_store
    from memslot.model.checkpoint import VALUES, load_values

    path = Path(store_dir)
    if holds_store(path):
        return Store.open(path), False
    values_file = Path(model_dir) / VALUES
    if not values_file.exists():
        raise FileNotFoundError(
            f"{values_file} is missing: {model_dir} is not a complete memslot model folder "
            "(build the demo model with `memslot train-demo`)"
        )
    table = load_values(values_file)
    return Store.create(path, table, message=f"initial table from {values_file}"), True


DRAIN_LINGER_S = 0.5  # how long a drained server still answers UNAVAILABLE before it stops


def drain(
    server: grpc.Server,
    service: MemoryService,
    health_servicer: health.HealthServicer,
    grace_seconds: float,
) -> None:
    """Stop taking calls, let in-flight calls finish (up to the grace), stop the engine.

    New calls are answered UNAVAILABLE from the start, and gRPC is stopped only once the calls
    in flight are done (or the grace is spent): a call that reaches a stopping gRPC server is
    answered CANCELLED, which tells a client nothing about where to go."""
    deadline = time.monotonic() + grace_seconds
    health_servicer.enter_graceful_shutdown()
    service.begin_shutdown()
    if service.gate.wait_idle(grace_seconds):
        # a client whose call has just been answered may send its next one: let the gate
        # answer that UNAVAILABLE too before gRPC stops
        time.sleep(max(0.0, min(DRAIN_LINGER_S, deadline - time.monotonic())))
    server.stop(max(0.0, deadline - time.monotonic())).wait()
    service.engine.close()
