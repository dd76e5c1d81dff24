"""What one export interval hands to the exporters."""

from __future__ import annotations

import msgspec

from .events import LoopStall, OomKill, SlowSyscall, TcpConnection, Totals
from .profile import Frame, FrameKind, Profile, RequestContext


class SlowCall(msgspec.Struct, frozen=True, gc=False):
    """A slow syscall with its stack symbolized (root first, kernel frames last)."""

    call: SlowSyscall
    frames: tuple[Frame, ...]

    @property
    def pid(self) -> int:
        return self.call.pid

    @property
    def comm(self) -> str:
        return self.call.comm


class StallStack(msgspec.Struct, frozen=True, gc=False):
    """One stack seen while a loop stalled: how often it was sampled on the CPU,
    and how long the thread slept in it.

    ``frames`` are root first.  A stack slept in holds only Python frames:
    the kernel walks them as the thread goes to sleep.  ``context`` is the
    request the loop was running it for, None outside any.
    """

    frames: tuple[Frame, ...]
    samples: int = 0
    slept_ns: int = 0
    context: RequestContext | None = None


class Stall(msgspec.Struct, frozen=True, gc=False):
    """An asyncio loop that ran callbacks for ``stall.duration_ns`` without waiting,
    with the stacks seen meanwhile, heaviest first (slept time, then samples).
    """

    stall: LoopStall
    stacks: tuple[StallStack, ...]

    @property
    def pid(self) -> int:
        return self.stall.pid

    @property
    def comm(self) -> str:
        return self.stall.comm

    @property
    def culprit(self) -> Frame | None:
        """The code that kept the loop from waiting: the innermost named Python
        frame of the heaviest stack."""
        if not self.stacks:
            return None
        return next((f for f in reversed(self.stacks[0].frames)
                     if f.kind is FrameKind.PYTHON and f.line), None)

    @property
    def context(self) -> RequestContext | None:
        """The request that blocked the loop: the one whose stacks weigh most
        (slept time, then samples); None when no stack ran for a request."""
        weights: dict[RequestContext, tuple[int, int]] = {}
        for s in self.stacks:
            if s.context is not None:
                slept, samples = weights.get(s.context, (0, 0))
                weights[s.context] = (slept + s.slept_ns, samples + s.samples)
        return max(weights, key=weights.__getitem__, default=None)


TraceRecord = SlowCall | TcpConnection | OomKill | Stall
"""A discrete event as exporters see it: the kernel's record, with its stacks named
where it has any.  Each has the ``pid`` and ``comm`` of the process it is about."""


class Batch(msgspec.Struct, gc=False):
    """Everything one export interval collected, with the loss seen while collecting it.

    ``profile`` holds the CPU samples, and in ``profile.processes`` every
    process the batch mentions.  ``records`` are discrete events (slow
    syscalls, closed TCP connections, OOM kills, loop stalls), oldest first.  ``totals``
    are the latest cumulative counters per process (and per syscall) seen in
    the interval.

    ``dropped`` counts samples and records lost before this batch was built
    (kernel ring full, channel full, or over ``max_samples``), so an exporter
    can report how complete the batch is.
    """

    profile: Profile
    dropped: int = 0
    records: list[TraceRecord] = msgspec.field(default_factory=list)
    totals: list[Totals] = msgspec.field(default_factory=list)

    @property
    def sample_count(self) -> int:
        """CPU samples plus records: the unit of ``max_samples`` and of ``Stats``."""
        return self.profile.sample_count + len(self.records)

    @property
    def empty(self) -> bool:
        return not (self.sample_count or self.totals or self.dropped)
