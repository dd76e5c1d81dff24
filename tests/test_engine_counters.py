"""The engine's own counters, as sent, agree with the run's summary and with the files.

Each request that carries a batch carries the ``ebpf_stream.*`` counters as
of that batch, the batch included, so the last request of a run holds the
run's final counts: those of ``Profiler.stats`` (the command's summary line)
and of the samples in every output.  Checked on real BPF, through a real
OTLP/gRPC receiver and the OTLP/JSON file, with and without kernel drops.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import msgspec
import otlp_stacks
import pytest
from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from otlp_json_decode import decode_otlp_json
from otlp_receivers import grpc_receiver

from ebpf_stream import Batch, EbpfConfig, Exporter, OverflowPolicy, Profiler, Stats
from ebpf_stream.exporters import FoldedFileExporter, OtlpExporter, OtlpJsonFileExporter

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]


def engine_counters(request: Message) -> dict[str, int] | None:
    """The request's ``ebpf_stream.*`` sums, the drops by reason; None if it has none."""
    assert isinstance(request, ExportMetricsServiceRequest)
    found: dict[str, int] = {}
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if not metric.name.startswith("ebpf_stream.") or not metric.HasField("sum"):
                    continue
                for p in metric.sum.data_points:
                    reason = [a.value.string_value for a in p.attributes
                              if a.key == "ebpf_stream.drop.reason"]
                    found[".".join([metric.name, *reason])] = p.as_int
    return found or None


def expected(stats: Stats) -> dict[str, int]:
    """``stats`` as the engine's metrics name them."""
    return {
        "ebpf_stream.samples.received": stats.received,
        "ebpf_stream.samples.exported": stats.exported,
        "ebpf_stream.samples.dropped.kernel": stats.dropped_kernel,
        "ebpf_stream.samples.dropped.pipeline": stats.dropped_user,
        "ebpf_stream.samples.dropped.export": stats.undelivered,
        "ebpf_stream.stacks.lost": stats.lost_stacks,
        "ebpf_stream.export.errors": stats.export_errors,
        "ebpf_stream.export.rejected": stats.rejected,
    }


def samples_of(request: Message) -> int:
    assert isinstance(request, ExportProfilesServiceRequest)
    return sum(otlp_stacks.stacks([request]).values())


class SlowExporter:
    """Holds the pipeline up, so that the kernel's ring fills."""

    async def export(self, batch: Batch) -> None:
        await anyio.sleep(0.5)

    async def aclose(self) -> None:
        pass


CASES = {
    "plain": ({}, False),
    "kernel-ring-full": (dict(sample_rate_hz=1000, ring_buffer_bytes=4096,
                              export_interval_s=0.1, channel_capacity=1, max_samples=50,
                              overflow_policy=OverflowPolicy.BLOCK), True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.anyio
async def test_last_counters_sent_are_the_runs_summary(
        running: subprocess.Popen[str], tmp_path: Path, case: str) -> None:
    changes, slow = CASES[case]
    config = msgspec.structs.replace(
        EbpfConfig.for_environment("development").with_pids([running.pid])
        .with_export_interval(0.5).with_sample_rate(99), **changes)
    folded = FoldedFileExporter(tmp_path / "out.folded")
    json_file = OtlpJsonFileExporter(tmp_path / "out.otlp.jsonl")
    async with grpc_receiver() as receiver:
        otlp = OtlpExporter(receiver.endpoint, protocol="grpc", environ={})
        exporters: list[Exporter] = [otlp, json_file, folded,
                                     *([SlowExporter()] if slow else [])]
        async with Profiler(config, exporters, shutdown_timeout=30) as profiler:
            await anyio.sleep(2)
        stats = profiler.stats
        sent = [c for c in map(engine_counters, receiver.requests("metrics")) if c]
        delivered = sum(map(samples_of, receiver.requests("profiles")))

    assert stats.received > 50 and stats.export_errors == 0
    assert (stats.dropped_kernel > 0) == slow
    # The CPU probe's samples only: every one received is exported or dropped on the way.
    assert stats.received == stats.exported + stats.dropped_user
    assert sent and sent[-1] == expected(stats)
    folded_samples = sum(int(line.rpartition(" ")[2])
                         for line in folded.path.read_text().splitlines())
    assert delivered == folded_samples == stats.exported

    # In the file, every metrics line counts the samples of the lines before it, its
    # batch's profiles included.
    written = 0
    in_file = []
    for line in json_file.path.read_bytes().splitlines():
        if b'"resourceProfiles"' in line:
            written += samples_of(decode_otlp_json(line, ExportProfilesServiceRequest))
        elif (counters := engine_counters(
                decode_otlp_json(line, ExportMetricsServiceRequest))) is not None:
            assert counters["ebpf_stream.samples.exported"] == written
            in_file.append(counters)
    assert written == stats.exported and in_file[-1] == expected(stats)
