"""One profiler, several runs, on real BPF: each run starts afresh, and only one runs at a time.

A second run must know nothing of the first: not its failure, not its
counters, not its samples, and the exporters it closed (files, memory, OTLP
to a real receiver) must serve the second run with its samples alone.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import otlp_stacks
import pytest
from anyio.from_thread import start_blocking_portal
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from otlp_json_decode import decode_otlp_json
from otlp_receivers import Receiver, grpc_receiver, http_receiver

from ebpf_stream import Batch, EbpfConfig, EbpfCpuProfiler, ExportError, Profiler, Stats
from ebpf_stream.exporters import (
    FoldedFileExporter,
    MemoryExporter,
    OtlpExporter,
    OtlpJsonFileExporter,
    SpeedscopeFileExporter,
)

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]


def config_for(pid: int) -> EbpfConfig:
    return (EbpfConfig.for_environment("development").with_pids([pid])
            .with_export_interval(0.5).with_sample_rate(99))


class FailsInFirstRun:
    """An exporter whose first run fails, as a full disk would; later runs succeed."""

    def __init__(self) -> None:
        self.runs_closed = 0

    async def export(self, batch: Batch) -> None:
        if not self.runs_closed:
            raise ExportError("disk full")

    async def aclose(self) -> None:
        self.runs_closed += 1


def folded_samples(path: Path) -> int:
    return sum(int(line.rpartition(" ")[2]) for line in path.read_text().splitlines())


def speedscope_samples(path: Path, period_ns: int) -> int:
    profiles = json.loads(path.read_text())["profiles"]
    return sum(sum(p["weights"]) for p in profiles) // period_ns


def json_file_samples(path: Path) -> int:
    requests = [decode_otlp_json(line, ExportProfilesServiceRequest)
                for line in path.read_bytes().splitlines() if b'"resourceProfiles"' in line]
    return sum(otlp_stacks.stacks(requests).values())


def received_samples(receiver: Receiver, after: int) -> int:
    """The samples of the profiles requests that arrived after the first ``after``."""
    requests = [r for r in receiver.requests("profiles")[after:]
                if isinstance(r, ExportProfilesServiceRequest)]
    return sum(otlp_stacks.stacks(requests).values())


def own_cpu_samples(stats: Stats, memory: MemoryExporter) -> int:
    """The run's CPU samples, once checked that ``memory`` holds every sample (CPU
    samples and records) the run received and exported, and nothing of an earlier run."""
    assert memory.profile is not None and memory.closed
    assert stats.received > 20 and stats.dropped == 0 and stats.export_errors == 0
    assert memory.profile.sample_count + len(memory.records) == stats.exported == stats.received
    assert sum(b.sample_count for b in memory.batches) == stats.exported
    return memory.profile.sample_count


@pytest.mark.anyio
async def test_a_run_after_a_failed_run_starts_afresh(running: subprocess.Popen[str],
                                                      tmp_path: Path) -> None:
    memory = MemoryExporter()
    folded = FoldedFileExporter(tmp_path / "out.folded")
    json_file = OtlpJsonFileExporter(tmp_path / "out.otlp.jsonl")
    speedscope = SpeedscopeFileExporter(tmp_path / "out.speedscope.json")
    async with grpc_receiver() as receiver:
        otlp = OtlpExporter(receiver.endpoint, protocol="grpc", environ={})
        profiler = Profiler(config_for(running.pid),
                            [FailsInFirstRun(), memory, folded, json_file, speedscope, otlp])
        with pytest.raises(ExportError, match="disk full"):
            async with profiler:
                await anyio.sleep(1.2)
        first = profiler.stats
        assert first.export_errors > 0 and first.received > 0
        sent_in_first = len(receiver.requests("profiles"))

        async with profiler:  # no stale failure raised at exit
            await anyio.sleep(1.2)
        stats = profiler.stats
        samples = own_cpu_samples(stats, memory)
        assert folded_samples(folded.path) == samples
        assert speedscope_samples(speedscope.path, profiler.config.sample_period_ns) == samples
        assert json_file_samples(json_file.path) == samples
        assert received_samples(receiver, sent_in_first) == samples
        assert stats.undelivered == 0


@pytest.fixture
def http_receiver_in_a_thread() -> Iterator[Receiver]:
    """An OTLP/HTTP receiver on its own event loop, for code that has none."""
    with start_blocking_portal("asyncio") as portal, \
            portal.wrap_async_context_manager(http_receiver()) as receiver:
        yield receiver


def test_sync_api_starts_again_after_stop(http_receiver_in_a_thread: Receiver) -> None:
    receiver = http_receiver_in_a_thread
    memory = MemoryExporter()
    otlp = OtlpExporter(receiver.endpoint, protocol="http/protobuf", environ={})
    profiler = EbpfCpuProfiler(EbpfConfig().with_sample_rate(99).with_export_interval(0.5),
                               [memory, otlp])
    sent_before = 0
    for _ in range(2):  # each start runs on a new event loop
        profiler.start()
        try:
            deadline = time.monotonic() + 1.2
            while time.monotonic() < deadline:
                sum(i * i for i in range(1000))
            overhead = profiler.get_overhead()
        finally:
            profiler.stop()
        stats = profiler.stats
        assert received_samples(receiver, sent_before) == own_cpu_samples(stats, memory)
        assert stats.undelivered == 0
        assert 0 < overhead.cpu_percent < 20 and overhead.bpf_run_count > 0
        sent_before = len(receiver.requests("profiles"))


@pytest.mark.anyio
async def test_entering_a_running_profiler_is_refused(running: subprocess.Popen[str]) -> None:
    memory = MemoryExporter()
    profiler = Profiler(config_for(running.pid), [memory])
    async with profiler:
        with pytest.raises(RuntimeError, match="already running"):
            async with profiler:
                pass
        await anyio.sleep(1.2)  # the run goes on undisturbed
    own_cpu_samples(profiler.stats, memory)

    sync = EbpfCpuProfiler(config_for(running.pid), [MemoryExporter()])
    sync.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            sync.start()
    finally:
        sync.stop()
