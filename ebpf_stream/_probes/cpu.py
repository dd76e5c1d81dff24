"""CPU profiling probe: perf_event CPU_CLOCK sampling on every CPU.

User space does as little as possible per sample: records are fixed-size
and decoded a batch at a time, and each stack is read from the kernel once
per stack-map generation, however many samples share it.

Samples of Python processes also carry the Python stack the kernel walked
(see ``python.py`` for which processes those are), and the same ring
carries the event-loop records from which the batcher builds stalls.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections.abc import Sequence

import anyio.lowlevel
import anyio.to_thread
import numpy as np

from .._bpf import PERF_COUNT_SW_CPU_CLOCK, PERF_TYPE_SOFTWARE
from .._config import EbpfConfig, PythonFrames
from .._events import (
    CpuSample,
    Event,
    EventMessage,
    LoopBlocked,
    LoopStall,
    LoopThread,
    ProcessExec,
    StackTrace,
    encode_events,
)
from .._loader import load_program
from .._python.offsets import VERSIONS
from .._python.runtime import UnsupportedPython, find_python
from .._ringbuf import RingBuffer
from .._stats import Stats
from .base import Emit, RingProbe
from .python import (
    PythonProcesses,
    load_offsets,
    read_loop_totals,
    read_python_stack,
    self_test,
)
from .tracing import (
    CommNames,
    forget_pid_keys,
    load_targets,
    process_name,
    wall_clock_offset_ns,
)

log = logging.getLogger("ebpf_stream")

# Mirrors `struct sample` in kernel/cpu_profile.bpf.c.
SAMPLE = np.dtype([
    ("timestamp_ns", "<u8"), ("pid", "<u4"), ("tid", "<u4"), ("cpu", "<u4"),
    ("user_stack_id", "<i4"), ("kernel_stack_id", "<i4"), ("generation", "<u4"),
    ("comm", "S16"), ("python_stack", "<u8"), ("busy_since", "<u8"), ("duration_ns", "<u8"),
    ("kind", "<u4"), ("pad", "<u4"),
])
# `enum kind` in kernel/cpu_profile.bpf.c
_SAMPLE, _LOOP_THREAD, _LOOP_BLOCKED, _LOOP_STALL, _PROCESS_EXEC = range(5)
_WAKEUP_EVERY = 64
_PAGE = 4096
_MAX_STACK_DEPTH = 127
_U32 = struct.Struct("<I")


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
        self._epoch = 0
        self._epoch_start = [0, 0]  # CLOCK_MONOTONIC start of the epochs of each generation
        self._sent: set[int] = set()  # stack keys already emitted
        self._keys_this_epoch = 0
        self._comm = CommNames()
        # Rotate well before the map gets crowded: a stack map is a hash table
        # whose bucket collisions lose stacks (at 1/16 full, at most 6% of new
        # stacks can collide).
        self._rotate_after_keys = max(16, config.stack_map_entries // 16)
        self._rotate_after_ns = int(config.export_interval_s * 1e9)
        self._python_frames = config.python_frames is not PythonFrames.OFF
        self._loop_stalls = self._python_frames and config.loop_stall_ms > 0
        self._python: PythonProcesses | None = None
        self._loop_hooks: list[str] = []  # programs attached once a Python process is found
        self._python_sent: dict[int, int] = {}  # Python stack key -> epoch it was last sent in

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

    async def open(self) -> None:
        self._program = await load_program(
            "cpu_profile.bpf.c", {"on_cpu_sample": "PERF_EVENT"}, self._map_names(),
            self.cflags())
        try:
            await anyio.lowlevel.checkpoint()  # cancelled while compiling: close, then raise
            load_targets(self._program, self._targets or ())
            self._epoch_start[0] = time.monotonic_ns()
            self._ring = RingBuffer(self.map("samples").fd, self._config.ring_buffer_bytes,
                                    SAMPLE)
            programs = self._program.program_names()
            self._loop_hooks = [p for p in programs if "epoll" in p or "sched_switch" in p]
            self._program.attach_tracepoints(
                only=[p for p in programs if p not in self._loop_hooks])
            if self._python_frames:
                await anyio.to_thread.run_sync(self._start_python)
            self._program.attach_perf_event("on_cpu_sample", PERF_TYPE_SOFTWARE,
                                            PERF_COUNT_SW_CPU_CLOCK, self._config.sample_period_ns)
        except BaseException:
            self.close()
            raise

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
            problem = self_test(self._program, self._ring, host,
                                filtered=self._targets is not None)
            if problem:
                failed[host.version[:2]] = (
                    f"the self-test of the CPython {'.'.join(map(str, host.version))} "
                    f"layout failed ({problem})")
        self._python = PythonProcesses(self._program, failed, self._watch_loops)
        for pid in self._targets or ():
            self._python.look(pid)

    def _watch_loops(self) -> None:
        """Attach the event-loop hooks, once there is a Python process to watch.

        Until then they would cost every process on the machine: enabling any
        syscall tracepoint sends every syscall down the kernel's slow path.
        """
        if self._loop_hooks and self._program is not None:
            hooks, self._loop_hooks = self._loop_hooks, []
            self._program.attach_tracepoints(only=hooks)

    async def run(self, emit: Emit) -> None:
        if self._loop_stalls:
            await self.read_ring_and_totals(emit)
        else:
            await self.read_ring(emit)

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
        if self._loop_stalls:
            await emit(encode_events(self.read_totals(), 0))

    def encode(self, records: np.ndarray) -> EventMessage:
        kinds = records["kind"]
        samples = records[kinds == _SAMPLE]
        events: list[Event] = []
        if self._python is not None:
            self._python_stacks(records, events)
            for pid in np.unique(samples["pid"]).tolist():
                self._python.look(pid)
        # In ring order: a stall's record follows its busy period's samples
        # and precedes the next period's, and the batcher relies on it.
        for part in np.split(records, np.flatnonzero(np.diff(kinds == _SAMPLE)) + 1):
            if len(part):
                events += (self._samples(part) if part["kind"][0] == _SAMPLE
                           else self._loop_events(part))
        # Stalls are counted by the batcher, which alone knows whether they
        # are an asyncio loop's.
        self._stats.received += len(samples)
        self._maybe_rotate()
        return encode_events(events, len(samples))

    def _samples(self, records: np.ndarray) -> list[Event]:
        ts = records["timestamp_ns"].astype(np.int64)
        user = self._stack_keys(records["user_stack_id"], records["generation"], ts)
        kernel = self._stack_keys(records["kernel_stack_id"], records["generation"], ts)

        events: list[Event] = []
        for key in np.unique(np.concatenate((user[user >= 0], kernel[kernel >= 0]))).tolist():
            if key not in self._sent:
                addresses = self._read_stack(key)
                if addresses is not None:
                    events.append(StackTrace(key, addresses))
                    self._sent.add(key)
                    self._keys_this_epoch += 1
        comms = [self._comm(c) for c in records["comm"].tolist()]
        events.extend(
            CpuSample(t, pid, tid, cpu, comm, u, k, py, busy)
            for t, pid, tid, cpu, comm, u, k, py, busy in zip(
                (ts + self._wall_offset_ns).tolist(), records["pid"].tolist(),
                records["tid"].tolist(), records["cpu"].tolist(), comms,
                user.tolist(), kernel.tolist(), records["python_stack"].tolist(),
                records["busy_since"].tolist(), strict=True)
        )
        return events

    def _python_stacks(self, records: np.ndarray, events: list[Event]) -> None:
        """A ``PythonStack`` for each key in ``records`` not sent this epoch or the last.

        Keys hash the stack's contents, so a key sent once needs no reading
        again while the batcher keeps it (see ``PythonStack``).
        """
        walked = records[records["python_stack"] != 0]
        if not len(walked):
            return
        keys, first = np.unique(walked["python_stack"], return_index=True)
        for key, generation in zip(keys.tolist(), walked["generation"][first].tolist(),
                                   strict=True):
            if self._python_sent.get(key, -2) >= self._epoch - 1:
                continue
            stack = read_python_stack(self.map(f"python_stacks_{generation & 1}"), key,
                                      self._epoch)
            if stack is not None:
                events.append(stack)
                self._python_sent[key] = self._epoch
                self._keys_this_epoch += 1

    def _loop_events(self, records: np.ndarray) -> list[Event]:
        events: list[Event] = []
        fields = ("kind", "timestamp_ns", "pid", "tid", "python_stack", "busy_since", "duration_ns")
        for kind, ts, pid, tid, stack, busy_since, duration in records[list(fields)].tolist():
            if kind == _PROCESS_EXEC:
                if self._python is not None:
                    self._python.exec_seen(pid)
                events.append(ProcessExec(pid))
            elif kind == _LOOP_THREAD:
                events.append(LoopThread(pid, tid, stack))
            elif kind == _LOOP_BLOCKED:
                events.append(LoopBlocked(pid, tid, busy_since, duration, stack))
            elif kind == _LOOP_STALL:
                events.append(LoopStall(ts + self._wall_offset_ns, pid, tid,
                                        process_name(pid) or "", busy_since, duration))
        return events

    def _stack_keys(self, ids: np.ndarray, generation: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Run-unique keys (epoch << 32 | id) for stack ids; errors stay negative.

        A record whose generation bit points at an epoch that began after the
        record was taken is from two generations back: its map has been
        cleared since, so its stack is reported lost (-ESTALE) rather than
        resolved to a stranger's stack.
        """
        current = self._epoch
        epoch = np.where(generation == (current & 1), current, current - 1).astype(np.int64)
        start = np.asarray(self._epoch_start, dtype=np.int64)[epoch & 1]
        stale = ts < start
        keys = np.where(ids >= 0, (epoch << 32) | ids.astype(np.int64), ids.astype(np.int64))
        return np.where(stale & (ids >= 0), -errno.ESTALE, keys)

    def _read_stack(self, key: int) -> list[int] | None:
        raw = self.map(f"stacks_{(key >> 32) & 1}").lookup(_U32.pack(key & 0xFFFFFFFF))
        if raw is None:
            return None
        ips = np.frombuffer(raw, dtype="<u8", count=_MAX_STACK_DEPTH)
        end = int(np.argmin(ips)) if not ips.all() else _MAX_STACK_DEPTH
        return ips[:end].tolist()  # type: ignore[no-any-return]

    def _maybe_rotate(self) -> None:
        """Switch the kernel to the other stack map once this one has aged or filled.

        The map being switched to is cleared first; it held the generation
        before last, whose samples have all been read by now.
        """
        age = time.monotonic_ns() - self._epoch_start[self._epoch & 1]
        if age < self._rotate_after_ns and self._keys_this_epoch < self._rotate_after_keys:
            return
        new = self._epoch + 1
        self.map(f"stacks_{new & 1}").clear()
        self._epoch_start[new & 1] = time.monotonic_ns()
        self.map("generation").update(_U32.pack(0), _U32.pack(new & 1))
        self._epoch = new
        self._keys_this_epoch = 0
        self._sent = {k for k in self._sent if k >> 32 >= new - 1}
        if self._python_frames:
            self.map(f"python_stacks_{new & 1}").clear()
            self._python_sent = {k: e for k, e in self._python_sent.items() if e >= new - 1}
        if self._python is not None:
            self._python.forget_exited()
