"""OTLP/JSON files: one ``Export*ServiceRequest`` per line, as the Collector writes them.

The lines are what the Collector's file exporter produces, so a file can be
replayed into a collector (its ``otlpjsonfile`` receiver reads them) or
loaded by any OTLP/JSON reader.  The file is appended to after every export
and flushed to disk, so it holds every interval completed before a crash.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ..._base.errors import ConfigError, ExportError
from ..._base.overhead import run_sync
from ..files import cannot_write, writable_path

if TYPE_CHECKING:  # the model, and protobuf, load with the first export
    from google.protobuf.message import Message

    from ..._base.overhead import Overhead
    from ..._base.stats import Stats
    from ..._convert.converter import EventConverter
    from ..._model.batch import Batch
    from ..base import ExportContext


def _append(path: Path, requests: list[Message]) -> None:
    from ..._convert.json import encode_otlp_json

    lines = b"".join(encode_otlp_json(r) + b"\n" for r in requests if r.ListFields())
    try:
        with path.open("ab") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise cannot_write(path, exc) from exc


class OtlpJsonFileExporter:
    """Writes each batch's profiles, metrics and logs as OTLP/JSON lines to ``path``.

    The file is truncated when the exporter is created (so a path that cannot
    be written is refused at once, with ``ConfigError``) and when a run binds
    it: one file, one run.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = writable_path(path)
        self._converter: EventConverter | None = None  # made for each run
        self._context: ExportContext | None = None
        self._lock = anyio.Lock()
        try:
            self._truncate()
        except ExportError as exc:  # the file itself is read-only, say
            raise ConfigError(str(exc)) from None

    def _truncate(self) -> None:
        try:
            self.path.write_bytes(b"")
        except OSError as exc:
            raise cannot_write(self.path, exc) from exc

    def bind(self, context: ExportContext) -> None:
        self._context = context
        self._converter = None
        self._truncate()

    async def export(self, batch: Batch) -> None:
        context = self._context
        # Read here, not in the worker thread: the pipeline updates them meanwhile.
        stats = context.stats.snapshot() if context else None
        overhead = context.overhead() if context else None
        async with self._lock:
            await run_sync(self._write, batch, stats, overhead)

    def prepare(self) -> None:
        from ..._convert.converter import EventConverter
        from ..._convert.json import encode_otlp_json  # noqa: F401  (loaded for the first export)

        context = self._context
        self._converter = (EventConverter(context.config, mode=context.mode) if context
                           else EventConverter())

    def _write(self, batch: Batch, stats: Stats | None, overhead: Overhead | None) -> None:
        if self._converter is None:
            self.prepare()
        assert self._converter is not None
        converted = self._converter.convert_batch(batch, stats, overhead)
        _append(self.path, [converted.profiles, converted.metrics, converted.logs])

    async def aclose(self) -> None:
        pass
