"""The probe boundary: one kernel program and the event stream it feeds.

A probe family owns its BPF program from load to detach and turns what the
kernel records into encoded event messages.  The engine only opens, runs and
closes probes, so new families plug in without touching it.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import ClassVar

import numpy as np

from .._bpf import BpfMap
from .._config import EbpfConfig
from .._events import EventMessage
from .._loader import LoadedProgram
from .._ringbuf import RingBuffer, drain_forever

Emit = Callable[[EventMessage], Awaitable[None]]


class Probe(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> None:
        """Compile, load and attach.  Leaves nothing attached if it fails."""

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

    ``ring_full_counter`` is the index of the per-CPU counter in which the
    program counts records the ring had no room for; ``encode`` turns a
    batch of ring records into one message.
    """

    ring_full_counter: ClassVar[int]

    def __init__(self, config: EbpfConfig) -> None:
        self._ring_latency_s = min(1.0, config.export_interval_s / 4)  # well inside an interval
        self._program: LoadedProgram | None = None
        self._ring: RingBuffer | None = None

    @abc.abstractmethod
    def encode(self, records: np.ndarray) -> EventMessage:
        """The message of one batch of ring records."""

    async def read_ring(self, emit: Emit) -> None:
        """Emit the ring's records as they arrive, until cancelled."""
        assert self._ring is not None

        async def on_batch(records: np.ndarray) -> None:
            await emit(self.encode(records))

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
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._program is not None:
            program, self._program = self._program, None
            program.close()
