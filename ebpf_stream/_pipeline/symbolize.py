"""The symbolize stage: event messages in, named samples and records out.

Samples are symbolized as they arrive, not at export time, because a
process's memory map disappears when it exits and short-lived processes
must still get names.  Stacks arrive once per key, ahead of the samples
that use them, and go to the ``StackResolver`` (see ``_symbols.stacks``);
loop records go to the ``LoopWatch``, which hands back a ``Stall`` once a
busy period turns out to be an asyncio loop's stall.

The stage yields ``Symbolized`` items, in the order of the events they come
from, for the batch stage (``batch.py``) to put in windows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec

from .._base.config import EbpfConfig
from .._base.stats import Stats
from .._model.batch import SlowCall, TraceRecord
from .._model.events import (
    CpuSample,
    EventMessage,
    LoopBlocked,
    LoopStall,
    LoopThread,
    LoopTotals,
    OffCpuSample,
    OomKill,
    ProcessExec,
    PythonStack,
    SlowSyscall,
    StackTrace,
    TcpConnection,
    Totals,
    Watermark,
    decode_events,
)
from .._model.profile import Frame, RequestContext
from .._symbols import Symbolizer
from .._symbols.requests import Requests
from .._symbols.stacks import StackResolver
from .loops import LoopWatch


class Sample(msgspec.Struct, frozen=True, gc=False):
    """One CPU sample with its stacks named, root first (kernel frames last),
    and the request it was taken for; or, with ``off_cpu_ns``, a wait
    standing for that many nanoseconds."""

    pid: int
    comm: str
    timestamp_ns: int
    frames: tuple[Frame, ...]
    context: RequestContext | None = None
    off_cpu_ns: int = 0
    thread: str = ""  # ``name [tid]`` in a run that records waits (see ``StackSamples``)


class SamplingBegan(msgspec.Struct, frozen=True, gc=False):
    """No sample is older than ``started_ns``: where the first window starts.

    It comes before the samples of its message, and the message's
    ``Watermark`` after them, since that vouches for them.
    """

    started_ns: int


Symbolized = Sample | TraceRecord | Totals | SamplingBegan | Watermark
"""What the symbolize stage hands the batch stage."""

Admit = Callable[[], bool]
"""Asked before each sample or record is symbolized: whether there is room for it."""


class Symbolize:
    """Decodes event messages and names their stacks, keeping what stacks and
    loops it has been told of across messages."""

    def __init__(self, config: EbpfConfig, symbolizer: Symbolizer, stats: Stats) -> None:
        self._resolver = StackResolver(symbolizer, config.python_frames)
        self._loops = LoopWatch(self._resolver.python_frames)
        self._requests = Requests()
        self._stats = stats
        self._threads = config.off_cpu  # a wall-clock view is per thread

    def items(self, message: EventMessage, admit: Admit) -> Iterator[Symbolized]:
        """The message's samples, records, totals and watermark, symbolized.

        A sample or record ``admit`` refuses is skipped before it costs a
        symbolization (the batch stage counts it as dropped).  The items are
        made one at a time, as the caller takes them, so ``admit`` always
        sees the items taken before.
        """
        events = decode_events(message)
        self._loops.forget_exited()
        mark = events[-1] if events else None
        if isinstance(mark, Watermark):  # before the samples: it says where windows start
            events.pop()
            yield SamplingBegan(mark.started_ns)
        for event in events:
            if isinstance(event, Watermark):
                continue  # only ever last, taken above
            if isinstance(event, StackTrace | PythonStack):
                self._resolver.add_stack(event)
            elif isinstance(event, LoopThread):
                self._loops.thread(event)
            elif isinstance(event, LoopBlocked):
                self._loops.blocked(event, self._requests.context(event.pid, event.request))
            elif isinstance(event, ProcessExec):
                self._resolver.process_exec(event.pid)
                self._loops.forget(event.pid)
                self._requests.forget(event.pid)
            elif isinstance(event, Totals):
                if not isinstance(event, LoopTotals) or self._loops.keeps(event):
                    yield event
            else:
                item = self._sampled(event, admit)
                if item is not None:
                    yield item
        if isinstance(mark, Watermark):  # after the samples it vouches for
            yield mark

    def _sampled(self, event: CpuSample | OffCpuSample | SlowSyscall | TcpConnection | OomKill
                 | LoopStall, admit: Admit) -> Sample | TraceRecord | None:
        """One event that counts as a sample, symbolized; None if it is not kept."""
        if isinstance(event, LoopStall):
            # A stall counts as received once it is known to be an asyncio
            # loop's: other pollers' busy periods are not news.
            stall = self._loops.stall(event)
            if stall is None:
                return None
            self._stats.received += 1
            return stall if admit() else None
        if not admit():
            return None
        if isinstance(event, CpuSample | OffCpuSample):
            frames, lost = self._resolver.frames(event)
            if lost:
                self._stats.lost_stacks += 1
            context = self._requests.context(event.pid, event.request)
            thread = f"{event.comm} [{event.tid}]" if self._threads else ""
            if isinstance(event, OffCpuSample):
                return Sample(event.pid, event.comm, event.timestamp_ns, frames, context,
                              event.duration_ns, thread)
            self._loops.sample(event, frames, context)
            return Sample(event.pid, event.comm, event.timestamp_ns, frames, context,
                          thread=thread)
        if isinstance(event, SlowSyscall):
            return SlowCall(event, self._resolver.slow_call_frames(event))
        return event
