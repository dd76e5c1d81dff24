"""The probe stage: opening a run's probes, and reading them into the events channel.

Each probe has its own reader task.  Stopping cancels the wait for the
rings, never a message half-sent; the reader then detaches its probe and
drains what the rings still hold.  The last reader to end closes the
channel, which is how the stages below learn that no sample will follow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import anyio

from .._base.overhead import run_sync
from .._model.events import EventMessage
from .._probes.base import Probe
from .channels import Channel


async def open_probes(probes: Sequence[Probe], meanwhile: Callable[[], None]) -> None:
    """Open the probes side by side (each compiles in its own worker process),
    and run ``meanwhile`` in a worker thread while they open; then start them.

    Started only once all have opened, so that none records for long
    before the readers run.  If any fails, every one is closed and the
    first failure is raised alone.
    """
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_sync, meanwhile)
            for probe in probes:
                tg.start_soon(probe.open)
        for probe in probes:
            probe.start()
    except BaseException as exc:
        for probe in probes:
            probe.close()
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) >= 1:
            exc = exc.exceptions[0]
        raise exc from None


class Readers:
    """The reader tasks of one run's probes, all feeding ``events``."""

    def __init__(self, probes: Sequence[Probe], events: Channel[EventMessage]) -> None:
        self._events = events
        self._left = len(probes)  # readers not yet ended
        self._reading: list[anyio.CancelScope] = []  # one per reader
        self._sending: set[anyio.CancelScope] = set()  # sends in progress
        self._stopped = False
        self._deadline = math.inf

    def stop(self) -> None:
        """Stop waiting for the rings: each reader drains its probe and ends."""
        self._stopped = True
        for scope in self._reading:
            scope.cancel()

    def set_deadline(self, deadline: float) -> None:
        """Let no send, not even one under way, outlast ``deadline`` (``anyio.current_time``)."""
        self._deadline = deadline
        for scope in self._sending:
            scope.deadline = deadline

    async def read(self, probe: Probe) -> None:
        """Read ``probe`` until stopped, then detach it and send what it still holds."""
        reading = anyio.CancelScope()
        self._reading.append(reading)
        if self._stopped:
            reading.cancel()

        async def emit(message: EventMessage) -> None:
            # Stopping cancels the wait for the ring, never a message half-sent;
            # only the shutdown deadline may interrupt a send.
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = self._deadline
                self._sending.add(scope)
                try:
                    await self._events.send(message)
                finally:
                    self._sending.discard(scope)

        try:
            with reading:
                await probe.run(emit)
            # Detaching a tracepoint waits out an RCU grace period (tens of
            # ms each): never on the host's event loop.
            await anyio.to_thread.run_sync(probe.stop)
            await probe.drain(emit)
        finally:
            self._left -= 1
            if not self._left:
                self._events.close()
