"""The in-memory exporter."""

from __future__ import annotations

import pytest
from sample_profiles import batch

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
