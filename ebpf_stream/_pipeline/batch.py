"""The batch stage: symbolized samples into a ``Batch`` per export window.

Each sample goes to the export window its timestamp falls in, and a batch
flushes when its window is complete (see ``windows``), or early when the
samples held reach ``max_samples``; samples beyond that are dropped and
counted, which caps both memory and export size per interval.  Records
(slow syscalls, connections, OOM kills, stalls) count as samples and go
with the next batch to flush.  Cumulative totals are kept as the latest
snapshot per key, so their size is bounded by the kernel maps they are read
from, not by the interval.

The symbolize stage (``symbolize.py``) runs inside this one: ``add`` pulls
its items message by message, in the same task, rather than through a
channel between two tasks.  That way a sample over ``max_samples`` is
dropped before it costs a symbolization (the symbolize stage asks
``_admit`` first), and whether more messages are waiting, which decides
when a window may close (``Windows.close``), is read from the one channel
the samples queue in.  A channel between the stages would lose both, and
hold symbolized samples, far larger than the encoded messages.

With native stacks (``offload``), each message is symbolized and batched in
a worker thread: the first sight of a binary reads its symbol table, which
can take the host's loop for hundreds of milliseconds.  The stage counts
into its own ``Stats`` there, handed over to the run's on the loop, where
the other stages count.  Python stacks alone are named from code objects
already read, cheaper than the hop to a thread.
"""

from __future__ import annotations

import math

import anyio
import anyio.lowlevel

from .._base.clock import Clock
from .._base.config import EbpfConfig
from .._base.overhead import run_sync
from .._base.stats import Stats
from .._model.batch import Batch, TraceRecord
from .._model.events import (
    EventMessage,
    LatestTotals,
    Totals,
    Watermark,
)
from .._model.profile import ProcessInfo, Profile
from .._symbols import Symbolizer
from .channels import Channel
from .symbolize import Sample, SamplingBegan, Symbolize
from .windows import ProcessWindows, Windows


class Batcher:
    """The batch stage: consumes event messages, has them symbolized, and emits
    one ``Batch`` per interval (or per ``max_samples``)."""

    def __init__(self, config: EbpfConfig, symbolizer: Symbolizer, stats: Stats, *,
                 offload: bool = False) -> None:
        self._offload = offload
        self._config = config
        self._symbolizer = symbolizer
        self._stats = stats
        self._counts = Stats()  # counted off the loop, not yet in ``stats``
        self._symbolize = Symbolize(config, symbolizer, self._counts)
        self._clock = Clock()
        self._windows = Windows(config, self._clock.now(), watermarked=config.cpu_profiling)
        self._process_windows = ProcessWindows()
        self._processes: dict[int, ProcessInfo] = {}  # described since the last batch
        self._records: list[TraceRecord] = []
        self._totals = LatestTotals()
        self._held = 0  # samples in open windows, and records
        self._dropped = 0
        self._early: list[Batch] = []  # closed early by max_samples, not yet handed out

    def add(self, message: EventMessage) -> None:
        """Symbolize one message's events and put them in their windows."""
        self._add(message)
        self._hand_over_counts()

    def _hand_over_counts(self) -> None:
        self._stats.add(self._counts)
        self._counts.clear()

    def _add(self, message: EventMessage) -> None:
        for item in self._symbolize.items(message, self._admit):
            if isinstance(item, SamplingBegan):
                self._windows.begin(item.started_ns)
            elif isinstance(item, Watermark):
                self._windows.advance(item.complete_ns, stopped=item.stopped)
            elif isinstance(item, Sample):
                info = self._process(item.pid, item.comm)
                window, at = self._windows.window(item.timestamp_ns)
                window.processes.setdefault(item.pid, info)
                if item.off_cpu_ns:
                    window.add_off_cpu(item.pid, info.name, item.frames, item.off_cpu_ns, 1,
                                       (at,), item.context, (item.off_cpu_ns,), item.thread)
                else:
                    window.add(item.pid, info.name, item.frames, 1, (at,), item.context,
                               item.thread)
            elif isinstance(item, Totals):
                self._process(item.pid, item.comm)
                self._totals.update([item])
            else:
                self._process(item.pid, item.comm)
                self._records.append(item)

    def _admit(self) -> bool:
        """Whether one more sample or record fits under ``max_samples``; counts it
        held if so, dropped if not."""
        if self.full:
            # What is complete can go now; only what is not yet must wait.
            self._early += self._split()
        if self.full:
            self._dropped += 1
            self._counts.dropped_user += 1
            return False
        self._held += 1
        return True

    def _process(self, pid: int, comm: str) -> ProcessInfo:
        """The description of ``pid``, read from /proc the first time it is seen in a batch."""
        info = self._processes.get(pid)
        if info is None:
            info = self._processes[pid] = (
                self._symbolizer.process_info(pid) or ProcessInfo(pid, comm))
        return info

    def _batch(self, profile: Profile) -> Batch:
        """The batch of a closed window, with every record and total not yet sent."""
        profile.processes = {**self._processes, **profile.processes}
        self._process_windows.stamp(profile)
        batch = Batch(profile, self._dropped, self._records, self._totals.all())
        self._processes, self._records, self._totals = {}, [], LatestTotals()
        self._dropped = 0
        self._held -= batch.sample_count
        return batch

    def _split(self) -> list[Batch]:
        """The complete part of the earliest window, closed early to make room."""
        # At least half a batch, so that batches stay large when the reader lags.
        least = max(1, self._config.max_samples // 2)
        return [self._batch(p) for p in
                self._windows.split(empty=bool(self._records), least=least)]

    @property
    def full(self) -> bool:
        return self._held >= self._config.max_samples

    def ready(self, *, idle: bool = True) -> list[Batch]:
        """The batches of the windows complete now, and of a full window's complete part.

        ``idle``: no message is waiting (see ``Windows.close``).
        """
        batches, self._early = self._early, []
        waiting = bool(self._records or self._totals or self._dropped)
        closing = self._windows.close(self._clock.now(), idle=idle, empty=waiting)
        batches += [self._batch(p) for p in closing]
        if self.full:
            batches += self._split()
        return batches

    def finish(self) -> list[Batch]:
        """The batches of every window left, the last ending when sampling stopped."""
        batches, self._early = self._early, []
        return batches + [self._batch(p) for p in self._windows.finish(self._clock.now())]

    async def run(self, source: Channel[EventMessage], sink: Channel[Batch]) -> None:
        """Batch until ``source`` closes, then flush the last batches and close ``sink``."""
        try:
            while True:
                message = None
                # A message waiting is taken however late the windows are: a
                # zero timeout would cancel the receive before it looked, and
                # windows that wait for what is queued would never close.
                wait_s = math.inf if source.queued else (
                    max(0, self._windows.due_ns() - self._clock.now()) / 1e9)
                with anyio.move_on_after(wait_s):
                    try:
                        message = await source.receive()
                    except anyio.EndOfStream:
                        break
                if message is not None:
                    if self._offload:
                        await run_sync(self._add, message)
                    else:
                        self._add(message)
                    self._hand_over_counts()
                await self._send(self.ready(idle=not source.queued), sink)
            await self._send(self.finish(), sink)
        finally:
            sink.close()

    @staticmethod
    async def _send(batches: list[Batch], sink: Channel[Batch]) -> None:
        for batch in batches:
            if not batch.empty:  # one that only counts drops still fills its window
                await sink.send(batch)
                # Let an idle exporter take it before the next: under a drop
                # policy, several windows closing at once (the last ones at the
                # end of a run, too) must not push each other out of the channel.
                await anyio.lowlevel.checkpoint()
