"""Counters every stage updates, read by users as ``Profiler.stats``."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class Stats:
    """How many samples were received, lost where, and exported.

    ``dropped_kernel`` counts samples the kernel could not put in the ring
    buffer (it was full); ``dropped_user`` counts samples dropped in user
    space (a channel overflowed under a drop policy, or an interval exceeded
    ``max_samples``).  ``lost_stacks`` counts samples kept without one of
    their stacks because a stack map was full.

    ``exported`` counts samples of the batches at least one exporter took;
    a batch is counted as it is handed over, so the counters an exporter
    sends with a batch (``ebpf_stream.*`` metrics) include it.  Exporters
    that deliver later (OTLP) count what they then fail to deliver in
    ``undelivered`` (their queue overflowed, or delivery failed for good) and
    what a receiver refused in a partial success in ``rejected`` (in the
    receiver's units: profiles, data points, log records).
    """

    received: int = 0
    dropped_kernel: int = 0
    dropped_user: int = 0
    exported: int = 0
    lost_stacks: int = 0
    export_errors: int = 0
    undelivered: int = 0
    rejected: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_kernel + self.dropped_user

    def snapshot(self) -> Stats:
        return dataclasses.replace(self)

    def add(self, other: Stats) -> None:
        """Add ``other``'s counts: a stage counting off the event loop hands them over."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def clear(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, 0)
