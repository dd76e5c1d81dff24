"""The exporter boundary: the one interface between the engine and its outputs.

An exporter receives each batch as it is flushed and is closed once at the
end of the run.  Anything with these two coroutines is an exporter, so users
can plug in their own without subclassing.

Two optional extras, both used by the OTLP exporters: ``bind(context)``
gives an exporter the run's counters (to report on the engine itself and
count its own losses), and an exporter that is an async context manager is
entered for the run, so it can keep background tasks (a sender) alive.

An exporter may serve several runs, one after another: each run binds it,
enters it, exports to it and closes it.  A run after ``aclose()`` starts it
afresh, so what it then writes or holds is that run's alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: a host importing the boundary loads no model
    from .._base.config import EbpfConfig
    from .._base.overhead import Overhead
    from .._base.stats import Stats
    from .._model.batch import Batch


@runtime_checkable
class Exporter(Protocol):
    async def export(self, batch: Batch) -> None:
        """Deliver or store one batch.  Called once per export interval."""

    async def aclose(self) -> None:
        """Flush what is pending and release resources.  Called once, when the run ends."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExportContext:
    """What a run shares with exporters that report on the engine.

    ``stats`` is the run's live counters: an exporter that loses samples
    after accepting them adds them to ``stats.undelivered``.  ``mode`` is how
    the run profiles (``Profiler.mode``): ``"bpf"`` or ``"fallback"``.
    """

    config: EbpfConfig
    stats: Stats
    overhead: Callable[[], Overhead]
    mode: str = "bpf"


@runtime_checkable
class PreparedExporter(Protocol):
    def prepare(self) -> None:
        """Called once per run, in a worker thread, before its first export.

        An exporter loads here what exporting takes (a renderer, the OTLP
        messages), so that this happens as the run starts, and the first
        export, under the host's load, costs no more than the next.
        """


@runtime_checkable
class BindableExporter(Protocol):
    def bind(self, context: ExportContext) -> None:
        """Called once per run, before its first export."""
