"""The in-memory exporter and the latest totals it keeps."""

from __future__ import annotations

import pytest
from sample_profiles import batch

from ebpf_stream._model.events import MemoryTotals, SyscallTotals
from ebpf_stream._outputs.memory import LatestTotals
from ebpf_stream.exporters import Exporter, MemoryExporter


@pytest.mark.anyio
async def test_memory_exporter_keeps_batches_and_their_merge() -> None:
    exporter = MemoryExporter()
    assert isinstance(exporter, Exporter)
    assert exporter.profile is None
    first, second = batch(2), batch(3)
    await exporter.export(first)
    await exporter.export(second)
    assert exporter.batches == [first, second]
    merged = exporter.profile
    assert merged is not None
    assert merged.sample_count == 5
    assert [len(s.timestamps_ns) for s in merged] == [5]
    assert first.profile.sample_count == 2
    assert not exporter.closed
    await exporter.aclose()
    assert exporter.closed


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
