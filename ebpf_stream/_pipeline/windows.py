"""Export windows: which interval a CPU sample belongs to, and when an interval may close.

Samples reach the batch stage some time after they were taken (the reader
drains the ring on a timer), so an interval closed by the clock when it
elapses would miss its last samples and hand them to the next one.  Instead
the run is cut into windows ``[start + k * interval, start + (k + 1) * interval)``
on the samples' own clock, each sample goes to the window its timestamp
falls in, and a window closes once the CPU probe's watermark (see
``Watermark``) says that every sample taken before its end has arrived.  So
every sample lies in its profile's window, and the windows of a run tile it
from the start of sampling to its stop.

A window no sample fell in is not sent alone: the next batch starts where
the last one ended, so the batches sent meet with no gap, unless records or
totals are waiting, which go with the next batch whatever it holds.
``max_samples`` may close a window early, split at the watermark: the part
before it is complete, the rest stays open.  Without a CPU probe there is
nothing to wait for, and windows close by the clock.  Should the watermark
not come (a reader that cannot keep up), a window closes by the clock after
a grace period; a sample that arrives after its window closed then goes to
the next batch, stamped with its start, the nearest time it may still carry.

A process not sampled in a batch has no profile in it; its next profile
reaches back to where its last one ended (see ``ProcessWindows``), so the
profiles of each process tile the run too.
"""

from __future__ import annotations

import logging
import os

from .._base.clock import ring_latency_s
from .._base.config import EbpfConfig
from .._model.profile import Profile

log = logging.getLogger("ebpf_stream")

# How much longer than a reader's drain period a window may wait for its watermark.
_GRACE_NS = 1_000_000_000


class Windows:
    """The open windows of a run and how far they are known complete.

    ``watermarked``: samples come from a CPU probe, whose watermarks say
    when a window may close; otherwise windows close by the clock.  Until
    the first watermark says when sampling began, ``start_ns`` (the clock
    when the batcher began) stands in for it.  ``closed_to_ns`` is where the
    next batch begins: the end of the last one.
    """

    def __init__(self, config: EbpfConfig, start_ns: int, *, watermarked: bool) -> None:
        self._period_ns = config.sample_period_ns
        self._interval_ns = max(1, round(config.export_interval_s * 1e9))
        self._grace_ns = round(ring_latency_s(config) * 1e9) + _GRACE_NS
        self._watermarked = watermarked
        self._start_ns = start_ns
        self._begun = not watermarked  # whether _start_ns is when sampling began
        self.closed_to_ns = start_ns
        self._complete_ns = start_ns  # every sample before this has arrived
        self.stopped = False
        # Grid index -> the samples of that window so far; each window's
        # start is set when it closes, to where the last batch ended.
        self._open: dict[int, Profile] = {}
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
                            "they go to the next one, stamped with its start")
            self.late += 1
            timestamp_ns = self.closed_to_ns
        self._latest_ns = max(self._latest_ns, timestamp_ns)
        index = self._index(timestamp_ns)
        window = self._open.get(index)
        if window is None:
            window = self._open[index] = Profile(
                self._period_ns, self._edge(index), self._edge(index + 1))
        return window, timestamp_ns

    def due_ns(self) -> int:
        """When, on the clock, the current window closes if no watermark closes it first."""
        first = min(self._open, default=None)
        if first is None:
            first = self._index(max(self.closed_to_ns, self._complete_ns))
        end = self._edge(first + 1)
        return end + self._grace_ns if self._watermarked else end

    def close(self, now_ns: int, *, idle: bool, empty: bool = False) -> list[Profile]:
        """The windows complete by ``now_ns``, oldest first.

        ``idle``: no message is waiting to be read, so a watermark overdue by
        the grace period is not merely queued, and the clock may close its
        window.  ``empty``: close the span up to the last complete window
        even if no sample fell in it (records or totals wait for it).
        """
        if not self._watermarked:
            self._complete_ns = max(self._complete_ns, now_ns)
        elif idle and not self.stopped and now_ns >= self.due_ns():
            self._complete_ns = max(self._complete_ns, self.due_ns() - self._grace_ns)
        closed = self._close_before(self._complete_ns)
        edge = self._edge(self._index(self._complete_ns))
        if empty and not closed and edge > self.closed_to_ns:
            closed.append(Profile(self._period_ns, self.closed_to_ns, edge))
            self.closed_to_ns = edge
        return closed

    def split(self, *, empty: bool = False, least: int = 1) -> list[Profile]:
        """Close the earliest open window early, at the watermark.

        Nothing closes if the watermark has not moved, nor if fewer than
        ``least`` samples are before it, unless ``empty`` (the early part
        carries records): a reader held up by a slow exporter moves the
        watermark a little at a time, and a batch per step would cost an
        export per handful of samples.
        """
        at = self._complete_ns
        if at <= self.closed_to_ns:
            return []
        closed = self._close_before(at)
        if closed:
            return closed
        first = min(self._open, default=None)
        window = self._open.get(first) if first is not None else None
        held = [*window, *window.off_cpu.values()] if window is not None else []
        if not empty and sum(t < at for s in held for t in s.timestamps_ns) < least:
            return []
        before = Profile(self._period_ns, self.closed_to_ns, at)
        if window is not None:
            before.processes.update(window.processes)
            for s in list(window):
                early = [t for t in s.timestamps_ns if t < at]
                if early:
                    before.add(s.pid, s.process, s.frames, len(early), early, s.context,
                               s.thread)
                    s.timestamps_ns = [t for t in s.timestamps_ns if t >= at]
                    s.count = len(s.timestamps_ns)
                    if not s.count:
                        del window.stacks[s.key]
            for s in list(window.off_cpu.values()):
                early = [i for i, t in enumerate(s.timestamps_ns) if t < at]
                if early:
                    waits = [s.waits_ns[i] for i in early]
                    before.add_off_cpu(s.pid, s.process, s.frames, sum(waits), len(early),
                                       [s.timestamps_ns[i] for i in early], s.context, waits,
                                       s.thread)
                    kept = [i for i, t in enumerate(s.timestamps_ns) if t >= at]
                    s.timestamps_ns = [s.timestamps_ns[i] for i in kept]
                    s.waits_ns = [s.waits_ns[i] for i in kept]
                    s.count, s.off_cpu_ns = len(kept), sum(s.waits_ns)
                    if not s.count:
                        del window.off_cpu[s.key]
        self.closed_to_ns = at
        return [before]

    def finish(self, now_ns: int) -> list[Profile]:
        """Close every window; the last ends when sampling stopped (or at ``now_ns``)."""
        end = self._complete_ns if self.stopped else max(self._complete_ns, now_ns)
        end = max(end, self.closed_to_ns, self._latest_ns + 1)
        closed = self._close_before(end)
        if end > self.closed_to_ns or not closed:  # one at least, for what has no window
            window: Profile | None = self._open.pop(self._index(end), None)
            last = window or Profile(self._period_ns, self.closed_to_ns, end)
            last.start_ns, last.end_ns = self.closed_to_ns, end
            closed.append(last)
            self.closed_to_ns = end
        return closed

    def _close_before(self, complete_ns: int) -> list[Profile]:
        """Close the windows with samples that end at or before ``complete_ns``, oldest first.

        Windows that complete together (the batcher was held up, by a slow
        exporter say) go as one: one export per window would let the backlog
        grow.  Together they hold no more than ``max_samples``, as all the
        open windows do.
        """
        closed: list[Profile] = []
        while self._open:
            first = min(self._open)
            if self._edge(first + 1) > complete_ns:
                break
            window = self._open.pop(first)
            if not (window.stacks or window.off_cpu):  # a split took all: its span joins the next
                continue
            window.start_ns = self.closed_to_ns
            self.closed_to_ns = window.end_ns
            if closed:
                closed[-1].merge(window)
            else:
                closed.append(window)
        return closed

    def _index(self, t: int) -> int:
        return (t - self._start_ns) // self._interval_ns

    def _edge(self, index: int) -> int:
        return self._start_ns + index * self._interval_ns


class ProcessWindows:
    """Where each process's next profile begins: where its last one ended.

    So a process's profiles meet end to end even across batches it had no
    samples in, and its samples over its window's duration stay its CPU
    rate.  A process's first profile begins with the run's first batch.
    """

    def __init__(self) -> None:
        self._run_start_ns: int | None = None
        self._ends: dict[int, int] = {}  # pid -> where its last profile ended

    def stamp(self, profile: Profile) -> None:
        """Set where each sampled process's window in ``profile`` begins."""
        if self._run_start_ns is None:
            self._run_start_ns = profile.start_ns
        sampled = {s.pid for s in profile}
        for pid in sampled:
            start = self._ends.get(pid, self._run_start_ns)
            if start < profile.start_ns:
                profile.process_start_ns[pid] = start
            self._ends[pid] = profile.end_ns
        for pid in [p for p in self._ends if p not in sampled]:
            if not os.path.exists(f"/proc/{pid}"):  # its last profile has gone
                del self._ends[pid]
