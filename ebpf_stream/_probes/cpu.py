"""CPU profiling probe: perf_event CPU_CLOCK sampling on every CPU.

User space does as little as possible per sample: records are fixed-size
and decoded a batch at a time, and each stack, stored in the kernel under a
hash of its contents, is read at most once every two stack-map
generations, however many samples share it.

Samples of Python processes also carry the Python stack the kernel walked
(see ``python.py`` for which processes those are), and the same ring
carries the event-loop records from which the batcher builds stalls.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence

import anyio.lowlevel
import anyio.to_thread

from .._base.clock import wall_clock_offset_ns
from .._base.config import EbpfConfig, PythonFrames
from .._base.stats import Stats
from .._bpf.loader import load_program
from .._bpf.ringbuf import Records, RingBuffer
from .._bpf.syscalls import PERF_COUNT_SW_CPU_CLOCK, PERF_TYPE_SOFTWARE
from .._model.events import (
    LOST_STACK,
    NO_STACK,
    CpuSample,
    Event,
    EventMessage,
    LoopBlocked,
    LoopStall,
    LoopThread,
    ProcessExec,
    PythonStack,
    StackTrace,
    Watermark,
    encode_events,
)
from .._python.offsets import VERSIONS
from .._python.runtime import UnsupportedPython, find_python
from . import samples
from .base import Emit, RingProbe
from .pids import CommNames, forget_pid_keys, load_targets, process_name
from .python_walker import (
    PythonProcesses,
    checked_self_test,
    load_offsets,
    read_loop_totals,
    read_python_stack,
)

log = logging.getLogger("ebpf_stream")

# The event-loop hooks (kernel/event_loop.h): one program for the entry to
# every epoll wait call, one for the return, and one on context switches.
_LOOP_WAIT, _LOOP_RETURN = "on_loop_wait", "on_loop_return"
_SWITCH_HOOK = "tracepoint__sched__sched_switch"
_LOOP_HOOKS = frozenset({_LOOP_WAIT, _LOOP_RETURN, _SWITCH_HOOK})
_LOOP_CALLS = ("epoll_wait", "epoll_pwait", "epoll_pwait2")
_WAKEUP_EVERY = 64
_PAGE = 4096
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# A sample is stamped before its stacks are walked and its record reserved, so
# a read that found the ring empty at t vouches only for samples stamped before
# t less this: a bound, with room to spare, on the time a program takes to run.
_STAMP_TO_RESERVE_NS = 10_000_000


class CpuProbe(RingProbe):
    """Samples at ``config.sample_rate_hz`` and emits ``CpuSample``/``StackTrace`` events.

    ``targets`` are the thread-group ids to sample; ``None`` samples every
    process.  With ``follow_children`` the targets' descendants are sampled
    too, from their fork on.
    """

    def __init__(
        self,
        config: EbpfConfig,
        stats: Stats,
        *,
        targets: Sequence[int] | None,
        follow_children: bool = False,
    ) -> None:
        self._config = config
        self._stats = stats
        self._targets = None if targets is None else tuple(targets)
        self._follow = follow_children and targets is not None
        super().__init__(config)
        self._wall_offset_ns = wall_clock_offset_ns()
        self._started_ns = 0  # CLOCK_MONOTONIC, just before sampling began
        self._epoch = 0
        self._epoch_start_ns = 0  # CLOCK_MONOTONIC
        # Stack keys (native and Python) -> the epoch each was last sent in.
        self._sent: dict[int, int] = {}
        # Keys seen in the current generation's maps: how full they are.
        self._stored: set[int] = set()
        self._comm = CommNames()
        # Half full leaves the kernel room for the stacks it stores before
        # the reader next looks.
        self._rotate_after_keys = config.stack_map_entries // 2
        self._rotate_after_ns = int(config.export_interval_s * 1e9)
        self._python_frames = config.python_frames is not PythonFrames.OFF
        self._loop_stalls = self._python_frames and config.loop_stall_ms > 0
        self._python: PythonProcesses | None = None
        # The loop hooks are attached once there is a loop to watch, and loaded by then.
        self._loop_hooks_loaded = False
        self._loop_hooks_attached = False
        self._loops_to_watch = False
        self._looks_waiting: anyio.Event | None = None  # set when a process awaits a look

    ring_full_counter = 1  # RING_FULL in kernel/cpu_profile.bpf.c

    def cflags(self) -> list[str]:
        c = self._config
        stall_ns = int(c.loop_stall_ms * 1e6)
        return [
            f"-DSTACK_ENTRIES={c.stack_map_entries}",
            f"-DRINGBUF_PAGES={c.ring_buffer_bytes // _PAGE}",
            f"-DFILTER_PIDS={int(self._targets is not None)}",
            f"-DFOLLOW_CHILDREN={int(self._follow)}",
            f"-DINCLUDE_IDLE={int(c.include_idle)}",
            f"-DWAKEUP_EVERY={_WAKEUP_EVERY}",
            f"-DPYTHON={int(self._python_frames)}",
            f"-DPYTHON_VERSIONS={len(VERSIONS)}",
            f"-DPYTHON_STACK_ENTRIES={c.stack_map_entries}",
            f"-DLOOP_STALLS={int(self._loop_stalls)}",
            f"-DSTALL_NS={stall_ns}",
            # Sleeps this short cannot explain a stall by themselves; not
            # reporting them bounds the records a busy loop can cause.
            f"-DBLOCKED_MIN_NS={max(1, stall_ns // 16)}",
        ]

    def _map_names(self) -> list[str]:
        names = ["samples", "stacks_0", "stacks_1", "generation", "counters", "known"]
        if self._python_frames:
            names += ["python_offsets", "python_processes", "python_stacks_0", "python_stacks_1"]
        if self._loop_stalls:
            names.append("loop_busy")
        return [*names, "targets"] if self._targets is not None else names

    def _programs(self) -> dict[str, str]:
        programs = {"on_cpu_sample": "PERF_EVENT"}
        if self._loop_stalls:
            programs |= {_LOOP_WAIT: "TRACEPOINT", _LOOP_RETURN: "TRACEPOINT"}
        return programs

    async def open(self) -> None:
        # The loop hooks take most of the verifier's time: from the compile
        # cache, sampling starts while they are verified beside it.
        self._program = await load_program(
            "cpu_profile.bpf.c", self._programs(), self._map_names(), self.cflags(),
            later=_LOOP_HOOKS)
        try:
            await anyio.lowlevel.checkpoint()  # cancelled while compiling: close, then raise
            load_targets(self._program, self._targets or ())
            self._epoch_start_ns = time.monotonic_ns()
            self._ring = RingBuffer(self.map("samples").fd, self._config.ring_buffer_bytes,
                                    samples.SIZE)
            self._program.attach_tracepoints(
                only=[p for p in self._program.program_names() if p not in _LOOP_HOOKS])
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, self._program.load_rest)
                await anyio.to_thread.run_sync(self._start_sampling)
            self._loop_hooks_loaded = True
            if self._loops_to_watch or self._targets is not None:
                # The kernel watches chosen targets' loops before their
                # interpreter is found (event_loop.h); after the self-test,
                # whose records are dropped.
                self._watch_loops()
        except BaseException:
            self.close()
            raise

    def _start_sampling(self) -> None:
        """Prepare Python frames, then attach the sampling program."""
        assert self._program is not None
        if self._python_frames:
            self._start_python()
        self._started_ns = time.monotonic_ns()
        self._program.attach_perf_event("on_cpu_sample", PERF_TYPE_SOFTWARE,
                                        PERF_COUNT_SW_CPU_CLOCK, self._config.sample_period_ns)

    def _start_python(self) -> None:
        """Check the offsets on this process, then register the targets' interpreters."""
        assert self._program is not None and self._ring is not None
        load_offsets(self._program)
        failed: dict[tuple[int, int], str] = {}
        try:
            host = find_python(os.getpid())
        except UnsupportedPython:
            host = None  # nothing to test with; each target is still checked
        if host is not None:
            problem = checked_self_test(self._program, self._ring, host,
                                filtered=self._targets is not None)
            if problem:
                failed[host.version[:2]] = (
                    f"the self-test of the CPython {'.'.join(map(str, host.version))} "
                    f"layout failed ({problem})")
        self._python = PythonProcesses(self._program, failed, self._watch_loops)
        for pid in self._targets or ():
            self._python.look(pid)

    def _watch_loops(self) -> None:
        """Attach the event-loop hooks, once there is a Python process or a chosen target to watch.

        Until then they would cost every process on the machine: enabling any
        syscall tracepoint sends every syscall down the kernel's slow path.
        A loop found while the hooks are still being loaded is watched as
        soon as they are.
        """
        self._loops_to_watch = True
        program = self._program
        if (not self._loop_stalls or self._loop_hooks_attached or not self._loop_hooks_loaded
                or program is None):
            return
        self._loop_hooks_attached = True
        for call in _LOOP_CALLS:
            program.attach_tracepoint(_LOOP_WAIT, "syscalls", f"sys_enter_{call}")
            program.attach_tracepoint(_LOOP_RETURN, "syscalls", f"sys_exit_{call}")
        program.attach_tracepoints(only=[_SWITCH_HOOK])

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
        return list(read_loop_totals(self.map("loop_busy"),
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
        stopped = Watermark(self._started_ns + self._wall_offset_ns,
                            time.monotonic_ns() + self._wall_offset_ns, stopped=True)
        totals = self.read_totals() if self._loop_stalls else []
        await emit(encode_events([*totals, stopped], 0))

    def encode(self, records: Records) -> EventMessage:
        return self.read_message(records, None)

    def read_message(self, records: Records, complete_ns: int | None) -> EventMessage:
        """The records' events and a ``Watermark``, even for a read that found none:
        that is how the batcher learns that a window is complete."""
        events, count = self._events(samples.decode(records)) if len(records) else ([], 0)
        offset = self._wall_offset_ns
        complete = 0 if complete_ns is None else complete_ns - _STAMP_TO_RESERVE_NS + offset
        events.append(Watermark(self._started_ns + offset, complete))
        return encode_events(events, count)

    def _events(self, records: list[samples.Sample]) -> tuple[list[Event], int]:
        """The events of a batch of ring records, and how many samples it holds."""
        cpu = [r for r in records if r.kind == samples.SAMPLE]
        events = self._new_stacks(
            itertools.chain(((r.user_stack, r.generation) for r in cpu),
                            ((r.kernel_stack, r.generation) for r in cpu)), self._read_stack)
        if self._python is not None:
            events += self._new_stacks(((r.python_stack, r.generation) for r in records),
                                       self._read_python_stack)
            for pid in {r.pid for r in cpu}:
                self._python.look(pid)
        # In ring order: a stall's record follows its busy period's samples
        # and precedes the next period's, and the batcher relies on it.
        for is_sample, run in itertools.groupby(records, lambda r: r.kind == samples.SAMPLE):
            part = list(run)
            events += self._samples(part) if is_sample else self._loop_events(part)
        waiting = self._looks_waiting
        if waiting is not None and not waiting.is_set():
            # The scheduler is idle: wake it if a process found without an
            # interpreter, or one that has exec'ed, awaits a look.
            assert self._python is not None
            if self._python.next_look() is not None:
                waiting.set()
        # Stalls are counted by the batcher, which alone knows whether they
        # are an asyncio loop's.
        self._stats.received += len(cpu)
        self._maybe_rotate()
        return events, len(cpu)

    def _samples(self, records: Iterable[samples.Sample]) -> list[Event]:
        offset, comm = self._wall_offset_ns, self._comm
        return [CpuSample(r.timestamp_ns + offset, r.pid, r.tid, r.cpu, comm(r.comm),
                          _sample_key(r.user_stack), _sample_key(r.kernel_stack),
                          r.python_stack, r.busy_since) for r in records]

    def _new_stacks(self, keys: Iterable[tuple[int, int]],
                    read: Callable[[int, int], Event | None]) -> list[Event]:
        """The stack of each key not sent this epoch or the last, of (key, generation) pairs.

        Keys hash a stack's contents, so the batcher, which keeps the keys of
        the last two epochs it has seen (see ``StackTrace``), needs a key
        only once in that time, however many samples carry it.
        """
        first: dict[int, int] = {}
        for key, generation in keys:
            if key & 1:  # not NO_STACK, STACK_LOST or "no Python stack"
                first.setdefault(key, generation & 1)
        current = self._epoch & 1
        self._stored.update(key for key, generation in first.items() if generation == current)
        events: list[Event] = []
        for key, generation in first.items():
            if self._sent.get(key, -2) < self._epoch - 1:
                stack = read(key, generation)
                if stack is not None:
                    events.append(stack)
                    self._sent[key] = self._epoch
        return events

    def _loop_events(self, records: Iterable[samples.Sample]) -> list[Event]:
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
                                          r.python_stack))
            elif r.kind == samples.LOOP_STALL:
                events.append(LoopStall(r.timestamp_ns + self._wall_offset_ns, r.pid, r.tid,
                                        process_name(r.pid) or "", r.busy_since,
                                        r.duration_ns, r.python_stack))
        return events

    def _read_stack(self, key: int, generation: int) -> StackTrace | None:
        """The ``struct native_stack`` under ``key``; None if the map no longer has it."""
        raw = self.map(f"stacks_{generation}").lookup(_U64.pack(key))
        if raw is None:
            return None
        (depth,) = _U32.unpack_from(raw)
        depth = min(depth, (len(raw) - 8) // 8)
        return StackTrace(key, list(struct.unpack_from(f"<{depth}Q", raw, 8)), self._epoch)

    def _read_python_stack(self, key: int, generation: int) -> PythonStack | None:
        return read_python_stack(self.map(f"python_stacks_{generation}"), key, self._epoch)

    def _maybe_rotate(self) -> None:
        """Switch the kernel to the other stack map once this one has aged or filled.

        The map being switched to is cleared first; it held the generation
        before last, whose samples have all been read by now.
        """
        now = time.monotonic_ns()
        if (now - self._epoch_start_ns < self._rotate_after_ns
                and len(self._stored) < self._rotate_after_keys):
            return
        new = self._epoch + 1
        self.map(f"stacks_{new & 1}").clear()
        if self._python_frames:
            self.map(f"python_stacks_{new & 1}").clear()
        self.map("generation").update(_U32.pack(0), _U32.pack(new & 1))
        self._epoch, self._epoch_start_ns = new, now
        self._stored.clear()
        self._sent = {k: e for k, e in self._sent.items() if e >= new - 1}
        if self._python is not None:
            self._python.forget_exited()


def _sample_key(stack: int) -> int:
    """The kernel's stack field as a ``CpuSample`` key: the key, or -errno for none."""
    if stack == samples.NO_STACK:
        return NO_STACK
    return LOST_STACK if stack == samples.STACK_LOST else stack
