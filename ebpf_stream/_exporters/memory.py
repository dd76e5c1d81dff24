"""An exporter that keeps everything in memory, for tests and embedding."""

from __future__ import annotations

from .._batch import Batch
from .._profile import Profile


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
    """Collects every batch as is, plus their merge, timestamps included."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.closed = False
        self._profile: Profile | None = None

    @property
    def profile(self) -> Profile | None:
        """All batches merged, or None before the first one."""
        return self._profile

    async def export(self, batch: Batch) -> None:
        self.batches.append(batch)
        self._profile = accumulate(self._profile, batch.profile, keep_timestamps=True)

    async def aclose(self) -> None:
        self.closed = True
