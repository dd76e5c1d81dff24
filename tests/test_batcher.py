"""The batcher with hand-made events: symbolization, max_samples, flushing."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Sequence

import anyio
import pytest

from ebpf_stream import Batch, EbpfConfig, Frame, FrameKind, OverflowPolicy, _batcher
from ebpf_stream._batch import SlowCall
from ebpf_stream._batcher import Batcher, StackResolver
from ebpf_stream._channels import Channel
from ebpf_stream._events import (
    PYTHON_FRAME_ENTRY,
    CpuSample,
    Event,
    EventMessage,
    PythonStack,
    SlowSyscall,
    StackTrace,
    SyscallTotals,
    TcpConnection,
    encode_events,
)
from ebpf_stream._profile import ProcessInfo
from ebpf_stream._stats import Stats


class FakeSymbolizer:
    """Names frames after their addresses, so tests can read stacks."""

    def __init__(self) -> None:
        self.user_calls = 0

    def user_frames(self, pid: int, addresses: Sequence[int]) -> tuple[Frame, ...]:
        self.user_calls += 1
        return tuple(Frame(f"u{a:x}", "/bin/app", FrameKind.NATIVE, a) for a in addresses)

    def kernel_frames(self, addresses: Sequence[int]) -> tuple[Frame, ...]:
        return tuple(Frame(f"k{a:x}", "[kernel.kallsyms]", FrameKind.KERNEL, a)
                     for a in addresses)

    def process_info(self, pid: int) -> ProcessInfo | None:
        return ProcessInfo(pid, "app", "app", "app --serve")


USER, KERNEL = (1 << 32) | 7, (1 << 32) | 8


def message(n: int, *, user: int = USER, kernel: int = KERNEL, stacks: bool = True) -> EventMessage:
    events: list[Event] = []
    if stacks:
        events += [StackTrace(USER, [0xC, 0xB, 0xA], 0), StackTrace(KERNEL, [0x2, 0x1], 0)]
    events += [CpuSample(1000 + i, 42, 43, 0, "app", user, kernel) for i in range(n)]
    return encode_events(events, n)


def make_batcher(**config: object) -> tuple[Batcher, Stats, FakeSymbolizer]:
    stats = Stats()
    symbolizer = FakeSymbolizer()
    cfg = EbpfConfig(**config)  # type: ignore[arg-type]
    return Batcher(cfg, symbolizer, stats), stats, symbolizer  # type: ignore[arg-type]


def names(batch: Batch) -> dict[str, int]:
    return {";".join(f.name for f in s.frames): s.count for s in batch.profile}


def test_stacks_are_root_first_user_then_kernel() -> None:
    batcher, _, _ = make_batcher()
    batcher.add(message(3))
    assert names(batcher.take()) == {"ua;ub;uc;k1;k2": 3}


def test_each_stack_is_symbolized_once() -> None:
    batcher, _, symbolizer = make_batcher()
    batcher.add(message(100))
    batcher.add(message(100, stacks=False))
    assert symbolizer.user_calls == 1


def test_missing_and_lost_stacks_keep_the_sample() -> None:
    batcher, stats, _ = make_batcher()
    batcher.add(message(1, kernel=-errno.EFAULT))  # no kernel stack: in user mode
    batcher.add(message(1, user=-errno.ENOMEM, stacks=False))  # not stored
    batcher.add(message(1, user=(5 << 32) | 1, stacks=False))  # never received
    assert names(batcher.take()) == {
        "ua;ub;uc": 1, "[stack lost];k1;k2": 2}
    assert stats.lost_stacks == 2


def test_max_samples_caps_an_interval_and_counts_the_rest() -> None:
    batcher, stats, _ = make_batcher(max_samples=10)
    batcher.add(message(25))
    assert batcher.full
    batch = batcher.take()
    assert batch.profile.sample_count == 10
    assert batch.dropped == 15 and stats.dropped_user == 15
    batcher.add(message(5, stacks=False))
    assert batcher.take().profile.sample_count == 5


def test_per_sample_timestamps_are_kept() -> None:
    batcher, _, _ = make_batcher()
    batcher.add(message(3))
    (stack,) = batcher.take().profile
    assert stack.timestamps_ns == [1000, 1001, 1002]


async def run_batcher(batcher: Batcher, messages: list[EventMessage], gap: float,
                      capacity: int = 8) -> list[Batch]:
    source = Channel[EventMessage](64, OverflowPolicy.BLOCK, weight=lambda m: m.samples,
                                   on_drop=lambda n: None)
    sink = Channel[Batch](capacity, OverflowPolicy.BLOCK, weight=lambda b: 1,
                          on_drop=lambda n: None)
    out: list[Batch] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.run, source, sink)
        for m in messages:
            await source.send(m)
            await anyio.sleep(gap)
        source.close()
        out = [b async for b in sink]
    return out


@pytest.mark.anyio
async def test_flushes_on_interval() -> None:
    batcher, _, _ = make_batcher(export_interval_s=0.1)
    batches = await run_batcher(batcher, [message(1) for _ in range(6)], gap=0.05)
    assert 2 <= len(batches) <= 4
    assert sum(b.profile.sample_count for b in batches) == 6


@pytest.mark.anyio
async def test_flushes_on_size_before_the_interval() -> None:
    batcher, stats, _ = make_batcher(export_interval_s=60, max_samples=4)
    batches = await run_batcher(batcher, [message(4), message(4, stacks=False)], gap=0)
    assert [b.profile.sample_count for b in batches] == [4, 4]
    assert stats.dropped_user == 0


@pytest.mark.anyio
async def test_a_slow_consumer_under_drop_oldest_loses_counted_batches() -> None:
    batcher, stats, _ = make_batcher(export_interval_s=60, max_samples=1)
    sink = Channel[Batch](1, OverflowPolicy.DROP_OLDEST, weight=lambda b: b.profile.sample_count,
                          on_drop=lambda n: setattr(stats, "dropped_user", stats.dropped_user + n))
    source = Channel[EventMessage](64, OverflowPolicy.BLOCK, weight=lambda m: m.samples,
                                   on_drop=lambda n: None)
    for i in range(5):
        await source.send(message(1, stacks=i == 0))
    source.close()
    await batcher.run(source, sink)  # nobody consumes until the end
    kept = [b async for b in sink]
    assert len(kept) == 1 and stats.dropped_user == 4


def syscall_totals(pid: int, name: str, count: int) -> SyscallTotals:
    return SyscallTotals(pid, "app", name, count, 0, count * 100, [count] + [0] * 31)


def test_totals_keep_the_latest_snapshot_per_process_and_syscall() -> None:
    batcher, stats, _ = make_batcher()
    batcher.add(encode_events([syscall_totals(42, "read", 1), syscall_totals(42, "write", 5)], 0))
    batcher.add(encode_events([syscall_totals(42, "read", 3), syscall_totals(7, "read", 2)], 0))
    batch = batcher.take()
    assert sorted((t.pid, t.syscall, t.count) for t in batch.totals
                  if isinstance(t, SyscallTotals)) == [(7, "read", 2), (42, "read", 3),
                                                       (42, "write", 5)]
    assert batch.sample_count == 0 and not batch.empty, "totals alone are worth exporting"
    assert set(batch.profile.processes) == {7, 42}
    assert stats.received == stats.dropped_user == 0, "totals are not samples"
    assert batcher.take().totals == [], "each interval starts empty"


def test_records_count_as_samples_and_slow_syscalls_get_their_stack() -> None:
    batcher, stats, _ = make_batcher(max_samples=2)
    slow = SlowSyscall(5, 42, 43, "app", "nanosleep", 20_000_000, 0, [0xB, 0xA], [0x1])
    closed = TcpConnection(1, 2, 42, "app", "client", "closed", 4, "127.0.0.1", 5000,
                           "127.0.0.1", 80, 10, 20, 0)
    batcher.add(encode_events([slow, closed, closed], 3))
    batch = batcher.take()
    assert batch.sample_count == 2 and batch.dropped == 1 and stats.dropped_user == 1
    first, second = batch.records
    assert isinstance(first, SlowCall) and first.call == slow
    assert [f.name for f in first.frames] == ["ua", "ub", "k1"], "root first, kernel last"
    assert second == closed


class FakePythonSymbols:
    """Names a code object after its address while its process is known, as
    ``PythonSymbols`` does from the process's memory."""

    def __init__(self) -> None:
        self.known: set[int] = set()

    def add_process(self, runtime: int) -> None:
        self.known.add(runtime)

    def forget(self, pid: int) -> None:
        self.known.discard(pid)

    def frame(self, pid: int, code: int, lasti: int, first_line: int) -> Frame:
        return Frame(f"py{code:x}" if pid in self.known else "[unknown python]", "app.py",
                     FrameKind.PYTHON)


def test_python_frames_of_an_exited_process_are_named_while_its_samples_arrive(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Samples taken just before a process exits are read after it, and the
    stack maps may turn over meanwhile: its interpreter is not forgotten
    before the next turn."""
    def find_python(pid: int) -> int:
        os.kill(pid, 0)  # the runtime, here its pid; gone once the process is
        return pid

    monkeypatch.setattr(_batcher, "find_python", find_python)
    monkeypatch.setattr(_batcher, "PythonSymbols", FakePythonSymbols)
    resolver = StackResolver(FakeSymbolizer())  # type: ignore[arg-type]
    proc = subprocess.Popen(["sleep", "30"])

    def python_names(python_stack: int, epoch: int) -> list[str]:
        resolver.add_stack(StackTrace(USER, [0xA], epoch))
        resolver.add_stack(PythonStack(python_stack, [(python_stack, 0, 1, PYTHON_FRAME_ENTRY)],
                                       False, epoch))
        frames, _ = resolver.frames(CpuSample(0, proc.pid, proc.pid, 0, "python", USER, 0,
                                              python_stack))
        return [f.name for f in frames if f.kind is FrameKind.PYTHON]

    try:
        assert python_names(0x11, 0) == ["py11"]
    finally:
        proc.kill()
        proc.wait()
    assert python_names(0x13, 1) == ["py13"], "the maps turned over after the exit"
    assert python_names(0x15, 2) == ["[python stack lost]"], "forgotten at the next turn"
