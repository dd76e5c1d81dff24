"""Delivering each batch to several exporters, isolating their failures.

One exporter failing (a full disk, say) must not stop the others from
receiving what was collected; its error is kept and raised when the run
ends, so the user still learns about it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .._batch import Batch
from .._errors import ExportError
from .._stats import Stats
from .base import Exporter

log = logging.getLogger("ebpf_stream")


class FanOut:
    """An exporter that forwards to ``exporters`` and counts what got through."""

    def __init__(self, exporters: Sequence[Exporter], stats: Stats) -> None:
        self._exporters = list(exporters)
        self._stats = stats
        self._errors: dict[int, Exception] = {}

    async def export(self, batch: Batch) -> None:
        """Export to every healthy exporter.

        A batch counts as exported when at least one exporter took it, and
        as dropped when none did, so every sample received is accounted for.
        """
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
        if delivered or not self._exporters:
            self._stats.exported += batch.profile.sample_count
        else:
            self._stats.dropped_user += batch.profile.sample_count

    async def aclose(self) -> None:
        for i, exporter in enumerate(self._exporters):
            try:
                await exporter.aclose()
            except Exception as exc:
                self._fail(i, exc)
        if self._errors:
            first = next(iter(self._errors.values()))
            if isinstance(first, ExportError):
                raise first
            raise ExportError(f"export failed: {first}") from first

    def _fail(self, index: int, exc: Exception) -> None:
        self._stats.export_errors += 1
        self._errors.setdefault(index, exc)
        log.error("exporter %s failed: %s", type(self._exporters[index]).__name__, exc)
