"""Export windows on real BPF: every sample lies in its profile's window, and the
windows of a run tile it, in every exporter.

A CPU-bound process is profiled over several short intervals; the profiles are read
back from the OTLP/JSON file (with protobuf's strict parser), from a real gRPC
receiver and from the pprof file.
"""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import cast

import anyio
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from otlp_receivers import grpc_receiver
from otlp_stacks import resource_attributes

from ebpf_stream import EbpfConfig, Exporter, Profiler
from ebpf_stream._convert import pprof_pb2 as pprof
from ebpf_stream.exporters import (
    MemoryExporter,
    OtlpExporter,
    OtlpJsonFileExporter,
    PprofFileExporter,
)

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]

Window = tuple[int, int]  # [start, end) in wall-clock ns


def windows_of(requests: list[ExportProfilesServiceRequest],
               ) -> dict[int, list[tuple[Window, list[int]]]]:
    """pid -> [(window, sample timestamps)] of its ``samples`` profiles, in arrival order."""
    out: dict[int, list[tuple[Window, list[int]]]] = defaultdict(list)
    for request in requests:
        strings = request.dictionary.string_table
        for rp in request.resource_profiles:
            pid = int(resource_attributes(rp.resource)["process.pid"])  # type: ignore[call-overload]
            for sp in rp.scope_profiles:
                for p in sp.profiles:
                    if strings[p.sample_type.type_strindex] == "samples":
                        stamps = [t for s in p.samples for t in s.timestamps_unix_nano]
                        window = (p.time_unix_nano, p.time_unix_nano + p.duration_nano)
                        out[pid].append((window, stamps))
    return out


def misplaced(windows: list[tuple[Window, list[int]]]) -> int:
    """Samples outside their own profile's window."""
    return sum(not start <= t < end for (start, end), stamps in windows for t in stamps)


def gaps_and_overlaps(windows: list[Window]) -> list[tuple[Window, Window]]:
    """Consecutive windows that do not meet exactly."""
    return [(a, b) for a, b in itertools.pairwise(windows) if a[1] != b[0]]


def read_json_lines(path: Path) -> list[ExportProfilesServiceRequest]:
    requests = []
    for line in path.read_text().splitlines():
        if "resourceProfiles" in json.loads(line):
            requests.append(json_format.Parse(line, ExportProfilesServiceRequest()))
    return requests


# Busy for 50 ms a second: most export windows hold none of its samples.
BURSTS = ("import time\nwhile True:\n    end = time.process_time() + 0.05\n"
          "    while time.process_time() < end: pass\n    time.sleep(0.95)\n")


@pytest.mark.parametrize("max_samples", [20_000, 16], ids=["by-interval", "max-samples"])
@pytest.mark.anyio
async def test_samples_lie_in_their_windows_and_windows_tile_the_run(
        running: subprocess.Popen[str], tmp_path: Path, max_samples: int) -> None:
    bursts = subprocess.Popen([sys.executable, "-c", BURSTS])
    try:
        await profile_and_check(running.pid, bursts.pid, tmp_path, max_samples)
    finally:
        bursts.kill()
        bursts.wait()


async def profile_and_check(busy: int, bursty: int, tmp_path: Path, max_samples: int) -> None:
    config = (EbpfConfig.for_environment("development").with_pids([busy, bursty])
              .with_sample_rate(99).with_export_interval(0.4).with_max_samples(max_samples))
    json_path, pprof_path = tmp_path / "run.otlp.jsonl", tmp_path / "run.pb.gz"
    memory = MemoryExporter()
    async with grpc_receiver() as receiver:
        exporters: list[Exporter] = [
            memory, OtlpJsonFileExporter(json_path), PprofFileExporter(pprof_path),
            OtlpExporter(receiver.endpoint, protocol="grpc")]
        before_start = time.time_ns()
        async with Profiler(config, exporters) as profiler:
            after_start = time.time_ns()
            await anyio.sleep(2.2)
            before_stop = time.time_ns()
        after_stop = time.time_ns()
        received = cast(list[ExportProfilesServiceRequest], receiver.requests("profiles"))
    exported = profiler.stats.exported
    assert exported > 40, profiler.stats

    batches = [(b.profile.start_ns, b.profile.end_ns) for b in memory.batches]
    assert gaps_and_overlaps(batches) == []
    assert before_start <= batches[0][0] <= after_start, "the first window starts at the start"
    assert before_stop <= batches[-1][1] <= after_stop, "the last window ends at the stop"
    assert sum(b.profile.sample_count for b in memory.batches) == exported
    if max_samples < 100:
        assert max(b.profile.sample_count for b in memory.batches) <= max_samples
        assert len(batches) > 2.2 / 0.4 + 2, "full windows are split"

    for name, requests in [("json", read_json_lines(json_path)), ("grpc", received)]:
        by_pid = windows_of(requests)
        assert set(by_pid) == {busy, bursty}, name
        total = 0
        for pid, windows in by_pid.items():
            total += sum(len(stamps) for _, stamps in windows)
            assert (name, pid, misplaced(windows)) == (name, pid, 0)
            # Each process's profiles meet too, over batches it was not sampled in.
            assert gaps_and_overlaps([w for w, _ in windows]) == [], (name, pid)
            assert windows[0][0][0] == batches[0][0], (name, pid)
        assert len(by_pid[bursty]) < len(batches), "some batches hold no bursts"
        assert by_pid[busy][-1][0][1] == batches[-1][1], name
        assert total == exported, name

    out = pprof.Profile()
    out.ParseFromString(gzip.decompress(pprof_path.read_bytes()))
    assert (out.time_nanos, out.time_nanos + out.duration_nanos) == (batches[0][0],
                                                                   batches[-1][1])
    assert sum(s.value[0] for s in out.sample) == exported
