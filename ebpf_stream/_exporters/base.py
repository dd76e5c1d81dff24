"""The exporter boundary: the one interface between the engine and its outputs.

An exporter receives each batch as it is flushed and is closed once at the
end of the run.  Anything with these two coroutines is an exporter, so users
can plug in their own without subclassing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .._batch import Batch


@runtime_checkable
class Exporter(Protocol):
    async def export(self, batch: Batch) -> None:
        """Deliver or store one batch.  Called once per export interval."""

    async def aclose(self) -> None:
        """Flush what is pending and release resources.  Called exactly once."""
