"""The shape shared by the tracing probe families (syscalls, network, memory).

Each family has one kernel program that does two things: it aggregates
counts in maps, which are far too frequent to stream one by one, and it
streams rare, discrete records (a slow syscall, a closed connection, an OOM
kill) through a ring buffer of fixed-size records.  ``RingProbe`` opens the
program; this base reads the ring's records and the maps' totals as numpy
records (``records``) and warns of what the program could not keep.  A
family says what its records and totals look like and which event each
becomes.

Totals are read as ``RingProbe`` reads them: cumulative, once per export
interval.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from .._base.config import EbpfConfig
from .._base.stats import Stats
from .._bpf.ringbuf import Records
from .._model.events import Event, EventMessage, encode_events
from .base import Emit, RingProbe
from .records import map_records, ring_records

log = logging.getLogger("ebpf_stream")


class TracingProbe(RingProbe):
    """Base of the families that stream records and read cumulative totals.

    Subclasses set ``source`` (the file under ``kernel/``), ``record`` (the
    ring's record layout) and ``maps`` (the maps user space reads besides
    ``records``, ``counters`` and ``targets``), implement ``decode`` and
    ``read_totals``, and extend ``RingProbe``'s hooks (``cflags``,
    ``programs``, ``attach``) where they differ.  ``losses`` names the
    counters beyond RING_FULL that count events the program could not keep
    (a full table), so each new loss is reported as a warning when the
    totals are read.
    """

    ring_map = "records"
    record: np.dtype[np.void]
    maps: tuple[str, ...] = ()
    ring_full_counter = 0  # every family's `enum counter` starts with RING_FULL
    losses: ClassVar[dict[int, str]] = {}  # counter index -> what a loss there means

    def __init__(self, config: EbpfConfig, stats: Stats, *,
                 targets: Sequence[int] | None, follow_children: bool = False) -> None:
        super().__init__(config, stats, targets=targets, follow_children=follow_children)
        self._losses_seen: dict[int, int] = {}

    # -- what a family provides -------------------------------------------------

    @abc.abstractmethod
    def decode(self, records: np.ndarray) -> list[Event]:
        """The events of a batch of ring records."""

    @abc.abstractmethod
    def read_totals(self) -> list[Event]:
        """A snapshot of the cumulative totals in the maps."""

    def forget(self, pids: set[int]) -> None:
        """Delete the ``totals`` entries of processes that have exited; keyed by pid
        unless a family says otherwise."""
        totals = self.map("totals")
        for pid in pids:
            totals.delete(pid.to_bytes(4, "little"))

    # -- RingProbe's hooks ------------------------------------------------------

    @property
    def record_size(self) -> int:
        return self.record.itemsize

    def map_names(self) -> list[str]:
        return list(self.maps)

    # -- reading -----------------------------------------------------------------

    def read_table(self, name: str, key: np.dtype[np.void],
                   value: np.dtype[np.void]) -> tuple[np.ndarray, np.ndarray]:
        """The entries of map ``name`` as numpy records (see ``map_records``)."""
        return map_records(self.map(name), key, value)

    def encode(self, frames: Records) -> EventMessage:
        records = ring_records(frames, self.record)
        self._stats.received += len(records)
        return encode_events(self.decode(records), len(records))

    async def run(self, emit: Emit) -> None:
        await self.read_ring_and_totals(emit)

    def totals_message(self) -> EventMessage:
        message = super().totals_message()
        self._warn_of_losses()
        return message

    def losses_seen(self, index: int) -> int:
        """The loss counter ``index`` as last read (it survives closing)."""
        return self._losses_seen.get(index, 0)

    def _warn_of_losses(self) -> None:
        counters = self.map("counters")
        for index, meaning in self.losses.items():
            total = counters.lookup_u64_sum(index)
            new = total - self._losses_seen.get(index, 0)
            if new > 0:
                log.warning("%s: %s (%d more, %d in all)", self.source, meaning, new, total)
                self._losses_seen[index] = total

    async def drain(self, emit: Emit) -> None:
        if self._ring is None:
            return
        await self.drain_ring(emit)
        await emit(encode_events(self.read_totals(), 0))
        self._warn_of_losses()
