"""Keeping what a run exported in memory: every batch for tests and embedding, or
only the latest totals, which the CLI tallies as a long run goes."""

from __future__ import annotations

from typing import Self

from .._model.batch import Batch, TraceRecord
from .._model.events import LatestTotals, Totals
from .._model.profile import Profile


def accumulate(total: Profile | None, profile: Profile, *, keep_timestamps: bool) -> Profile:
    """``total`` with ``profile`` merged in, or a copy of ``profile`` when there is no total.

    Copying the first profile (rather than keeping it) means later merges
    never mutate a batch that someone else may still hold.
    """
    if total is None:
        total = Profile(profile.period_ns, profile.start_ns, profile.end_ns)
    total.merge(profile, keep_timestamps=keep_timestamps)
    return total


class MemoryExporter:
    """Collects every batch as is, plus their merge, timestamps included.

    ``records`` holds every record (slow syscalls, connections, OOM kills) in
    arrival order; ``totals`` the latest cumulative totals per process (and
    per syscall), which are the run's totals once it has ended.  It keeps
    them after the run, until a next run enters it.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.batches: list[Batch] = []
        self.records: list[TraceRecord] = []
        self.closed = False
        self._profile: Profile | None = None
        self._totals = LatestTotals()

    @property
    def totals(self) -> list[Totals]:
        return self._totals.all()

    @property
    def profile(self) -> Profile | None:
        """All batches merged, or None before the first one."""
        return self._profile

    async def export(self, batch: Batch) -> None:
        self.batches.append(batch)
        self._profile = accumulate(self._profile, batch.profile, keep_timestamps=True)
        self.records.extend(batch.records)
        self._totals.update(batch.totals)

    async def __aenter__(self) -> Self:
        self._reset()
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass  # the run closes it with aclose()

    async def aclose(self) -> None:
        self.closed = True
