"""The batcher with hand-made events: symbolization, max_samples, windows, flushing."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Sequence

import anyio
import pytest

from ebpf_stream import Batch, EbpfConfig, Frame, FrameKind, OverflowPolicy
from ebpf_stream._base.stats import Stats
from ebpf_stream._model.batch import SlowCall
from ebpf_stream._model.events import (
    PYTHON_FRAME_ENTRY,
    CpuSample,
    Event,
    EventMessage,
    PythonStack,
    SlowSyscall,
    StackTrace,
    SyscallTotals,
    TcpConnection,
    Watermark,
    encode_events,
)
from ebpf_stream._model.profile import ProcessInfo
from ebpf_stream._pipeline.batch import Batcher
from ebpf_stream._pipeline.channels import Channel
from ebpf_stream._pipeline.windows import Windows
from ebpf_stream._symbols import stacks as _stacks
from ebpf_stream._symbols.stacks import StackResolver


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

    def forget_exited(self) -> None:
        pass


USER, KERNEL = (1 << 32) | 7, (1 << 32) | 8


S = 1_000_000_000  # ns


def message(n: int, *, user: int = USER, kernel: int = KERNEL, stacks: bool = True,
            at: int | None = None, complete: int | None = None, started: int = 0,
            ) -> EventMessage:
    """``n`` samples 1 µs apart from ``at`` (default: now), then a watermark at
    ``complete`` if given."""
    events: list[Event] = []
    if stacks:
        events += [StackTrace(USER, [0xC, 0xB, 0xA], 0), StackTrace(KERNEL, [0x2, 0x1], 0)]
    first = time.time_ns() if at is None else at
    events += [CpuSample(first + i * 1000, 42, 43, 0, "app", user, kernel) for i in range(n)]
    if complete is not None:
        events.append(Watermark(started, complete))
    return encode_events(events, n)


def watermark(complete: int, *, started: int = 0, stopped: bool = False) -> EventMessage:
    return encode_events([Watermark(started, complete, stopped)], 0)


def make_batcher(**config: object) -> tuple[Batcher, Stats, FakeSymbolizer]:
    """A batcher whose sampling began now, as a CPU probe's first message says."""
    stats = Stats()
    symbolizer = FakeSymbolizer()
    cfg = EbpfConfig(**config)  # type: ignore[arg-type]
    batcher = Batcher(cfg, symbolizer, stats)  # type: ignore[arg-type]
    if cfg.cpu_profiling:
        batcher.add(watermark(0, started=time.time_ns()))
    return batcher, stats, symbolizer


def take(batcher: Batcher) -> Batch:
    """Every window left, as one batch: the last window, when all samples are in one."""
    (batch,) = batcher.finish()
    return batch


def names(batch: Batch) -> dict[str, int]:
    return {";".join(f.name for f in s.frames): s.count for s in batch.profile}


def test_stacks_are_root_first_user_then_kernel() -> None:
    batcher, _, _ = make_batcher()
    batcher.add(message(3))
    assert names(take(batcher)) == {"ua;ub;uc;k1;k2": 3}


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
    assert names(take(batcher)) == {
        "ua;ub;uc": 1, "[stack lost];k1;k2": 2}
    assert stats.lost_stacks == 2


def test_max_samples_caps_an_interval_and_counts_the_rest() -> None:
    batcher, stats, _ = make_batcher(max_samples=10)
    batcher.add(message(25, complete=time.time_ns() + S))
    assert batcher.full
    (batch,) = batcher.ready()
    assert batch.profile.sample_count == 10
    assert batch.dropped == 15 and stats.dropped_user == 15
    batcher.add(message(5, stacks=False))
    assert take(batcher).profile.sample_count == 5


def test_per_sample_timestamps_are_kept() -> None:
    batcher, _, _ = make_batcher()
    at = time.time_ns()
    batcher.add(message(3, at=at))
    (stack,) = take(batcher).profile
    assert stack.timestamps_ns == [at, at + 1000, at + 2000]


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
    t0 = time.time_ns()
    ticks = [t0 + i * S // 20 for i in range(6)]  # 50 ms apart, as the gap between sends
    batches = await run_batcher(batcher, [message(1, at=t, complete=t + 1000) for t in ticks],
                                gap=0.05)
    assert 2 <= len(batches) <= 4
    assert sum(b.profile.sample_count for b in batches) == 6


@pytest.mark.anyio
async def test_flushes_on_size_before_the_interval() -> None:
    batcher, stats, _ = make_batcher(export_interval_s=60, max_samples=4)
    t0 = time.time_ns()
    batches = await run_batcher(batcher, [message(4, at=t0, complete=t0 + 4000),
                                          message(4, at=t0 + 4000, stacks=False)], gap=0)
    assert [b.profile.sample_count for b in batches] == [4, 4]
    assert stats.dropped_user == 0


@pytest.mark.anyio
async def test_a_slow_consumer_under_drop_oldest_loses_counted_batches() -> None:
    batcher, stats, _ = make_batcher(export_interval_s=60, max_samples=1)
    sink = Channel[Batch](1, OverflowPolicy.DROP_OLDEST, weight=lambda b: b.profile.sample_count,
                          on_drop=lambda n: setattr(stats, "dropped_user", stats.dropped_user + n))
    source = Channel[EventMessage](64, OverflowPolicy.BLOCK, weight=lambda m: m.samples,
                                   on_drop=lambda n: None)
    t0 = time.time_ns()
    for i in range(5):
        await source.send(message(1, stacks=i == 0, at=t0 + i * 1000, complete=t0 + i * 1000 + 1))
    source.close()
    await batcher.run(source, sink)  # nobody consumes until the end
    kept = [b async for b in sink]
    assert len(kept) == 1 and stats.dropped_user == 4


@pytest.mark.anyio
async def test_a_waiting_message_is_taken_however_late_the_windows_are(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A window that waits for what is queued must not keep the stage from taking it."""
    batcher, stats, _ = make_batcher(export_interval_s=60)
    source = Channel[EventMessage](1, OverflowPolicy.BLOCK, weight=lambda m: m.samples,
                                   on_drop=lambda n: None)
    due_ns = batcher._windows.due_ns
    # Overdue while the message waits, as a window is whose end the message holds.
    monkeypatch.setattr(batcher._windows, "due_ns", lambda: 0 if source.queued else due_ns())
    sink = Channel[Batch](8, OverflowPolicy.BLOCK, weight=lambda b: 1, on_drop=lambda n: None)
    t0 = time.time_ns()
    await source.send(message(3, at=t0, complete=t0 + 3000))
    source.close()
    with anyio.fail_after(5):
        await batcher.run(source, sink)
    assert sum([b.profile.sample_count async for b in sink]) == 3
    assert stats.dropped_user == 0


def syscall_totals(pid: int, name: str, count: int) -> SyscallTotals:
    return SyscallTotals(pid, "app", name, count, 0, count * 100, [count] + [0] * 31)


def test_totals_keep_the_latest_snapshot_per_process_and_syscall() -> None:
    batcher, stats, _ = make_batcher()
    batcher.add(encode_events([syscall_totals(42, "read", 1), syscall_totals(42, "write", 5)], 0))
    batcher.add(encode_events([syscall_totals(42, "read", 3), syscall_totals(7, "read", 2)], 0))
    batch = take(batcher)
    assert sorted((t.pid, t.syscall, t.count) for t in batch.totals
                  if isinstance(t, SyscallTotals)) == [(7, "read", 2), (42, "read", 3),
                                                       (42, "write", 5)]
    assert batch.sample_count == 0 and not batch.empty, "totals alone are worth exporting"
    assert set(batch.profile.processes) == {7, 42}
    assert stats.received == stats.dropped_user == 0, "totals are not samples"
    assert take(batcher).totals == [], "each interval starts empty"


def test_records_count_as_samples_and_slow_syscalls_get_their_stack() -> None:
    batcher, stats, _ = make_batcher(max_samples=2)
    slow = SlowSyscall(5, 42, 43, "app", "nanosleep", 20_000_000, 0, [0xB, 0xA], [0x1])
    closed = TcpConnection(1, 2, 42, "app", "client", "closed", 4, "127.0.0.1", 5000,
                           "127.0.0.1", 80, 10, 20, 0)
    batcher.add(encode_events([slow, closed, closed], 3))
    batch = take(batcher)
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

    monkeypatch.setattr(_stacks, "find_python", find_python)
    monkeypatch.setattr(_stacks, "PythonSymbols", FakePythonSymbols)
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


# --- export windows ------------------------------------------------------------------------


def windows(batches: list[Batch]) -> list[tuple[int, int]]:
    return [(b.profile.start_ns, b.profile.end_ns) for b in batches]


def assert_inside(batches: list[Batch]) -> None:
    for b in batches:
        for s in b.profile:
            assert all(b.profile.start_ns <= t < b.profile.end_ns for t in s.timestamps_ns)


def fresh_batcher(**config: object) -> Batcher:
    """A batcher that has not heard from the CPU probe yet."""
    return Batcher(EbpfConfig(**config), FakeSymbolizer(), Stats())  # type: ignore[arg-type]


def begun(**config: object) -> tuple[Batcher, int]:
    """A batcher whose sampling began at a known time, a little ahead of the clock."""
    batcher = fresh_batcher(**config)
    t0 = time.time_ns() + S  # ahead: the clock cannot close windows during the test
    batcher.add(watermark(0, started=t0))
    return batcher, t0


def test_samples_go_to_the_window_they_were_taken_in_not_the_one_they_arrive_in() -> None:
    batcher, t0 = begun(export_interval_s=1)
    # Taken in the first, second and third second; all read in one drain.
    batcher.add(message(1, at=t0 + S // 2))
    batcher.add(message(1, at=t0 + 3 * S // 2, stacks=False))
    batcher.add(message(1, at=t0 + 5 * S // 2, stacks=False, complete=t0 + 7 * S // 4))
    first = batcher.ready()
    assert windows(first) == [(t0, t0 + S)], "the second window is not complete yet"
    batcher.add(watermark(t0 + 2 * S))
    second = batcher.ready()
    assert windows(second) == [(t0 + S, t0 + 2 * S)]
    batcher.add(watermark(t0 + 11 * S // 4, stopped=True))
    last = batcher.finish()
    assert windows(last) == [(t0 + 2 * S, t0 + 11 * S // 4)], "the last ends at the stop"
    assert [b.profile.sample_count for b in first + second + last] == [1, 1, 1]
    assert_inside(first + second + last)


def test_a_sample_after_its_window_closed_goes_to_the_next_window_start() -> None:
    batcher, t0 = begun(export_interval_s=1)
    batcher.add(message(1, at=t0 + S // 4, complete=t0 + S))
    assert windows(batcher.ready()) == [(t0, t0 + S)]
    batcher.add(message(1, at=t0 + S // 2, stacks=False))  # late: its window is gone
    (batch,) = batcher.finish()
    (stack,) = batch.profile
    assert stack.timestamps_ns == [t0 + S] and batch.profile.start_ns == t0 + S


def test_max_samples_splits_a_window_at_the_watermark() -> None:
    batcher, t0 = begun(export_interval_s=1, max_samples=4)
    batcher.add(message(3, at=t0, complete=t0 + S // 4))
    batcher.add(message(4, at=t0 + S // 2, stacks=False))  # full: the first 3 go early
    batcher.add(watermark(t0 + 3 * S // 4))  # full again: the next 4 go too
    batches = batcher.ready()
    batcher.add(watermark(t0 + S, stopped=True))
    batches += batcher.finish()
    assert windows(batches) == [(t0, t0 + S // 4), (t0 + S // 4, t0 + 3 * S // 4),
                                (t0 + 3 * S // 4, t0 + S)]
    assert [b.profile.sample_count for b in batches] == [3, 4, 0]
    assert_inside(batches)


def test_a_full_window_is_not_split_for_a_handful_of_complete_samples() -> None:
    """A reader held up by a slow exporter moves the watermark a little at a time:
    a batch per step would cost the exporter a call per sample or two."""
    batcher, t0 = begun(export_interval_s=1, max_samples=4)
    batcher.add(message(4, at=t0 + S // 2, complete=t0 + S // 2 + 500))  # one is complete
    assert batcher.ready() == []
    batcher.add(watermark(t0 + S))
    assert [b.profile.sample_count for b in batcher.ready()] == [4]


def test_a_window_a_split_emptied_joins_the_next_batch() -> None:
    batcher, t0 = begun(export_interval_s=1, max_samples=4)
    batcher.add(message(4, at=t0 + S // 2, complete=t0 + 3 * S // 4))
    batches = batcher.ready()  # full: all four go early, and their window is left empty
    batcher.add(message(1, at=t0 + 3 * S // 2, stacks=False, complete=t0 + 5 * S // 4))
    batches += batcher.ready()  # the emptied window is complete, the next is not
    batcher.add(watermark(t0 + 2 * S))
    batches += batcher.ready()
    assert windows(batches) == [(t0, t0 + 3 * S // 4), (t0 + 3 * S // 4, t0 + 2 * S)]
    assert [b.profile.sample_count for b in batches] == [4, 1]


def test_without_a_watermark_a_full_window_drops_what_cannot_wait() -> None:
    batcher, t0 = begun(export_interval_s=1, max_samples=4)
    batcher.add(message(6, at=t0))
    assert batcher.ready() == [] and batcher.full
    (batch,) = batcher.finish()
    assert batch.profile.sample_count == 4 and batch.dropped == 2


def connection(t: int) -> TcpConnection:
    return TcpConnection(t, t + 5, 42, "app", "client", "closed", 4, "127.0.0.1", 5000,
                         "127.0.0.1", 80, 10, 20, 0)


def test_records_and_totals_go_with_the_next_batch_that_closes() -> None:
    batcher, t0 = begun(export_interval_s=1)
    batcher.add(encode_events([connection(t0), syscall_totals(42, "read", 1)], 1))
    batcher.add(message(1, at=t0 + 3 * S // 2, complete=t0 + 2 * S))
    (batch,) = batcher.ready()
    assert batch.records == [connection(t0)] and len(batch.totals) == 1
    assert batch.profile.sample_count == 1 and batch.profile.processes[42].name == "app"
    batcher.add(encode_events([connection(t0 + 2 * S)], 1))
    batcher.add(watermark(t0 + 3 * S))
    (batch,) = batcher.ready()
    assert windows([batch]) == [(t0 + 2 * S, t0 + 3 * S)], "records do not wait for samples"


def test_windows_without_samples_join_the_next_batch() -> None:
    batcher, t0 = begun(export_interval_s=1)
    batcher.add(watermark(t0 + 3 * S))
    assert batcher.ready() == [], "nothing to send"
    batcher.add(message(1, at=t0 + 5 * S + 1, complete=t0 + 1000 * S))
    batches = batcher.ready()
    assert windows(batches) == [(t0, t0 + 6 * S)], "no gap before the next batch"
    assert_inside(batches)


def test_the_first_window_starts_when_sampling_began() -> None:
    started = time.time_ns() - S // 2  # before the batcher was made
    fresh = fresh_batcher(export_interval_s=1)
    # The probe's first message was lost; the next one says when sampling began too.
    fresh.add(message(1, at=started + 10, complete=started + 20, started=started))
    fresh.add(watermark(started + 30, started=started, stopped=True))
    (batch,) = fresh.finish()
    assert (batch.profile.start_ns, batch.profile.end_ns) == (started, started + 30)


def test_without_cpu_profiling_windows_close_by_the_clock() -> None:
    batcher, _, _ = make_batcher(export_interval_s=0.1, cpu_profiling=False)
    batcher.add(encode_events([connection(time.time_ns())], 1))
    time.sleep(0.25)
    batches = batcher.ready()
    assert len(batches) == 1 and batches[0].profile.end_ns <= time.time_ns()
    assert len(batches[0].records) == 1
    (last,) = batcher.finish()
    assert last.profile.start_ns >= batches[0].profile.end_ns


def test_an_overdue_watermark_lets_the_clock_close_the_window_when_nothing_is_queued() -> None:
    config = EbpfConfig(export_interval_s=1)
    windows_ = Windows(config, 0, watermarked=True)
    window, at = windows_.window(S // 2)
    window.add(42, "app", (), 1, (at,))
    assert windows_.close(S + S // 2, idle=True) == [], "within the grace period"
    assert windows_.close(5 * S, idle=False) == [], "a message waits: it may be the watermark"
    (closed,) = windows_.close(5 * S, idle=True)
    assert (closed.start_ns, closed.end_ns, closed.sample_count) == (0, S, 1)


def test_windows_complete_together_go_as_one_batch() -> None:
    batcher, t0 = begun(export_interval_s=1)
    for k in range(4):  # one sample in each of four windows, all complete at once
        batcher.add(message(1, at=t0 + k * S, stacks=k == 0))
    batcher.add(watermark(t0 + 4 * S))
    batches = batcher.ready()
    assert windows(batches) == [(t0, t0 + 4 * S)]
    assert [b.profile.sample_count for b in batches] == [4]
    assert_inside(batches)
