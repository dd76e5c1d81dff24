"""The probe boundary: one kernel program and the event stream it feeds.

A probe family owns its BPF program from load to detach and turns what the
kernel records into encoded event messages.  The engine only opens, runs and
closes probes, so new families plug in without touching it.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar

import anyio
import anyio.lowlevel

from .._base.clock import ring_latency_s, wall_clock_offset_ns
from .._base.config import EbpfConfig
from .._base.stats import Stats
from .._bpf.loader import LoadedProgram, load_program
from .._bpf.ringbuf import Records, RingBuffer, drain_forever
from .._bpf.syscalls import BpfMap
from .._model.events import Event, EventMessage, encode_events
from .pids import CommNames, load_targets

Emit = Callable[[EventMessage], Awaitable[None]]
_PAGE = 4096


class Probe(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> None:
        """Compile and load, ready to record.  Leaves nothing loaded if it fails."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the kernel recording.  Leaves nothing loaded if it fails.

        Apart from ``open``, so that a run starts its probes together once
        all have loaded, and its readers at once: what a probe records
        before its reader runs waits in its ring (and the CPU probe's stack
        maps fill, since only the reader switches them).
        """

    @abc.abstractmethod
    async def run(self, emit: Emit) -> None:
        """Read the kernel's records and ``emit`` them until cancelled."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the kernel from recording more; what it recorded stays readable."""

    @abc.abstractmethod
    async def drain(self, emit: Emit) -> None:
        """Emit whatever the kernel recorded but ``run`` has not read yet."""

    @abc.abstractmethod
    def close(self) -> None:
        """Detach and close every fd.  Idempotent."""

    @abc.abstractmethod
    def kernel_drops(self) -> int:
        """Records the kernel could not store (ring buffer full)."""

    @abc.abstractmethod
    def program_fds(self) -> list[int]: ...

    @abc.abstractmethod
    def map_fds(self) -> list[int]: ...


class RingProbe(Probe):
    """A probe that owns one loaded program and reads one ring buffer of its.

    ``open`` is the same for every family: build with the common settings
    and the family's ``cflags``, load ``source`` with its ``programs`` and
    maps, fill the ``targets`` filter, map the ring, then ``prepare``;
    ``start`` then ``attach``es.  On any failure, or a cancellation during
    the compile, everything is closed again.  A family says what differs:
    its source, build settings, maps, programs, what it prepares, how it
    attaches, and how ``encode`` turns a batch of ring
    records into one message.  ``ring_full_counter`` is the index of the
    per-CPU counter in which the program counts records the ring had no
    room for.

    ``targets`` are the thread-group ids to watch; ``None`` watches every
    process.  With ``follow_children`` the targets' descendants are watched
    too, from their fork on.

    A probe whose program also aggregates in maps overrides ``read_totals``
    and ``forget`` and runs ``read_ring_and_totals``: the totals are read
    half an export interval out of phase with the batcher, so each batch
    gets one fresh snapshot, and they are cumulative, so a snapshot that is
    lost or late costs nothing.
    """

    source: ClassVar[str]  # the file under kernel/
    ring_map: ClassVar[str]  # the ring buffer map
    # Programs loaded only once ``prepare`` calls ``LoadedProgram.load_rest``.
    later: ClassVar[frozenset[str]] = frozenset()
    ring_full_counter: ClassVar[int]

    def __init__(self, config: EbpfConfig, stats: Stats, *,
                 targets: Sequence[int] | None, follow_children: bool = False) -> None:
        self.config = config
        self._stats = stats
        self._targets = None if targets is None else tuple(targets)
        self._follow = follow_children and targets is not None
        self._ring_latency_s = ring_latency_s(config)
        self._totals_interval_s = config.export_interval_s
        self.wall_offset_ns = wall_clock_offset_ns()  # CLOCK_MONOTONIC -> wall clock
        self.comm = CommNames()
        self._program: LoadedProgram | None = None
        self._ring: RingBuffer | None = None
        self._ended: set[int] = set()  # pids found gone at the last read of the totals

    # -- what a family provides -------------------------------------------------

    @property
    @abc.abstractmethod
    def record_size(self) -> int:
        """Bytes of one ring record's payload (the program's ``sizeof``)."""

    def cflags(self) -> list[str]:
        """Build settings beyond the common ones."""
        return []

    def map_names(self) -> list[str]:
        """The maps user space reads besides the ring, ``counters`` and ``targets``."""
        return []

    def programs(self) -> dict[str, str]:
        """Programs the loader must be told about, by bcc program type: tracepoint
        programs are found by name, others such as perf event programs are not."""
        return {}

    async def prepare(self, program: LoadedProgram) -> None:
        """What must be ready before the kernel records; by default, nothing."""

    def attach(self, program: LoadedProgram) -> None:
        """Start the kernel recording; by default, attach the program's tracepoints."""
        program.attach_tracepoints()

    @abc.abstractmethod
    def encode(self, records: Records) -> EventMessage:
        """The message of one batch of ring records."""

    # -- opening ----------------------------------------------------------------

    async def open(self) -> None:
        names = [self.ring_map, "counters", *self.map_names()]
        if self._targets is not None:
            names.append("targets")
        cflags = [f"-DRINGBUF_PAGES={self.config.ring_buffer_bytes // _PAGE}",
                  f"-DFILTER_PIDS={int(self._targets is not None)}",
                  f"-DFOLLOW_CHILDREN={int(self._follow)}", *self.cflags()]
        self._program = await load_program(self.source, self.programs(), names, cflags,
                                           later=self.later)
        try:
            await anyio.lowlevel.checkpoint()  # cancelled while compiling: close, then raise
            load_targets(self._program, self._targets or ())
            self._ring = RingBuffer(self.map(self.ring_map).fd, self.config.ring_buffer_bytes,
                                    self.record_size)
            await self.prepare(self._program)
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        assert self._program is not None, "opened first"
        try:
            self.attach(self._program)
        except BaseException:
            self.close()
            raise

    # -- reading ----------------------------------------------------------------

    def read_message(self, records: Records, complete_ns: int | None) -> EventMessage | None:
        """The message of one read of the ring, None for none.

        ``complete_ns`` (CLOCK_MONOTONIC) is set when the read caught up:
        every record reserved before it has now been read.  A read that
        found nothing sends nothing, unless a probe says otherwise.
        """
        return self.encode(records) if len(records) else None

    def read_totals(self) -> list[Event]:
        """A snapshot of the cumulative totals in the maps."""
        return []

    def forget(self, pids: set[int]) -> None:
        """Delete the map entries of processes that have exited."""

    async def read_ring_and_totals(self, emit: Emit) -> None:
        """``read_ring``, with a snapshot of the totals every export interval."""
        async def totals_every_interval() -> None:
            interval = self._totals_interval_s
            await anyio.sleep(interval / 2)
            while True:
                await emit(self.totals_message())
                await anyio.sleep(interval)

        async with anyio.create_task_group() as tg:
            tg.start_soon(totals_every_interval)
            await self.read_ring(emit)

    def totals_message(self) -> EventMessage:
        """The totals, then forget processes that were already gone last time.

        A process's final totals are therefore sent twice before its entries
        are deleted, so one lost snapshot cannot lose them.
        """
        totals = self.read_totals()
        if self._ended:
            self.forget(self._ended)
        pids = {getattr(t, "pid", 0) for t in totals}
        self._ended = {p for p in pids if p and not os.path.exists(f"/proc/{p}")}
        return encode_events(totals, 0)

    async def read_ring(self, emit: Emit) -> None:
        """Emit the ring's records as they arrive, until cancelled."""
        assert self._ring is not None

        async def on_batch(records: Records, complete_ns: int | None) -> None:
            message = self.read_message(records, complete_ns)
            if message is not None:
                await emit(message)

        await drain_forever(self._ring, on_batch, max_latency=self._ring_latency_s)

    async def drain_ring(self, emit: Emit) -> None:
        """Emit the records left in the ring."""
        if self._ring is None:
            return
        while len(records := self._ring.read_batch()):
            await emit(self.encode(records))

    def stop(self) -> None:
        if self._program is not None:
            self._program.detach()

    def map(self, name: str) -> BpfMap:
        assert self._program is not None
        return self._program.map(name)

    def kernel_drops(self) -> int:
        if self._program is None:
            return 0
        return self.map("counters").lookup_u64_sum(self.ring_full_counter)

    def program_fds(self) -> list[int]:
        return self._program.program_fds() if self._program else []

    def map_fds(self) -> list[int]:
        return self._program.map_fds() if self._program else []

    def close(self) -> None:
        ring, self._ring = self._ring, None
        program, self._program = self._program, None
        try:
            if ring is not None:
                ring.close()
        finally:  # the programs go, whatever became of the ring's mapping
            if program is not None:
                program.close()
