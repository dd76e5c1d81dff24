"""Export windows: which interval a CPU sample belongs to, and when an interval may close.

Samples reach the batcher some time after they were taken (the reader
drains the ring on a timer), so an interval closed by the clock when it
elapses would miss its last samples and hand them to the next one.  Instead
the run is cut into windows ``[start + k * interval, start + (k + 1) * interval)``
on the samples' own clock, each sample goes to the window its timestamp
falls in, and a window closes once the CPU probe's watermark (see
``Watermark``) says that every sample taken before its end has arrived.  So
every sample lies in its profile's window, and the windows of a run tile it
from the start of sampling to its stop.

``max_samples`` may close a window early, split at the watermark: the part
before it is complete, the rest stays open.  Without a CPU probe there is
nothing to wait for, and windows close by the clock.  Should the watermark
not come (a reader that cannot keep up), a window closes by the clock after
a grace period; a sample that arrives after its window closed then goes to
the earliest open window, stamped with that window's start, the nearest time
it may still carry.
"""

from __future__ import annotations

import logging
import time

from ._config import EbpfConfig
from ._profile import Profile

log = logging.getLogger("ebpf_stream")

# How much longer than a reader's drain period a window may wait for its watermark.
_GRACE_NS = 1_000_000_000


def wall_clock_offset_ns() -> int:
    """Add to a ``bpf_ktime_get_ns`` (CLOCK_MONOTONIC) time to get wall-clock ns."""
    return time.time_ns() - time.monotonic_ns()


def ring_latency_s(config: EbpfConfig) -> float:
    """The longest a ring reader leaves records unread: well inside an interval."""
    return min(1.0, config.export_interval_s / 4)


class Clock:
    """CLOCK_MONOTONIC as wall-clock ns, with one offset taken at creation.

    The probes stamp samples the same way, so a step of the wall clock
    during a run moves neither samples nor windows.
    """

    def __init__(self) -> None:
        self.offset_ns = wall_clock_offset_ns()

    def now(self) -> int:
        return time.monotonic_ns() + self.offset_ns


class Windows:
    """The open windows of a run and how far they are known complete.

    ``watermarked``: samples come from a CPU probe, whose watermarks say
    when a window may close; otherwise windows close by the clock.  Until
    the first watermark says when sampling began, ``start_ns`` (the clock
    when the batcher began) stands in for it.
    """

    def __init__(self, config: EbpfConfig, start_ns: int, *, watermarked: bool) -> None:
        self._period_ns = config.sample_period_ns
        self._interval_ns = max(1, round(config.export_interval_s * 1e9))
        self._grace_ns = round(ring_latency_s(config) * 1e9) + _GRACE_NS
        self._watermarked = watermarked
        self._start_ns = start_ns
        self._begun = not watermarked  # whether _start_ns is when sampling began
        self.closed_to_ns = start_ns  # where the earliest open window begins
        self._complete_ns = start_ns  # every sample before this has arrived
        self.stopped = False
        self._open: dict[int, Profile] = {}  # grid index -> its window's samples so far
        self._latest_ns = start_ns  # the latest sample time routed
        self.late = 0  # samples that came after their window had closed

    def begin(self, started_ns: int) -> None:
        """Sampling began at ``started_ns``: the first window starts there."""
        if self._begun:
            return
        self._begun = True
        if not self._open and self.closed_to_ns == self._start_ns:
            self._start_ns = self.closed_to_ns = self._complete_ns = started_ns
            self._latest_ns = started_ns

    def advance(self, complete_ns: int, *, stopped: bool = False) -> None:
        """Every sample taken before ``complete_ns`` has arrived (and none follows if stopped)."""
        self._complete_ns = max(self._complete_ns, complete_ns)
        self.stopped = self.stopped or stopped

    def window(self, timestamp_ns: int) -> tuple[Profile, int]:
        """The open window a sample taken at ``timestamp_ns`` goes to, and the time it carries."""
        if timestamp_ns < self.closed_to_ns:
            if not self.late:
                log.warning("CPU samples arrived after their export window had closed; "
                            "they are moved to the start of the next window")
            self.late += 1
            timestamp_ns = self.closed_to_ns
        self._latest_ns = max(self._latest_ns, timestamp_ns)
        index = self._index(timestamp_ns)
        window = self._open.get(index)
        if window is None:
            window = self._open[index] = Profile(
                self._period_ns, max(self.closed_to_ns, self._edge(index)), self._edge(index + 1))
        return window, timestamp_ns

    def due_ns(self) -> int:
        """When, on the clock, the earliest open window closes if no watermark closes it first."""
        end = self._edge(self._index(self.closed_to_ns) + 1)
        return end + self._grace_ns if self._watermarked else end

    def close(self, now_ns: int, *, idle: bool) -> list[Profile]:
        """The windows complete by ``now_ns``, oldest first.

        ``idle``: no message is waiting to be read, so a watermark overdue by
        the grace period is not merely queued, and the clock may close its window.
        """
        if not self._watermarked:
            self._complete_ns = max(self._complete_ns, now_ns)
        elif idle and not self.stopped and now_ns >= self.due_ns():
            self._complete_ns = max(self._complete_ns, self.due_ns() - self._grace_ns)
        return self._close_before(self._complete_ns)

    def split(self) -> list[Profile]:
        """Close the earliest open window early, at the watermark (nothing if it has not moved)."""
        at = self._complete_ns
        if at <= self.closed_to_ns:
            return []
        index = self._index(self.closed_to_ns)
        if at >= self._edge(index + 1):
            return self._close_before(at)
        window = self._open.get(index)
        before = Profile(self._period_ns, self.closed_to_ns, at)
        if window is not None:
            before.processes.update(window.processes)
            for s in list(window):
                early = [t for t in s.timestamps_ns if t < at]
                if early:
                    before.add(s.pid, s.process, s.frames, len(early), early)
                    s.timestamps_ns = [t for t in s.timestamps_ns if t >= at]
                    s.count = len(s.timestamps_ns)
                    if not s.count:
                        del window.stacks[s.pid, s.process, s.frames]
            window.start_ns = at
        self.closed_to_ns = at
        return [before]

    def finish(self, now_ns: int) -> list[Profile]:
        """Close every window; the last ends when sampling stopped (or at ``now_ns``)."""
        end = self._complete_ns if self.stopped else max(self._complete_ns, now_ns)
        end = max(end, self.closed_to_ns, self._latest_ns + 1)
        closed = self._close_before(end)
        if end > self.closed_to_ns or not closed:  # one at least, for what has no window
            window: Profile | None = self._open.pop(self._index(self.closed_to_ns), None)
            last = window or Profile(self._period_ns, self.closed_to_ns, end)
            last.end_ns = end
            closed.append(last)
            self.closed_to_ns = end
        return closed

    def _close_before(self, complete_ns: int) -> list[Profile]:
        """Close the windows that end at or before ``complete_ns``.

        Windows no sample fell in are passed over: there is nothing to send for them.
        """
        closed: list[Profile] = []
        while True:
            index = self._index(self.closed_to_ns)
            end = self._edge(index + 1)
            if end > complete_ns:
                return closed
            window: Profile | None = self._open.pop(index, None)
            closed.append(window or Profile(self._period_ns, self.closed_to_ns, end))
            following = min(self._open, default=None)
            last = self._index(complete_ns)
            self.closed_to_ns = self._edge(last if following is None else min(following, last))
            if self.closed_to_ns < end:
                self.closed_to_ns = end

    def _index(self, t: int) -> int:
        return (t - self._start_ns) // self._interval_ns

    def _edge(self, index: int) -> int:
        return self._start_ns + index * self._interval_ns
