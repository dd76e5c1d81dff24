"""The probe boundary: one kernel program and the event stream it feeds.

A probe family owns its BPF program from load to detach and turns what the
kernel records into encoded event messages.  The engine only opens, runs and
closes probes, so new families plug in without touching it.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import ClassVar

from .._bpf import BpfMap
from .._events import EventMessage
from .._loader import LoadedProgram
from .._ringbuf import RingBuffer

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
    program counts records the ring had no room for.
    """

    ring_full_counter: ClassVar[int]

    def __init__(self) -> None:
        self._program: LoadedProgram | None = None
        self._ring: RingBuffer | None = None

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
