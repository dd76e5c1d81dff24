"""The event model: what a totals snapshot supersedes, and the wire encoding."""

from __future__ import annotations

from ebpf_stream._model.events import (
    CpuSample,
    EventMessage,
    LatestTotals,
    LoopTotals,
    MemoryTotals,
    SyscallTotals,
    decode_events,
    encode_events,
    totals_key,
)


def test_each_snapshot_supersedes_only_its_own_counter() -> None:
    loops = [LoopTotals(7, tid, "svc", 1, 10, [1]) for tid in (7, 8)]
    syscalls = [SyscallTotals(7, "svc", name, 1, 0, 10, [1]) for name in ("read", "write")]
    keys = {totals_key(t) for t in [*loops, *syscalls, MemoryTotals(7, "svc", *[0] * 11)]}
    assert len(keys) == 5, "two loops of one process, two syscalls: each its own"
    assert totals_key(LoopTotals(7, 8, "svc", 5, 99, [5])) == totals_key(loops[1])


def test_events_survive_the_wire_in_order() -> None:
    events = [CpuSample(1, 7, 8, 3, "svc", 11, 12, 13, 0), LoopTotals(7, 8, "svc", 1, 10, [1])]
    message = encode_events(events, samples=1)
    assert isinstance(message, EventMessage)
    assert decode_events(message) == events


def test_latest_totals_keep_one_snapshot_per_process_and_syscall() -> None:
    latest = LatestTotals()
    for count in range(1, 1001):  # a long run: the snapshots replace one another
        latest.update([SyscallTotals(7, "svc", "read", count, 0, 10, [1]),
                       SyscallTotals(7, "svc", "write", 2 * count, 0, 10, [1])])
    latest.update([MemoryTotals(8, "db", *[0] * 11)])
    assert [(t.syscall, t.count) for t in latest.of_kind(SyscallTotals)] == [
        ("read", 1000), ("write", 2000)]
    assert [t.pid for t in latest.of_kind(MemoryTotals)] == [8]
    assert len(latest.all()) == 3
