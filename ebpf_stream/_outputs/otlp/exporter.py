"""The OTLP exporter: converts each batch and delivers it in the background.

``export()`` only converts the batch (in a worker thread) and queues its
requests (profiles, metrics and logs), so a slow or absent receiver never
holds up the pipeline or the other exporters.  The queue is bounded in
batches; when it is full the run's overflow policy applies (wait, drop the
newest, or drop the oldest) and every sample lost that way is counted in
``Stats.undelivered``.  A sample travels in one request (CPU samples in the
profiles, traced events in the logs), so a request given up costs its own.

A single sender delivers the queue in order.  Retryable failures are retried
with exponential backoff and jitter (or after the delay the receiver asked
for) for up to ``retry_for_s``; after that, or on a final error, the
request is given up and counted.  ``aclose()`` flushes what is queued
within ``flush_timeout_s`` (by default the endpoints' timeout) and then
raises ``ExportError`` naming the endpoint if anything was not delivered.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup
from google.protobuf.message import Message

from ..._base.config import OverflowPolicy
from ..._base.errors import ExportError
from ..._base.otlp_settings import Endpoint, Protocol, Signal, otlp_endpoints
from ..._base.otlp_settings import resource_attributes as otlp_resource_attributes
from ..._base.overhead import run_sync
from ..._base.stats import Stats
from ..._convert.converter import EventConverter
from ..._model.batch import Batch
from ..base import ExportContext
from .transport import DeliveryError, Transport

log = logging.getLogger("ebpf_stream")

_BACKOFF_FIRST_S = 0.25
_BACKOFF_MAX_S = 8.0
_LOG_BUFFER = 256  # engine log records held between exports; older ones are dropped


def backoff(attempt: int) -> float:
    """Delay before retry ``attempt`` (0-based): doubling, capped, with jitter.

    The jitter (a random 50-100% of the step) keeps many profilers that lost
    the same collector from retrying in lockstep when it comes back.
    """
    step = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** min(attempt, 16))
    return float(step * random.uniform(0.5, 1.0))


def _rejected(response: Message) -> tuple[int, str]:
    """(items rejected, the receiver's message) from a partial-success response."""
    partial = getattr(response, "partial_success", None)
    if partial is None:
        return 0, ""
    count = next((value for field, value in partial.ListFields()
                  if field.name.startswith("rejected_")), 0)
    return int(count), str(partial.error_message)


class _LogBuffer(logging.Handler):
    """Keeps the engine's warnings and errors until the next export sends them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[logging.LogRecord] = collections.deque(
            maxlen=_LOG_BUFFER)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        records = list(self.records)
        self.records.clear()
        return records


@dataclasses.dataclass(frozen=True, slots=True)
class _Request:
    signal: Signal
    message: Message
    samples: int  # the samples it carries: lost with it if it is given up


@dataclasses.dataclass(slots=True)
class _Outgoing:
    requests: list[_Request]

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.requests)


def _transport(endpoint: Endpoint) -> Transport:
    # Imported here so a process that only uses HTTP never loads grpc's C core.
    if endpoint.protocol is Protocol.GRPC:
        from .grpc import GrpcTransport
        return GrpcTransport(endpoint)
    from .http import HttpTransport
    return HttpTransport(endpoint)


class OtlpExporter:
    """Exports profiles, metrics and logs (traced events and the engine's own) over OTLP.

    Settings come from the ``OTEL_EXPORTER_OTLP_*`` variables, overridden by
    the arguments; see the README for the list.  Use it as an async context
    manager (``Profiler`` does this itself), which runs the sender::

        async with OtlpExporter(endpoint="http://collector:4318") as otlp:
            await otlp.export(batch)

    ``transports`` replaces the network, per signal (any ``Transport``: the
    tests' stands in for a receiver).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        protocol: Protocol | str | None = None,
        headers: Mapping[str, str] | None = None,
        compression: str | None = None,
        timeout_s: float | None = None,
        resource_attributes: Mapping[str, str] | None = None,
        queue_size: int = 4,
        overflow_policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST,
        retry_for_s: float = 60.0,
        flush_timeout_s: float | None = None,
        transports: Mapping[Signal, Transport] | None = None,
        environ: Mapping[str, str] | None = None,
        source: str = "endpoint",
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        endpoints = otlp_endpoints(environ, endpoint=endpoint, protocol=protocol,
                                   headers=headers, compression=compression,
                                   timeout_s=timeout_s, source=source)
        self._transports: dict[Signal, Transport] = dict(transports or {})
        for signal, ep in endpoints.items():
            if signal not in self._transports:  # not setdefault: it would build one anyway
                self._transports[signal] = _transport(ep)
        self.endpoints = {s: t.endpoint for s, t in self._transports.items()}
        self._resource_attributes = (
            otlp_resource_attributes(environ) if resource_attributes is None
            else resource_attributes)
        self._converter = EventConverter(resource_attributes=self._resource_attributes)
        self._queue_size = queue_size
        self._policy = overflow_policy
        self._retry_for = retry_for_s
        self.flush_timeout_s = (flush_timeout_s if flush_timeout_s is not None
                                else max(ep.timeout_s for ep in self.endpoints.values()))
        self._stats = Stats()
        self._context: ExportContext | None = None
        self._logs = _LogBuffer()
        self._new_run()

    def _new_run(self) -> None:
        """The sender's state as it is before a run: nothing queued, nothing failed."""
        self._queue: collections.deque[_Outgoing] = collections.deque()
        self._logs.take()
        self._task_group: TaskGroup | None = None
        self._sender: anyio.CancelScope | None = None
        self._wake = anyio.Event()
        self._space = anyio.Event()
        self._idle = anyio.Event()
        self._closing = False
        self._closed = False
        self._failing: set[Signal] = set()
        self._failure: tuple[Signal, str] | None = None
        self._last_error: tuple[Signal, str] | None = None
        self._queue_drops = 0
        self._in_flight_samples = 0

    @property
    def stats(self) -> Stats:
        """This exporter's counters, or the profiler's when it runs under one."""
        return self._stats

    def bind(self, context: ExportContext) -> None:
        """Share the run's counters and policy; ``Profiler`` calls this before starting."""
        self._context = context
        self._stats = context.stats
        self._policy = context.config.overflow_policy
        self._converter = EventConverter(context.config, self._resource_attributes,
                                         mode=context.mode)

    async def __aenter__(self) -> Self:
        if self._task_group is not None:
            raise RuntimeError("this OtlpExporter is already running")
        self._new_run()  # in this event loop: a later run may have its own
        if self._context is None:  # not bound to a run: counters of its own, for this run
            self._stats = Stats()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        # Shielded: cancelling the host must not stop the flush in aclose(), which bounds it
        # with the flush timeout and then cancels the sender itself.
        self._sender = anyio.CancelScope(shield=True)
        self._task_group.start_soon(self._send_loop, self._sender)
        logging.getLogger("ebpf_stream").addHandler(self._logs)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            with anyio.CancelScope(shield=exc_type is not None):
                await self.aclose()
        finally:
            assert self._task_group is not None and self._sender is not None
            task_group, self._task_group = self._task_group, None
            self._context = None  # a next run binds its own
            self._sender.cancel()
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)

    async def export(self, batch: Batch) -> None:
        """Convert ``batch`` and queue it for delivery."""
        if self._task_group is None or self._closing:
            raise RuntimeError("OtlpExporter.export() needs `async with OtlpExporter(...)`")
        context = self._context
        # Read here, not in the worker thread: the pipeline updates them meanwhile.
        stats = context.stats.snapshot() if context else None
        overhead = context.overhead() if context else None
        converted = await run_sync(self._converter.convert_batch, batch, stats, overhead)
        logs = converted.logs
        records = self._logs.take()
        if records:  # one logs request: the engine's records go with the batch's events
            logs.MergeFrom(self._converter.convert_logs(records))
        await self._enqueue(_Outgoing([
            _Request(Signal.PROFILES, converted.profiles, batch.profile.sample_count),
            _Request(Signal.METRICS, converted.metrics, 0),
            _Request(Signal.LOGS, logs, len(batch.records)),
        ]))

    async def aclose(self) -> None:
        """Deliver what is queued within the flush timeout, then release the transports.

        Raises ``ExportError`` naming the endpoint when anything collected
        was not delivered.
        """
        if self._closed:
            return
        self._closed = True
        records = self._logs.take()
        logging.getLogger("ebpf_stream").removeHandler(self._logs)
        if records and self._task_group is not None and not self._closing:
            # Appended over the bound rather than through _enqueue: a full queue must neither
            # block close past the flush timeout nor drop a batch of samples for the logs.
            logs = self._converter.convert_logs(records)
            self._queue.append(_Outgoing([_Request(Signal.LOGS, logs, 0)]))
        self._closing = True
        self._wake.set()
        if self._task_group is not None:
            with anyio.move_on_after(self.flush_timeout_s):
                await self._idle.wait()
            if not self._idle.is_set():
                assert self._sender is not None
                self._sender.cancel()
                lost = sum(item.samples for item in self._queue) + self._in_flight_samples
                self._queue.clear()
                signal, reason = self._last_error or (Signal.PROFILES, "no response")
                self._give_up(signal, lost,  # raised below: no need to log it as well
                              f"{reason} (gave up at the {self.flush_timeout_s:g}s flush timeout)",
                              quiet=True)
        for transport in self._transports.values():
            with anyio.CancelScope(shield=True):
                await transport.aclose()
        if self._failure is not None:
            signal, reason = self._failure
            lost = self._stats.undelivered
            raise ExportError(
                f"OTLP export to {self.endpoints[signal].display} failed: {reason}; "
                + (f"{lost:,} samples not delivered" if lost else "no samples lost"))

    # -- queue ------------------------------------------------------------------

    async def _enqueue(self, item: _Outgoing) -> None:
        while len(self._queue) >= self._queue_size:
            if self._policy is OverflowPolicy.BLOCK:
                self._space = anyio.Event()
                await self._space.wait()
            elif self._policy is OverflowPolicy.DROP_NEWEST:
                self._drop(item)
                return
            else:
                self._drop(self._queue.popleft())
        self._queue.append(item)
        self._wake.set()

    def _drop(self, item: _Outgoing) -> None:
        self._stats.undelivered += item.samples
        self._queue_drops += 1
        if self._queue_drops == 1:  # once: a slow receiver would otherwise flood the log
            log.warning("OTLP export queue full (%d batches); dropping batches until the "
                        "receiver catches up", self._queue_size)

    async def _send_loop(self, scope: anyio.CancelScope) -> None:
        with scope:
            await self._send_queued()

    async def _send_queued(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    self._idle.set()
                    return
                self._wake = anyio.Event()
                await self._wake.wait()
            item = self._queue.popleft()
            self._space.set()
            self._in_flight_samples = item.samples
            # One retry budget per batch: once a down receiver has cost it, the batch's
            # other requests are not retried for as long again.
            give_up_at = time.monotonic() + self._retry_for
            for request in item.requests:
                delivered = await self._deliver(request.signal, request.message, give_up_at)
                self._in_flight_samples -= request.samples
                if not delivered:
                    self._stats.undelivered += request.samples

    # -- delivery ---------------------------------------------------------------

    async def _deliver(self, signal: Signal, request: Message, give_up_at: float) -> bool:
        """Send with retries until ``give_up_at``; True once delivered, False once given up."""
        if not request.ListFields():
            return True  # nothing in it: a batch without samples, say
        transport = self._transports[signal]
        attempt = 0
        while True:
            try:
                response = await transport.send(request)
            except DeliveryError as exc:
                self._last_error = (signal, str(exc))
                delay = exc.retry_after if exc.retry_after is not None else backoff(attempt)
                if not exc.retryable or time.monotonic() + delay > give_up_at:
                    self._give_up(signal, 0, str(exc))
                    return False
                if signal not in self._failing:
                    self._failing.add(signal)
                    log.warning("OTLP export to %s failed (%s); retrying",
                                transport.endpoint.display, exc)
                attempt += 1
                await anyio.sleep(delay)
                continue
            if signal in self._failing:
                self._failing.discard(signal)
                log.info("OTLP export to %s recovered", transport.endpoint.display)
            rejected, message = _rejected(response)
            if rejected or message:
                self._stats.rejected += rejected
                log.warning("OTLP receiver %s rejected %d %s: %s", transport.endpoint.display,
                            rejected, signal.value, message or "no reason given")
            return True

    def _give_up(self, signal: Signal, samples: int, reason: str, *, quiet: bool = False) -> None:
        self._stats.undelivered += samples
        self._stats.export_errors += 1
        if self._failure is None:
            self._failure = (signal, reason)
        if not quiet:
            log.error("OTLP export to %s failed: %s", self.endpoints[signal].display, reason)


class OtlpGrpcExporter(OtlpExporter):
    """``OtlpExporter`` over gRPC, whatever ``OTEL_EXPORTER_OTLP_PROTOCOL`` says."""

    def __init__(self, endpoint: str | None = None, **options: Any) -> None:
        super().__init__(endpoint, protocol=Protocol.GRPC, **options)


class OtlpHttpExporter(OtlpExporter):
    """``OtlpExporter`` over HTTP with protobuf bodies, whatever the environment says."""

    def __init__(self, endpoint: str | None = None, **options: Any) -> None:
        super().__init__(endpoint, protocol=Protocol.HTTP_PROTOBUF, **options)
