"""When the host's event loop is busy: the fallback's view of what the kernel's loop hooks see.

A loop is busy from the moment it stops waiting for I/O until it waits again;
a busy period past the stall threshold is a stall.  An asyncio selector loop
says so exactly: its selector is wrapped, so each wait is timed where it
begins and ends, at the cost of two clock reads per loop iteration and
nothing per callback.  Other loops (uvloop waits inside libuv) are polled
from the sampler thread instead: each tick reads which system call the loop
thread is in, and how many reads it has made.  A loop found in its wait, or
found to have read since the last tick, went through its poll phase in
between: a loop serving requests reads between callbacks, and a stalled one
does not.  (Writes prove nothing: a signal's handler writes to the loop's
wakeup fd wherever the loop is.)  A loop found busy at two looks was busy in
between only if it stayed in one blocking call or on a CPU for most of the
time; otherwise (timers alone can wake a loop that never reads) its period
ends at the first look.  So a period's start and end are known to a tick.
"""

from __future__ import annotations

import asyncio
import collections
import selectors
import time
from typing import Any, Final

from .calls import LOOP_WAITS, RUNNING, Calls
from .stacks import cpu_ns

_LOG2_BUCKETS: Final = 32  # as LOG2_BUCKETS in kernel/common.h


class BusyPeriods:
    """One loop thread's busy periods: the current one's start, the stalls ended
    and not yet taken, and the cumulative histogram the kernel would keep.
    ``polled``: known only as often as ``poll`` is called."""

    polled = False

    def __init__(self, tid: int, stall_ns: int) -> None:
        self.tid = tid
        self.since = 0  # CLOCK_MONOTONIC when the loop stopped waiting; 0 while it waits
        self.count = 0
        self.total_ns = 0
        self.buckets = [0] * _LOG2_BUCKETS
        # (busy since, duration, ended): appended by the loop, taken by the sampler.
        self.stalls: collections.deque[tuple[int, int, int]] = collections.deque()
        self._stall_ns = stall_ns

    def waiting(self, now: int) -> None:
        since, self.since = self.since, 0
        if since:
            busy = now - since
            self.count += 1
            self.total_ns += busy
            self.buckets[min(max(busy.bit_length() - 1, 0), _LOG2_BUCKETS - 1)] += 1
            if busy >= self._stall_ns:
                self.stalls.append((since, busy, now))

    def running(self, now: int) -> None:
        self.since = now

    def poll(self, now: int, calls: Calls) -> None:
        """Nothing to do for a loop that reports its own waits."""

    def close(self) -> None:
        """Stop watching the loop."""


class _TimedSelector:
    """The loop's selector, with each ``select`` marking the end and start of busy periods."""

    __slots__ = ("_periods", "_selector")

    def __init__(self, selector: selectors.BaseSelector, periods: BusyPeriods) -> None:
        self._selector = selector
        self._periods = periods

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        periods = self._periods
        periods.waiting(time.monotonic_ns())
        try:
            return self._selector.select(timeout)
        finally:
            periods.running(time.monotonic_ns())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


class _SelectorPeriods(BusyPeriods):
    def __init__(self, tid: int, stall_ns: int, loop: asyncio.BaseEventLoop) -> None:
        super().__init__(tid, stall_ns)
        self._loop = loop
        self._timed = _TimedSelector(loop._selector, self)  # type: ignore[attr-defined]
        self.running(time.monotonic_ns())  # the loop is running this code
        loop._selector = self._timed  # type: ignore[attr-defined]

    def close(self) -> None:
        if getattr(self._loop, "_selector", None) is self._timed:
            self._loop._selector = self._timed._selector  # type: ignore[attr-defined]


class _PolledPeriods(BusyPeriods):
    polled = True

    def __init__(self, tid: int, stall_ns: int) -> None:
        super().__init__(tid, stall_ns)
        self._io = f"/proc/self/task/{tid}/io"
        self._reads = b""  # the io file's syscr line at the last tick
        self._last: tuple[int, tuple[int, int], int] | None = None  # time, call, CPU
        self.running(time.monotonic_ns())

    def poll(self, now: int, calls: Calls) -> None:
        # Anywhere but in its wait, the loop is busy: running Python (so
        # waiting for the GIL the sampler holds as it looks), or blocked in
        # a call a callback made.
        call = calls.now(self.tid)
        cpu = cpu_ns(self.tid)
        if call is None or cpu is None:
            return
        try:
            with open(self._io, "rb") as f:
                reads = f.read().splitlines()[2]
        except (OSError, IndexError):
            return
        did_read, self._reads = reads != self._reads, reads
        last, self._last = self._last, (now, call, cpu)
        waits = call[0] in LOOP_WAITS
        if waits or did_read:
            self.waiting(now)
        elif self.since and last is not None and not self._stayed_busy(last, now, call, cpu, calls):
            # Busy at both looks, but nothing says it was in between: a loop
            # that neither reads nor stays in one call may have waited (timers
            # alone wake it), so the last period ends at the last look.
            self.waiting(last[0])
        if not waits and not self.since:
            self.running(now)

    @staticmethod
    def _stayed_busy(last: tuple[int, tuple[int, int], int], now: int,
                     call: tuple[int, int], cpu: int, calls: Calls) -> bool:
        """Whether the loop was busy all the way from the ``last`` look: still in
        the same blocking call, or on a CPU for most of the time."""
        then, last_call, last_cpu = last
        blocked = call[0] != RUNNING and not calls.wants_gil(call)  # (not in its wait)
        return (blocked and call == last_call) or 2 * (cpu - last_cpu) >= now - then


def watch(loop: asyncio.AbstractEventLoop, tid: int, stall_ns: int) -> BusyPeriods:
    """Watch ``loop``, run by thread ``tid`` (the caller's), for busy periods."""
    if isinstance(loop, asyncio.BaseEventLoop) and isinstance(
            getattr(loop, "_selector", None), selectors.BaseSelector):
        return _SelectorPeriods(tid, stall_ns, loop)
    return _PolledPeriods(tid, stall_ns)
