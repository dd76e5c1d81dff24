"""The OTLP exporter: converts each batch and delivers it in the background.

``export()`` only converts the batch (in a worker thread) and queues its
requests (profiles, metrics and logs), so a slow or absent receiver never
holds up the pipeline or the other exporters.  The queue is bounded in
batches; when it is full the run's overflow policy applies (wait, drop the
newest, or drop the oldest).  ``Delivery`` sends the queue with retries and
counts what it loses; ``LogBuffer`` holds the engine's own warnings and
errors, which go out as OTLP logs.  This module ties them to a run:
``aclose()`` flushes what is queued within ``flush_timeout_s`` (by default
the endpoints' timeout) and then raises ``ExportError`` naming the endpoint
if anything was not delivered.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup

from ..._base.config import OverflowPolicy
from ..._base.errors import ExportError
from ..._base.otlp_settings import Endpoint, Protocol, Signal, otlp_endpoints
from ..._base.otlp_settings import resource_attributes as otlp_resource_attributes
from ..._base.overhead import run_sync
from ..._base.stats import Stats
from ..._convert.converter import EventConverter
from ..._model.batch import Batch
from ..base import ExportContext
from .delivery import Delivery, Request
from .log_buffer import LogBuffer
from .transport import Transport


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
        self._logs = LogBuffer()
        self._task_group: TaskGroup | None = None
        self._new_run()

    def _new_run(self) -> None:
        """The sender's state as it is before a run: nothing queued, nothing failed."""
        self._delivery = Delivery(self._transports, self._stats, queue_size=self._queue_size,
                                  policy=self._policy, retry_for_s=self._retry_for)
        self._queue = self._delivery.queue  # export() fills it, the sender empties it
        self._logs.take()
        self._sender: anyio.CancelScope | None = None
        self._closed = False

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
        if self._context is None:  # not bound to a run: counters of its own, for this run
            self._stats = Stats()
        self._new_run()  # in this event loop: a later run may have its own
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
        if self._task_group is None or self._queue.closed:
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
        await self._delivery.put(
            Request(Signal.PROFILES, converted.profiles, batch.profile.sample_count),
            Request(Signal.METRICS, converted.metrics, 0),
            Request(Signal.LOGS, logs, len(batch.records)),
        )

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
        if records and self._task_group is not None:
            self._delivery.put_last(
                Request(Signal.LOGS, self._converter.convert_logs(records), 0))
        self._queue.close()
        if self._task_group is not None:
            with anyio.move_on_after(self.flush_timeout_s):
                await self._delivery.idle.wait()
            if not self._delivery.idle.is_set():
                assert self._sender is not None
                self._sender.cancel()
                self._delivery.abandon(f"gave up at the {self.flush_timeout_s:g}s flush timeout")
        for transport in self._transports.values():
            with anyio.CancelScope(shield=True):
                await transport.aclose()
        if self._delivery.failure is not None:
            signal, reason = self._delivery.failure
            lost = self._stats.undelivered
            raise ExportError(
                f"OTLP export to {self.endpoints[signal].display} failed: {reason}; "
                + (f"{lost:,} samples not delivered" if lost else "no samples lost"))

    async def _send_loop(self, scope: anyio.CancelScope) -> None:
        with scope:
            await self._delivery.run()


class OtlpGrpcExporter(OtlpExporter):
    """``OtlpExporter`` over gRPC, whatever ``OTEL_EXPORTER_OTLP_PROTOCOL`` says."""

    def __init__(self, endpoint: str | None = None, **options: Any) -> None:
        super().__init__(endpoint, protocol=Protocol.GRPC, **options)


class OtlpHttpExporter(OtlpExporter):
    """``OtlpExporter`` over HTTP with protobuf bodies, whatever the environment says."""

    def __init__(self, endpoint: str | None = None, **options: Any) -> None:
        super().__init__(endpoint, protocol=Protocol.HTTP_PROTOBUF, **options)
