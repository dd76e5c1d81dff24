"""Metrics: sampled CPU time per process, and the engine's own counters.

Sampled CPU time uses the semantic-convention name ``process.cpu.time``
(seconds, by ``cpu.mode``), as a delta per export interval: each sample
stands for one sampling period of CPU.  The engine's counters have no
convention, so they live under ``ebpf_stream.*``; they are cumulative since
the profiler started, so a lost request loses no counts.
"""

from __future__ import annotations

import errno
from collections import Counter

from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb

from .._events import CpuSample
from .._overhead import Overhead
from .._profile import FrameKind, ProcessInfo, Profile
from .._stats import Stats
from .attributes import AttributeValue, key_values

DELTA = pb.AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
CUMULATIVE = pb.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE

PROCESS_CPU_TIME = "process.cpu.time"


def point(value: float | int, time_ns: int, start_ns: int = 0,
          attributes: dict[str, AttributeValue] | None = None) -> pb.NumberDataPoint:
    p = pb.NumberDataPoint(time_unix_nano=time_ns, start_time_unix_nano=start_ns,
                           attributes=key_values(attributes or {}))
    if isinstance(value, int):
        p.as_int = value
    else:
        p.as_double = value
    return p


def counter(name: str, unit: str, description: str, points: list[pb.NumberDataPoint], *,
            temporality: pb.AggregationTemporality.ValueType = CUMULATIVE) -> pb.Metric:
    return pb.Metric(name=name, unit=unit, description=description,
                     sum=pb.Sum(data_points=points, aggregation_temporality=temporality,
                                is_monotonic=True))


def gauge(name: str, unit: str, description: str, value: float | int, time_ns: int) -> pb.Metric:
    return pb.Metric(name=name, unit=unit, description=description,
                     gauge=pb.Gauge(data_points=[point(value, time_ns)]))


def _cpu_time(points: list[pb.NumberDataPoint]) -> pb.Metric:
    return counter(PROCESS_CPU_TIME, "s", "CPU time of the process, estimated from samples",
                   points, temporality=DELTA)


def sample_metric(sample: CpuSample, period_ns: int) -> pb.Metric:
    """One sample as ``process.cpu.time``: one period of CPU in the mode it was taken in.

    A lone metric has no resource, so the process is named in the point's
    attributes instead.
    """
    in_kernel = sample.kernel_stack != -errno.EFAULT
    attributes: dict[str, AttributeValue] = {
        "process.pid": sample.pid,
        "process.executable.name": sample.comm,
        "cpu.mode": "system" if in_kernel else "user",
        "cpu.logical_number": sample.cpu,
    }
    start = sample.timestamp_ns - period_ns
    return _cpu_time([point(period_ns / 1e9, sample.timestamp_ns, start, attributes)])


def cpu_time_by_process(profile: Profile) -> dict[ProcessInfo, pb.Metric]:
    """``process.cpu.time`` per process over the profile's interval.

    A sample whose leaf frame is in the kernel counts as ``system`` time.
    """
    # Grouped like the profiles (Profile.process_of), so both name the same resources.
    counts: Counter[tuple[ProcessInfo, str]] = Counter()
    for s in profile:
        in_kernel = bool(s.frames) and s.frames[-1].kind is FrameKind.KERNEL
        counts[profile.process_of(s), "system" if in_kernel else "user"] += s.count
    points: dict[ProcessInfo, list[pb.NumberDataPoint]] = {}
    for (process, mode), count in counts.items():
        points.setdefault(process, []).append(point(
            count * profile.period_ns / 1e9, profile.end_ns, profile.start_ns,
            {"cpu.mode": mode}))
    return {process: _cpu_time(p) for process, p in points.items()}


def engine_metrics(stats: Stats, overhead: Overhead, start_ns: int, now_ns: int) -> list[pb.Metric]:
    """The engine's own counters and cost, as of ``now_ns``."""
    def samples(name: str, description: str, value: int) -> pb.Metric:
        return counter(name, "{sample}", description, [point(value, now_ns, start_ns)])

    dropped = [
        point(value, now_ns, start_ns, {"ebpf_stream.drop.reason": reason})
        for reason, value in (("kernel", stats.dropped_kernel), ("pipeline", stats.dropped_user),
                              ("export", stats.undelivered))
    ]
    return [
        samples("ebpf_stream.samples.received", "Samples read from the kernel", stats.received),
        samples("ebpf_stream.samples.exported", "Samples handed to the exporters", stats.exported),
        counter("ebpf_stream.samples.dropped", "{sample}",
                "Samples lost: kernel ring full, pipeline queue full or over max_samples, "
                "or not delivered by an exporter", dropped),
        samples("ebpf_stream.stacks.lost", "Samples kept without one of their stacks",
                stats.lost_stacks),
        counter("ebpf_stream.export.errors", "{error}", "Exports that failed for good",
                [point(stats.export_errors, now_ns, start_ns)]),
        counter("ebpf_stream.export.rejected", "{item}",
                "Profiles, data points and log records a receiver rejected",
                [point(stats.rejected, now_ns, start_ns)]),
        gauge("ebpf_stream.overhead.cpu.utilization", "1",
              "The profiler's share of the machine's CPU since it started",
              overhead.cpu_percent / 100, now_ns),
        gauge("ebpf_stream.overhead.memory.usage", "By",
              "The profiler's anonymous memory plus its BPF maps", overhead.memory_bytes, now_ns),
    ]
