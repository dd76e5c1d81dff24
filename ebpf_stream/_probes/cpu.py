"""CPU profiling probe: perf_event CPU_CLOCK sampling on every CPU.

In: the config and the processes to sample; out: ``CpuSample`` events with
the ``StackTrace``/``PythonStack`` events of their stacks, the event-loop
records from which the batcher builds stalls, each loop's totals, and a
``Watermark`` with every read, which tells the batcher which windows are
complete.

User space does as little as possible per sample: records are fixed-size
and decoded a batch at a time (``samples``), and each stack is read at most
once every two stack-map generations, however many samples share it
(``stacks``).  Samples of Python processes also carry the Python stack the
kernel walked (``python_walker`` says which processes those are), and the
loop hooks are attached once there is a loop to watch (``loops``).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Sequence

import anyio
import anyio.to_thread

from .._base.config import EbpfConfig, PythonFrames
from .._base.stats import Stats
from .._bpf.loader import LoadedProgram
from .._bpf.ringbuf import Records
from .._bpf.syscalls import PERF_COUNT_SW_CPU_CLOCK, PERF_TYPE_SOFTWARE
from .._context.region import NO_VALUE
from .._model.events import (
    LOST_STACK,
    NO_STACK,
    CpuSample,
    Event,
    EventMessage,
    LoopBlocked,
    LoopStall,
    LoopThread,
    OffCpuSample,
    ProcessExec,
    Watermark,
    encode_events,
)
from .._python.offsets import PythonOffsets
from .._python.runtime import UnsupportedPython, find_python
from . import loops, samples
from .base import Emit, RingProbe
from .pids import forget_pid_keys, process_name
from .python_walker import MAX_LAYOUTS, OffsetRows, PythonProcesses, checked_self_test
from .stacks import StackMaps

_WAKEUP_EVERY = 64
_NATIVE_STACKS = (samples.SAMPLE, samples.OFF_CPU_WAIT)  # the records with native stack keys
# A sample is stamped before its stacks are walked and its record reserved, so
# a read that found the ring empty at t vouches only for samples stamped before
# t less this: a bound, with room to spare, on the time a program takes to run.
_STAMP_TO_RESERVE_NS = 10_000_000


class CpuProbe(RingProbe):
    """Samples at ``config.sample_rate_hz`` and emits ``CpuSample``/``StackTrace`` events."""

    source = "cpu_profile.bpf.c"
    ring_map = "samples"
    record_size = samples.SIZE
    # The loop hooks take most of the verifier's time: from the compile
    # cache, they are verified while Python frames are prepared beside them.
    later = loops.HOOKS
    ring_full_counter = 1  # RING_FULL in kernel/cpu_profile.bpf.c

    def __init__(self, config: EbpfConfig, stats: Stats, *,
                 targets: Sequence[int] | None, follow_children: bool = False) -> None:
        super().__init__(config, stats, targets=targets, follow_children=follow_children)
        self._started_ns = 0  # CLOCK_MONOTONIC, just before sampling began
        self._python_frames = config.python_frames is not PythonFrames.OFF
        self._loop_stalls = self._python_frames and config.loop_stall_ms > 0
        self._stacks = StackMaps(self.map, config, self._python_frames)
        self._loops = loops.LoopHooks(self._loop_stalls)
        self._python: PythonProcesses | None = None
        self._looks_waiting: anyio.Event | None = None  # set when a process awaits a look

    # -- RingProbe's hooks ------------------------------------------------------

    def cflags(self) -> list[str]:
        c = self.config
        stall_ns = int(c.loop_stall_ms * 1e6)
        return [
            f"-DSTACK_ENTRIES={c.stack_map_entries}",
            f"-DINCLUDE_IDLE={int(c.include_idle)}",
            f"-DWAKEUP_EVERY={_WAKEUP_EVERY}",
            f"-DPYTHON={int(self._python_frames)}",
            f"-DPYTHON_LAYOUTS={MAX_LAYOUTS}",
            f"-DPYTHON_STACK_ENTRIES={c.stack_map_entries}",
            f"-DLOOP_STALLS={int(self._loop_stalls)}",
            f"-DSTALL_NS={stall_ns}",
            # Sleeps this short cannot explain a stall by themselves; not
            # reporting them bounds the records a busy loop can cause.
            f"-DBLOCKED_MIN_NS={max(1, stall_ns // 16)}",
            f"-DOFF_CPU={int(c.off_cpu)}",
            f"-DOFF_CPU_NS={round(c.off_cpu_threshold_ms * 1e6)}",
            f"-DOFF_CPU_IDLE_LOOPS={int(c.off_cpu_idle_loops)}",
        ]

    def map_names(self) -> list[str]:
        # The thread tables only for the health report's map occupancy: their entries
        # come and go with threads, which the kernel forgets as they exit.
        names = ["stacks_0", "stacks_1", "generation", "known"]
        if self._python_frames:
            names += ["python_offsets", "python_processes", "python_stacks_0", "python_stacks_1",
                      "python_threads"]
        if self._loop_stalls:
            names += ["loop_busy", "loop_threads"]
        return names

    def programs(self) -> dict[str, str]:
        programs = {"on_cpu_sample": "PERF_EVENT"}
        if self.config.off_cpu:
            programs["tp_btf__sched_switch"] = "TRACING"
        if self._loop_stalls:
            programs |= loops.PROGRAMS
        return programs

    async def prepare(self, program: LoadedProgram) -> None:
        """Verify the loop hooks while Python frames are prepared (the self-test
        runs now, before anything is attached, so the ring holds only its samples)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, program.load_rest)
            if self._python_frames:
                await anyio.to_thread.run_sync(self._start_python, program)

    def attach(self, program: LoadedProgram) -> None:
        """Attach all but the loop hooks, sample, and watch the loops there are."""
        program.attach_tracepoints(
            only=[p for p in program.program_names() if p not in loops.HOOKS])
        # The first generation ages from the first sample, as the reader runs.
        self._stacks.start()
        self._started_ns = time.monotonic_ns()
        program.attach_perf_event("on_cpu_sample", PERF_TYPE_SOFTWARE,
                                  PERF_COUNT_SW_CPU_CLOCK, self.config.sample_period_ns)
        self._loops.loaded(program)
        if self._targets is not None:
            # The kernel watches chosen targets' loops before their
            # interpreter is found (event_loop.h).
            self._loops.watch(program)

    def _start_python(self, program: LoadedProgram) -> None:
        """Check the offsets on this process, then register the targets' interpreters."""
        assert self._ring is not None
        rows = OffsetRows(program)
        failed: dict[PythonOffsets, str] = {}
        try:
            host = find_python(os.getpid())
        except UnsupportedPython:
            host = None  # nothing to test with; each target is still checked
        if host is not None:
            problem = checked_self_test(program, self._ring, rows, host,
                                        filtered=self._targets is not None)
            if problem:
                failed[host.offsets] = (
                    f"the self-test of the CPython {'.'.join(map(str, host.version))} "
                    f"layout failed ({problem})")
        self._python = PythonProcesses(program, rows, failed, self._watch_loops)
        for pid in self._targets or ():
            self._python.look(pid)

    def _watch_loops(self) -> None:
        """An interpreter was found: watch its loops (not once the probe is closed)."""
        self._loops.watch(self._program)

    # -- the Probe interface ----------------------------------------------------

    async def run(self, emit: Emit) -> None:
        async with anyio.create_task_group() as tg:
            if self._python is not None:
                tg.start_soon(self._look_on_schedule, self._python)
            if self._loop_stalls:
                await self.read_ring_and_totals(emit)
            else:
                await self.read_ring(emit)
            tg.cancel_scope.cancel()

    async def _look_on_schedule(self, python: PythonProcesses) -> None:
        """Look again at processes without an interpreter yet, as each look falls due.

        Their next samples may come too late: a service that has just exec'ed
        often sleeps or blocks at once, the reader may then not wake for up
        to a second, and stalls in that time would pass unwatched.
        """
        while True:
            due = python.next_look()
            if due is None:
                self._looks_waiting = anyio.Event()
                await self._looks_waiting.wait()
            else:
                await anyio.sleep(max(0.0, due - time.monotonic()))
                python.look_waiting()

    def read_totals(self) -> list[Event]:
        if not self._loop_stalls or self._program is None:
            return []
        return list(loops.read_loop_totals(self.map("loop_busy"),
                                           lambda pid: process_name(pid) or ""))

    def forget(self, pids: set[int]) -> None:
        if self._loop_stalls and self._program is not None:
            forget_pid_keys(self.map("loop_busy"), pids)
        if self._python is not None:
            for pid in pids:
                self._python.forget(pid)

    async def drain(self, emit: Emit) -> None:
        await self.drain_ring(emit)
        # Detached and drained: no sample is left to come.
        stopped = Watermark(self._started_ns + self.wall_offset_ns,
                            time.monotonic_ns() + self.wall_offset_ns, stopped=True)
        totals = self.read_totals() if self._loop_stalls else []
        await emit(encode_events([*totals, stopped], 0))

    def encode(self, records: Records) -> EventMessage:
        return self.read_message(records, None)

    def read_message(self, records: Records, complete_ns: int | None) -> EventMessage:
        """The records' events and a ``Watermark``, even for a read that found none:
        that is how the batcher learns that a window is complete."""
        events, count = self._events(samples.decode(records)) if len(records) else ([], 0)
        offset = self.wall_offset_ns
        complete = 0 if complete_ns is None else complete_ns - _STAMP_TO_RESERVE_NS + offset
        events.append(Watermark(self._started_ns + offset, complete))
        return encode_events(events, count)

    # -- decoding the ring ------------------------------------------------------

    def _events(self, records: list[samples.Sample]) -> tuple[list[Event], int]:
        """The events of a batch of ring records, and how many samples it holds."""
        cpu = [r for r in records if r.kind == samples.SAMPLE]
        stacked = [r for r in records if r.kind in _NATIVE_STACKS]
        events = self._stacks.native(
            itertools.chain(((r.user_stack, r.generation) for r in stacked),
                            ((r.kernel_stack, r.generation) for r in stacked)))
        if self._python is not None:
            events += self._stacks.python((r.python_stack, r.generation) for r in records)
            for pid in {r.pid for r in cpu}:
                self._python.look(pid)
        # In ring order: a stall's record follows its busy period's samples
        # and precedes the next period's, and the batcher relies on it.
        for is_sample, run in itertools.groupby(records, lambda r: r.kind == samples.SAMPLE):
            part = list(run)
            events += self._samples(part) if is_sample else self._other_events(part)
        waiting = self._looks_waiting
        if waiting is not None and not waiting.is_set():
            # The scheduler is idle: wake it if a process found without an
            # interpreter, or one that has exec'ed, awaits a look.
            assert self._python is not None
            if self._python.next_look() is not None:
                waiting.set()
        # Stalls are counted by the batcher, which alone knows whether they
        # are an asyncio loop's.
        self._stats.received += len(stacked)
        if self._stacks.rotate_if_due() and self._python is not None:
            self._python.forget_exited()
        return events, len(stacked)

    def _samples(self, records: Iterable[samples.Sample]) -> list[Event]:
        offset, comm = self.wall_offset_ns, self.comm
        return [CpuSample(r.timestamp_ns + offset, r.pid, r.tid, r.cpu, comm(r.comm),
                          _sample_key(r.user_stack), _sample_key(r.kernel_stack),
                          r.python_stack, r.busy_since, _request(r.request))
                for r in records]

    def _other_events(self, records: Iterable[samples.Sample]) -> list[Event]:
        events: list[Event] = []
        for r in records:
            if r.kind == samples.PROCESS_EXEC:
                if self._python is not None:
                    self._python.exec_seen(r.pid)
                events.append(ProcessExec(r.pid))
            elif r.kind == samples.LOOP_THREAD:
                events.append(LoopThread(r.pid, r.tid, r.python_stack))
            elif r.kind == samples.LOOP_BLOCKED:
                events.append(LoopBlocked(r.pid, r.tid, r.busy_since, r.duration_ns,
                                          r.python_stack, _request(r.request)))
            elif r.kind == samples.OFF_CPU_WAIT:
                events.append(OffCpuSample(r.timestamp_ns + self.wall_offset_ns, r.pid, r.tid,
                                           self.comm(r.comm), _sample_key(r.user_stack),
                                           _sample_key(r.kernel_stack), r.python_stack,
                                           r.duration_ns, r.state, _request(r.request)))
            elif r.kind == samples.LOOP_STALL:
                events.append(LoopStall(r.timestamp_ns + self.wall_offset_ns, r.pid, r.tid,
                                        process_name(r.pid) or "", r.busy_since,
                                        r.duration_ns, r.python_stack))
        return events


def _request(raw: bytes) -> bytes:
    """The kernel's request field as an event's: empty for none, the cheaper to send."""
    return b"" if raw == NO_VALUE else raw


def _sample_key(stack: int) -> int:
    """The kernel's stack field as a ``CpuSample`` key: the key, or -errno for none."""
    if stack == samples.NO_STACK:
        return NO_STACK
    return LOST_STACK if stack == samples.STACK_LOST else stack
