"""Delivering each batch to several exporters, isolating their failures.

One exporter failing (a full disk, an unreachable collector) must not stop
the others from receiving what was collected; its error is kept and raised
when the run ends, so the user still learns about it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import anyio

from .._base.errors import ExportError
from .._base.overhead import run_sync
from .._base.stats import Stats
from .._model.batch import Batch
from .base import BindableExporter, ExportContext, Exporter, PreparedExporter

log = logging.getLogger("ebpf_stream")


def _one_line(exc: Exception) -> str:
    """``exc``'s message on one line, as every error of ours: a collector's reply
    may span several."""
    return " ".join(str(exc).split())


class FanOut:
    """An exporter that forwards to ``exporters`` and counts what got through.

    As an async context manager it binds the exporters that want the run's
    context, enters those that are context managers, and on exit closes
    them all, shielded, raising the first failure.
    """

    def __init__(self, exporters: Sequence[Exporter], stats: Stats,
                 context: ExportContext | None = None) -> None:
        self._exporters = list(exporters)
        self._stats = stats
        self._context = context
        self._errors: dict[int, Exception] = {}
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            for exporter in self._exporters:
                if self._context is not None and isinstance(exporter, BindableExporter):
                    exporter.bind(self._context)
                if isinstance(exporter, PreparedExporter):
                    await run_sync(exporter.prepare)
                if isinstance(exporter, contextlib.AbstractAsyncContextManager):
                    await stack.enter_async_context(exporter)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await self.aclose()
        finally:
            # Outside the shield: the exporters' task groups were entered before it.
            await self._stack.aclose()

    async def export(self, batch: Batch) -> None:
        """Export to every healthy exporter.

        A batch counts as exported when at least one exporter took it, and
        as dropped when none did, so every sample received is accounted for.
        It is counted before the exporters see it, so that the engine's
        counters an exporter sends with the batch include the batch; when no
        exporter takes it, no counters went out with it, and it is moved
        from exported to dropped.
        """
        self._stats.exported += batch.sample_count
        delivered = False
        for i, exporter in enumerate(self._exporters):
            if i in self._errors:
                continue
            try:
                await exporter.export(batch)
            except Exception as exc:
                self._fail(i, exc)
            else:
                delivered = True
        if self._exporters and not delivered:
            self._stats.exported -= batch.sample_count
            self._stats.dropped_user += batch.sample_count

    async def aclose(self) -> None:
        for i, exporter in enumerate(self._exporters):
            try:
                await exporter.aclose()
            except Exception as exc:
                self._fail(i, exc, quiet=True)  # raised below: logging it too would say it twice
        if self._errors:
            first = next(iter(self._errors.values()))
            message = _one_line(first)
            if isinstance(first, ExportError) and message == str(first):
                raise first
            if not isinstance(first, ExportError):
                message = f"export failed: {message}"
            raise ExportError(message) from first

    def _fail(self, index: int, exc: Exception, *, quiet: bool = False) -> None:
        self._stats.export_errors += 1
        self._errors.setdefault(index, exc)
        if not quiet:
            log.error("exporter %s failed: %s",
                      type(self._exporters[index]).__name__, _one_line(exc))
