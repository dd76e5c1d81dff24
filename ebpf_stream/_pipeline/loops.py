"""Event-loop stalls: gathering what a stalled asyncio loop was doing.

The kernel reports, for each thread of a Python process that polls with
epoll, when its loop goes busy (returns from epoll) and when a busy period
lasted past the stall threshold.  Meanwhile it tags the thread's CPU samples
with the busy period, and reports each long sleep in it with the Python
stack the thread slept in.  ``LoopWatch`` collects those per busy period
and, when the stall record arrives (always after them, from the same ring),
hands back one ``Stall`` with its stacks.

Only asyncio loops are reported: a stall is one when the Python stack of
the wait that ended it runs through asyncio (or uvloop, which asyncio
runs); a stall without that stack (its process was not walked yet) is one
when its thread was seen waiting in asyncio before.  Other pollers (a selector in a
worker thread, a server library's own loop) are left alone.  Each stall
decides by its own record, so losing a thread's first record loses none of
its stalls; that is also why every busy period is gathered, not only
those of threads already known to be asyncio loops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .._model.batch import Stall, StallStack
from .._model.events import CpuSample, LoopBlocked, LoopStall, LoopThread, LoopTotals
from .._model.profile import Frame, RequestContext

_LOOP_MODULES = ("/asyncio/", "/uvloop/")
_EXITED_EVERY_S = 10.0  # how often threads of exited processes are looked for
_MAX_STACKS = 256  # distinct stacks kept per busy period

PythonFrames = Callable[[int, int], tuple[Frame, ...] | None]  # (pid, key) -> root-first frames


def _runs_asyncio(frames: tuple[Frame, ...]) -> bool:
    return any(marker in frame.module for frame in frames for marker in _LOOP_MODULES)


class _BusyPeriod:
    __slots__ = ("since", "stacks")

    def __init__(self, since: int) -> None:
        self.since = since
        # (frames, request) -> [samples, slept_ns]
        self.stacks: dict[tuple[tuple[Frame, ...], RequestContext | None], list[int]] = {}

    def add(self, frames: tuple[Frame, ...], context: RequestContext | None, samples: int,
            slept_ns: int) -> None:
        counts = self.stacks.get((frames, context))
        if counts is None:
            if len(self.stacks) >= _MAX_STACKS:
                return
            counts = self.stacks[frames, context] = [0, 0]
        counts[0] += samples
        counts[1] += slept_ns


class LoopWatch:
    """Turns the kernel's loop records into ``Stall`` reports for asyncio loops."""

    def __init__(self, python_frames: PythonFrames) -> None:
        self._python_frames = python_frames
        # (pid, tid) -> whether the thread was seen waiting in an asyncio loop
        self._loops: dict[tuple[int, int], bool] = {}
        self._busy: dict[tuple[int, int], _BusyPeriod] = {}
        # pid -> its threads in either table: a machine that starts Python processes
        # all day must not pay a pass over every loop ever seen per exec or exit.
        self._threads: dict[int, set[int]] = {}
        self._gone: set[int] = set()  # found exited at the last look
        self._next_look = time.monotonic() + _EXITED_EVERY_S

    def thread(self, event: LoopThread) -> None:
        self._waited(event.pid, event.tid, event.python_stack)

    def sample(self, sample: CpuSample, frames: tuple[Frame, ...],
               context: RequestContext | None = None) -> None:
        if sample.busy_since:
            self._period(sample.pid, sample.tid, sample.busy_since).add(frames, context, 1, 0)

    def blocked(self, event: LoopBlocked, context: RequestContext | None = None) -> None:
        frames = self._python_frames(event.pid, event.python_stack) or ()
        self._period(event.pid, event.tid, event.busy_since).add(frames, context, 0,
                                                                 event.duration_ns)

    def stall(self, event: LoopStall) -> Stall | None:
        """The stall of an asyncio loop with its stacks; None for other pollers."""
        thread = (event.pid, event.tid)
        period = self._busy.pop(thread, None)
        waited = self._waited(event.pid, event.tid, event.python_stack)
        if not (waited if waited is not None else self._loops.get(thread)):
            return None
        stacks = period.stacks if period is not None and period.since == event.busy_since else {}
        ranked = sorted(stacks.items(), key=lambda item: (-item[1][1], -item[1][0]))
        return Stall(event, tuple(StallStack(frames, samples, slept, context)
                                  for (frames, context), (samples, slept) in ranked))

    def keeps(self, totals: LoopTotals) -> bool:
        """Whether ``totals`` are an asyncio loop's."""
        return bool(self._loops.get((totals.pid, totals.tid)))

    def forget(self, pid: int) -> None:
        for tid in self._threads.pop(pid, ()):
            self._loops.pop((pid, tid), None)
            self._busy.pop((pid, tid), None)

    def forget_exited(self) -> None:
        """Every ``_EXITED_EVERY_S``, drop the processes found exited at this look
        and the one before (a stall's record may be read after its process exits)."""
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + _EXITED_EVERY_S
        gone = {pid for pid in self._threads if not os.path.exists(f"/proc/{pid}")}
        for pid in gone & self._gone:
            self.forget(pid)
        self._gone = gone - self._gone

    def _waited(self, pid: int, tid: int, python_stack: int) -> bool | None:
        """Whether the thread waited in an asyncio loop at ``python_stack``;
        None if that stack is unknown."""
        frames = self._python_frames(pid, python_stack) if python_stack else None
        if not frames:
            return None
        asyncio = _runs_asyncio(frames)
        self._loops[(pid, tid)] = self._loops.get((pid, tid), False) or asyncio
        self._threads.setdefault(pid, set()).add(tid)
        return asyncio

    def _period(self, pid: int, tid: int, since: int) -> _BusyPeriod:
        period = self._busy.get((pid, tid))
        if period is None or period.since != since:
            period = self._busy[(pid, tid)] = _BusyPeriod(since)
            self._threads.setdefault(pid, set()).add(tid)
        return period
