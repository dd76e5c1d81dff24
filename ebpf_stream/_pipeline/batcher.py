"""The batcher: symbolizes incoming samples and flushes a ``Batch`` per interval.

Samples are symbolized as they arrive, not at export time, because a
process's memory map disappears when it exits and short-lived processes
must still get names.  Each (pid, user stack, kernel stack) is symbolized
once per stack-map generation and then only looked up.

Each sample goes to the export window its timestamp falls in, and a batch
flushes when its window is complete (see ``_windows``), or early when the
samples held reach ``max_samples``; samples beyond that are dropped and
counted, which caps both memory and export size per interval.  Records
(slow syscalls, connections, OOM kills, stalls) count as samples and go
with the next batch to flush.  Cumulative totals are kept as the latest
snapshot per key, so their size is bounded by the kernel maps they are read
from, not by the interval.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence

import anyio

from .._base.clock import Clock
from .._base.config import EbpfConfig, PythonFrames
from .._base.stats import Stats
from .._model.batch import Batch, SlowCall, TraceRecord
from .._model.events import (
    NO_STACK,
    CpuSample,
    EventMessage,
    LoopBlocked,
    LoopStall,
    LoopThread,
    LoopTotals,
    MemoryTotals,
    NetworkTotals,
    OomKill,
    ProcessExec,
    PythonStack,
    SlowSyscall,
    StackTrace,
    SyscallTotals,
    TcpConnection,
    Totals,
    Watermark,
    decode_events,
    totals_key,
)
from .._model.profile import Frame, FrameKind, ProcessInfo, Profile
from .._python.code import UNKNOWN_FRAME, PythonSymbols
from .._python.runtime import UnsupportedPython, find_python
from .._symbols import Symbolizer
from .._symbols.merge import merge, runs
from .channels import Channel
from .loops import LoopWatch
from .windows import ProcessWindows, Windows

log = logging.getLogger("ebpf_stream")

_LOST = Frame("[stack lost]", "[unknown]", FrameKind.NATIVE)
_PYTHON_LOST = Frame("[python stack lost]", "[unknown]", FrameKind.PYTHON)
_TRUNCATED = Frame("[truncated]", "[unknown]", FrameKind.PYTHON)


def _raw(address: int) -> Frame:
    return Frame(f"[unknown]+0x{address:x}", "[unknown]", FrameKind.NATIVE, address)


class StackResolver:
    """Turns a sample's stack keys into root-first frames, caching per stack.

    A sample with a Python stack gets its Python frames spliced into its
    native ones (``PythonFrames.MERGED``) or in their place
    (``PythonFrames.PYTHON``).
    """

    def __init__(self, symbolizer: Symbolizer,
                 python_frames: PythonFrames = PythonFrames.MERGED) -> None:
        self._symbolizer = symbolizer
        self._stacks: dict[int, StackTrace | PythonStack] = {}
        self._epoch = 0
        self._frames: dict[tuple[int, int, int, int], tuple[tuple[Frame, ...], bool]] = {}
        # A Python stack recurs under ever new native stacks (the words past
        # the interpreter's frames differ sample to sample): named once per key.
        self._named: dict[tuple[int, int], list[list[Frame]]] = {}
        self._python_only = python_frames is PythonFrames.PYTHON
        self._python_symbols = PythonSymbols()
        self._interpreters: dict[int, bool] = {}  # pid -> whether its Python frames can be named
        self._exited: set[int] = set()  # interpreters found gone when the epoch last turned

    def add_stack(self, stack: StackTrace | PythonStack) -> None:
        if stack.epoch > self._epoch:
            # The probe sends again any key it last sent two epochs ago.
            self._epoch = stack.epoch
            self._stacks = {k: v for k, v in self._stacks.items() if v.epoch >= stack.epoch - 1}
            self._frames = {k: v for k, v in self._frames.items()
                            if all(key <= 0 or key in self._stacks for key in k[1:])}
            self._named = {k: v for k, v in self._named.items() if k[1] in self._stacks}
            # An exited interpreter is forgotten (its /proc/PID/mem closed) one
            # epoch after it was found gone: the samples it took last may be
            # read after its exit, and still need the code objects named.
            exited = {p for p in self._interpreters if not os.path.exists(f"/proc/{p}")}
            for pid in exited & self._exited:
                self.forget(pid)
            self._exited = exited - self._exited
        self._stacks[stack.key] = stack

    def process_exec(self, pid: int) -> None:
        """``pid`` runs a new program: nothing named for it before still holds."""
        self._interpreters.pop(pid, None)
        self._python_symbols.forget(pid)
        self._frames = {k: v for k, v in self._frames.items() if k[0] != pid}
        self._named = {k: v for k, v in self._named.items() if k[0] != pid}

    def forget(self, pid: int) -> None:
        self._interpreters.pop(pid, None)
        self._python_symbols.forget(pid)
        self._named = {k: v for k, v in self._named.items() if k[0] != pid}

    def python_frames(self, pid: int, key: int) -> tuple[Frame, ...] | None:
        """Root-first Python frames of one stack key; None if the key is unknown."""
        found = self._python_runs(pid, key)
        if found is None:
            return None
        return tuple(frame for run in found for frame in run)[::-1]

    def _python_runs(self, pid: int, key: int) -> list[list[Frame]] | None:
        """The runs of named frames of one Python stack, leaf first (shared: not to
        be changed)."""
        found = self._named.get((pid, key))
        if found is not None:
            return found
        stack = self._stacks.get(key)
        if not isinstance(stack, PythonStack):
            return None
        if not self._interpreter(pid):
            return [[_PYTHON_LOST]]
        named = [self._python_symbols.frame(pid, code, lasti, first_line)
                 for code, lasti, first_line, _ in stack.frames]
        found = runs(named, [flags for *_, flags in stack.frames])
        if stack.truncated:
            found.append([_TRUNCATED])
        if UNKNOWN_FRAME not in named:  # a code object unreadable now may be read later
            self._named[pid, key] = found
        return found

    def _interpreter(self, pid: int) -> bool:
        known = self._interpreters.get(pid)
        if known is None:
            try:
                runtime = find_python(pid)
            except (UnsupportedPython, OSError):
                runtime = None
            if runtime is not None:
                self._python_symbols.add_process(runtime)
            known = self._interpreters[pid] = runtime is not None
        return known

    def slow_call_frames(self, call: SlowSyscall) -> tuple[Frame, ...]:
        """Root-first frames of a slow syscall, whose stacks travel with it."""
        user, _ = self._symbolized(call.user_stack,
                                   functools.partial(self._symbolizer.user_frames, call.pid))
        kernel, _ = self._symbolized(call.kernel_stack, self._symbolizer.kernel_frames)
        return user[::-1] + kernel[::-1]

    def frames(self, s: CpuSample) -> tuple[tuple[Frame, ...], bool]:
        """(root-first frames, whether a stack was lost) for one sample."""
        key = (s.pid, s.user_stack, s.kernel_stack, s.python_stack)
        cached = self._frames.get(key)
        if cached is None:
            user, user_lost = self._resolve(
                s.user_stack, functools.partial(self._symbolizer.user_frames, s.pid))
            kernel, kernel_lost = self._resolve(s.kernel_stack, self._symbolizer.kernel_frames)
            if s.python_stack:
                python = self._python_runs(s.pid, s.python_stack)
                if python is None:
                    python, user_lost = [[_PYTHON_LOST]], True
                if self._python_only:
                    user, kernel = tuple(f for run in python for f in run), ()
                else:
                    user = merge(user, python)
            cached = self._frames[key] = (user[::-1] + kernel[::-1], user_lost or kernel_lost)
        return cached

    def _resolve(
        self, key: int, symbolize: Callable[[Sequence[int]], tuple[Frame, ...]]
    ) -> tuple[tuple[Frame, ...], bool]:
        """Leaf-first frames for one stack key, and whether the stack was lost."""
        if key >= 0:
            stack = self._stacks.get(key)
            if not isinstance(stack, StackTrace):
                return (_LOST,), True
            return self._symbolized(stack.addresses, symbolize)
        if key == NO_STACK:
            return (), False  # no such stack, e.g. no kernel stack while in user mode
        return (_LOST,), True

    @staticmethod
    def _symbolized(
        addresses: Sequence[int], symbolize: Callable[[Sequence[int]], tuple[Frame, ...]]
    ) -> tuple[tuple[Frame, ...], bool]:
        try:
            return symbolize(addresses), False
        except Exception:  # a symbolizer bug must not cost the samples
            log.exception("symbolizing a stack failed; keeping raw addresses")
            return tuple(_raw(a) for a in addresses), False


class Batcher:
    """Consumes event messages, emits one ``Batch`` per interval (or per ``max_samples``)."""

    def __init__(self, config: EbpfConfig, symbolizer: Symbolizer, stats: Stats) -> None:
        self._config = config
        self._symbolizer = symbolizer
        self._resolver = StackResolver(symbolizer, config.python_frames)
        self._loops = LoopWatch(self._resolver.python_frames)
        self._stats = stats
        self._clock = Clock()
        self._windows = Windows(config, self._clock.now(), watermarked=config.cpu_profiling)
        self._process_windows = ProcessWindows()
        self._processes: dict[int, ProcessInfo] = {}  # described since the last batch
        self._records: list[TraceRecord] = []
        self._totals: dict[tuple[str, int, str], Totals] = {}
        self._held = 0  # samples in open windows, and records
        self._dropped = 0
        self._early: list[Batch] = []  # closed early by max_samples, not yet handed out

    def add(self, message: EventMessage) -> None:
        """Symbolize one message's events and put them in their windows."""
        events = decode_events(message)
        mark = events[-1] if events else None
        if isinstance(mark, Watermark):  # before the samples: it says where windows start
            events.pop()
            self._windows.begin(mark.started_ns)
        for event in events:
            if isinstance(event, Watermark):
                continue  # only ever last, taken above
            if isinstance(event, StackTrace | PythonStack):
                self._resolver.add_stack(event)
                continue
            if isinstance(event, LoopThread | LoopBlocked | ProcessExec):
                self._loop_event(event)
                continue
            if isinstance(event, SyscallTotals | NetworkTotals | MemoryTotals | LoopTotals):
                if not isinstance(event, LoopTotals) or self._loops.keeps(event):
                    self._process(event.pid, event.comm)
                    self._totals[totals_key(event)] = event
                continue
            stall = None
            if isinstance(event, LoopStall):
                # A stall counts as received once it is known to be an
                # asyncio loop's: other pollers' busy periods are not news.
                stall = self._loops.stall(event)
                if stall is None:
                    continue
                self._stats.received += 1
            if self.full:
                # What is complete can go now; only what is not yet must wait.
                self._early += self._split()
            if self.full:
                self._dropped += 1
                self._stats.dropped_user += 1
                continue
            self._held += 1
            info = self._process(event.pid, event.comm)
            if isinstance(event, CpuSample):
                frames, lost = self._resolver.frames(event)
                if lost:
                    self._stats.lost_stacks += 1
                window, at = self._windows.window(event.timestamp_ns)
                window.processes.setdefault(event.pid, info)
                window.add(event.pid, info.name, frames, 1, (at,))
                self._loops.sample(event, frames)
            elif isinstance(event, SlowSyscall):
                self._records.append(SlowCall(event, self._resolver.slow_call_frames(event)))
            elif isinstance(event, TcpConnection | OomKill):
                self._records.append(event)
            elif stall is not None:
                self._records.append(stall)
        if isinstance(mark, Watermark):  # after the samples it vouches for
            self._windows.advance(mark.complete_ns, stopped=mark.stopped)

    def _loop_event(self, event: LoopThread | LoopBlocked | ProcessExec) -> None:
        if isinstance(event, LoopThread):
            self._loops.thread(event)
        elif isinstance(event, LoopBlocked):
            self._loops.blocked(event)
        else:
            self._resolver.process_exec(event.pid)
            self._loops.forget(event.pid)

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
        batch = Batch(profile, self._dropped, self._records, list(self._totals.values()))
        self._processes, self._records, self._totals = {}, [], {}
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
                wait_ns = self._windows.due_ns() - self._clock.now()
                with anyio.move_on_after(max(0.0, wait_ns / 1e9)):
                    try:
                        message = await source.receive()
                    except anyio.EndOfStream:
                        break
                if message is not None:
                    self.add(message)
                for batch in self.ready(idle=not source.queued):
                    if not batch.empty:  # one that only counts drops still fills its window
                        await sink.send(batch)
            for batch in self.finish():
                if not batch.empty:
                    await sink.send(batch)
        finally:
            sink.close()
