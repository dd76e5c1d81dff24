"""Fanning batches out to several exporters: failures and preparation."""

from __future__ import annotations

import threading

import anyio
import pytest
from sample_profiles import batch

from ebpf_stream._base.errors import ExportError
from ebpf_stream.exporters import Batch, MemoryExporter


@pytest.mark.anyio
async def test_an_exporter_failure_is_logged_counted_and_raised_at_the_end_on_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    from ebpf_stream._base.stats import Stats
    from ebpf_stream._outputs.fanout import FanOut

    class Refusing:
        async def export(self, batch: Batch) -> None:
            raise RuntimeError("UNAVAILABLE: the collector said\n  try again later")

        async def aclose(self) -> None:
            pass

    stats = Stats()
    memory = MemoryExporter()
    with pytest.raises(ExportError) as info:
        async with FanOut([Refusing(), memory], stats) as fanout:
            await fanout.export(batch(1))
    assert str(info.value) == ("export failed: UNAVAILABLE: the collector said try again "
                               "later")
    assert stats.export_errors == 1 and len(memory.batches) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "exporter Refusing failed: UNAVAILABLE: the collector said try again later"]


def test_exporters_prepare_once_per_run_in_a_worker_thread_before_exporting() -> None:
    """What exporting takes loads as the run starts, not at the first export under load."""
    from ebpf_stream._base.stats import Stats
    from ebpf_stream._outputs.fanout import FanOut

    class Preparing(MemoryExporter):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []
            self.prepared_in: list[int] = []

        def prepare(self) -> None:
            self.calls.append("prepare")
            self.prepared_in.append(threading.get_ident())

        async def export(self, batch: Batch) -> None:
            self.calls.append("export")
            await super().export(batch)

    exporter = Preparing()

    async def run() -> None:
        async with FanOut([exporter], Stats()) as fanout:
            await fanout.export(batch(3))
            await fanout.export(batch(3))

    anyio.run(run)
    anyio.run(run)
    assert exporter.calls == ["prepare", "export", "export"] * 2
    assert threading.get_ident() not in exporter.prepared_in
