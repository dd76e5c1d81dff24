"""The shape shared by the tracing probe families (syscalls, network, memory).

Each family has one kernel program that does two things: it aggregates
counts in maps, which are far too frequent to stream one by one, and it
streams rare, discrete records (a slow syscall, a closed connection, an OOM
kill) through a ring buffer of fixed-size records.  This base owns the
loading, target filtering, ring draining and the periodic reading of the
totals; a family says what its program is called, how its records decode
and how its totals read.

Totals are read as ``RingProbe`` reads them: cumulative, once per export
interval.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from typing import ClassVar

import anyio
import anyio.lowlevel
import numpy as np

from .._base.clock import wall_clock_offset_ns
from .._base.config import EbpfConfig
from .._base.stats import Stats
from .._bpf.loader import LoadedProgram, load_program
from .._bpf.ringbuf import Records, RingBuffer
from .._model.events import Event, EventMessage, encode_events
from .base import Emit, RingProbe
from .pids import CommNames, load_targets

log = logging.getLogger("ebpf_stream")

_PAGE = 4096


class TracingProbe(RingProbe):
    """Base of the families that stream records and read cumulative totals.

    Subclasses set ``source`` (the file under ``kernel/``), ``record`` (the
    ring's record layout), ``maps`` (the maps user space reads besides
    ``records``, ``counters`` and ``targets``) and ``programs`` (programs the
    loader must be told about: tracepoint programs are found by name, others
    such as perf event programs are not), and implement ``decode``,
    ``read_totals`` and ``forget``.  ``losses`` names the counters beyond
    RING_FULL that count events the program could not keep (a full table),
    so each new loss is reported as a warning when the totals are read.
    ``attach`` may be extended for hooks other than the program's tracepoints.
    """

    source: str
    record: np.dtype[np.void]
    maps: tuple[str, ...] = ()
    programs: ClassVar[dict[str, str]] = {}
    ring_full_counter = 0  # every family's `enum counter` starts with RING_FULL
    losses: ClassVar[dict[int, str]] = {}  # counter index -> what a loss there means

    def __init__(self, config: EbpfConfig, stats: Stats, *,
                 targets: Sequence[int] | None, follow_children: bool = False) -> None:
        self.config = config
        self._stats = stats
        self._targets = None if targets is None else tuple(targets)
        self._follow = follow_children and targets is not None
        super().__init__(config)
        self.wall_offset_ns = wall_clock_offset_ns()
        self.comm = CommNames()
        self._losses_seen: dict[int, int] = {}
        self._framed: np.dtype[np.void] | None = None  # set when the ring is made

    # -- what a family provides -------------------------------------------------

    def cflags(self) -> list[str]:
        """Build settings beyond the common ones; extend in subclasses."""
        return []

    @abc.abstractmethod
    def decode(self, records: np.ndarray) -> list[Event]:
        """The events of a batch of ring records."""

    @abc.abstractmethod
    def read_totals(self) -> list[Event]:
        """A snapshot of the cumulative totals in the maps."""

    @abc.abstractmethod
    def forget(self, pids: set[int]) -> None:
        """Delete the map entries of processes that have exited."""

    def attach(self, program: LoadedProgram) -> None:
        program.attach_tracepoints()

    # -- the Probe interface ------------------------------------------------

    def _common_cflags(self) -> list[str]:
        return [
            f"-DRINGBUF_PAGES={self.config.ring_buffer_bytes // _PAGE}",
            f"-DFILTER_PIDS={int(self._targets is not None)}",
            f"-DFOLLOW_CHILDREN={int(self._follow)}",
        ]

    async def open(self) -> None:
        names = ["records", "counters", *self.maps]
        if self._targets is not None:
            names.append("targets")
        self._program = await load_program(self.source, self.programs, names,
                                           [*self._common_cflags(), *self.cflags()])
        try:
            await anyio.lowlevel.checkpoint()  # cancelled while compiling: close, then raise
            load_targets(self._program, self._targets or ())
            self._ring = RingBuffer(self.map("records").fd, self.config.ring_buffer_bytes,
                                    self.record.itemsize)
            # A record as the ring frames it; the payload is nested so that its
            # field names cannot clash with the header's.
            self._framed = np.dtype({"names": ["payload"], "formats": [self.record],
                                     "offsets": [8], "itemsize": self._ring.stride})
            self.attach(self._program)
        except BaseException:
            self.close()
            raise

    def encode(self, frames: Records) -> EventMessage:
        assert self._framed is not None
        records = np.frombuffer(frames.frames, self._framed)["payload"]
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
