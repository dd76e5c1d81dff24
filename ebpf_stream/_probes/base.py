"""The probe boundary: one kernel program and the event stream it feeds.

A probe family owns its BPF program from load to detach and turns what the
kernel records into encoded event messages.  The engine only opens, runs and
closes probes, so new families plug in without touching it.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable

from .._events import EventMessage

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
