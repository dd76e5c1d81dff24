"""Metrics: sampled CPU time and traced activity per process, and the engine's own counters.

Sampled CPU time uses the semantic-convention name ``process.cpu.time``
(seconds, by ``cpu.mode``), as a delta per export interval: each sample
stands for one sampling period of CPU.

Syscall, network, memory and event-loop totals are cumulative since tracing
of their series began, as the kernel keeps them, so a lost request loses no
counts.  They use the semantic conventions' names where there are some
(``process.paging.faults``, ``process.memory.usage``, ``process.network.io``)
and ``process.syscall.*``, ``process.tcp.*``, ``process.memory.*`` and
``asyncio.loop.*`` names of the same style where there are none.  Sizes that
go down as well as up are non-monotonic sums (the conventions' UpDownCounter).

The engine's counters have no convention, so they live under
``ebpf_stream.*``; they are cumulative since the run started, and count the
batch they are sent with, so a run's last request carries its final counts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Sequence

from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb

from .._base.overhead import Overhead
from .._base.stats import Stats
from .._model.events import (
    NO_STACK,
    CpuSample,
    LoopTotals,
    MemoryTotals,
    NetworkTotals,
    SyscallTotals,
    Totals,
    totals_key,
)
from .._model.profile import FrameKind, ProcessInfo, Profile
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
            temporality: pb.AggregationTemporality.ValueType = CUMULATIVE,
            monotonic: bool = True) -> pb.Metric:
    return pb.Metric(name=name, unit=unit, description=description,
                     sum=pb.Sum(data_points=points, aggregation_temporality=temporality,
                                is_monotonic=monotonic))


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
    in_kernel = sample.kernel_stack != NO_STACK
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
            count * profile.period_ns / 1e9, profile.end_ns, profile.start_of(process.pid),
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
        samples("ebpf_stream.samples.exported",
                "Samples at least one exporter took, this request's among them", stats.exported),
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
              "Resident memory the profiler adds to its process", overhead.memory_bytes, now_ns),
    ]


# -- traced activity ------------------------------------------------------------

SYSCALL_NAME = "syscall.name"
IO_DIRECTION = "network.io.direction"  # transmit | receive
TCP_ROLE = "tcp.connection.role"  # client (connect) | server (accept)
FAULT_TYPE = "process.paging.fault_type"  # major | minor
MEMORY_TYPE = "process.memory.type"  # anon | file | shmem
MAPPING_OPERATION = "process.memory.mapping.operation"  # mmap | munmap

THREAD_ID = "thread.id"

SYSCALL_DURATION = "process.syscall.duration"
LOOP_BUSY_DURATION = "asyncio.loop.busy.duration"
_DURATION_DESCRIPTIONS = {
    SYSCALL_DURATION: "How long the process's syscalls took",
    LOOP_BUSY_DURATION: "How long the process's asyncio loops ran callbacks between two waits",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Instrument:
    """A cumulative sum's name, unit and description; ``monotonic`` unless it can go down."""

    name: str
    unit: str
    description: str
    monotonic: bool = True

    def metric(self, points: list[pb.NumberDataPoint]) -> pb.Metric:
        return counter(self.name, self.unit, self.description, points, monotonic=self.monotonic)


SYSCALL_COUNT = Instrument("process.syscall.count", "{call}", "Syscalls the process made")
SYSCALL_ERRORS = Instrument("process.syscall.errors", "{call}",
                            "Syscalls the process made that returned an error")
NETWORK_IO = Instrument("process.network.io", "By",
                        "Bytes the process passed through its TCP sockets")
TCP_CONNECTIONS = Instrument("process.tcp.connections", "{connection}",
                             "TCP connections the process opened (client) or accepted (server)")
TCP_CONNECTION_FAILURES = Instrument("process.tcp.connection.failures", "{connection}",
                                     "TCP connects of the process that never established")
TCP_RETRANSMITS = Instrument("process.tcp.retransmits", "{segment}",
                             "TCP segments the kernel retransmitted for the process")
TCP_RESETS = Instrument("process.tcp.resets", "{reset}",
                        "TCP resets the process's connections sent or received")
PAGING_FAULTS = Instrument("process.paging.faults", "{fault}", "Page faults the process made")
MEMORY_USAGE = Instrument("process.memory.usage", "By",
                          "Resident memory of the process (anonymous, file and shared)",
                          monotonic=False)
MEMORY_RESIDENT = Instrument("process.memory.resident", "By",
                             "Resident memory of the process, by type", monotonic=False)
MEMORY_SWAP = Instrument("process.memory.swap", "By", "Memory of the process swapped out",
                         monotonic=False)
MAPPING_CALLS = Instrument("process.memory.mapping.calls", "{call}",
                           "mmap and munmap calls of the process")
MAPPING_SIZE = Instrument("process.memory.mapping.size", "By",
                          "Bytes the process mapped (mmap) and unmapped (munmap)")
HEAP_GROWTH = Instrument("process.memory.heap.growth", "By",
                         "Net bytes the process's heap grew by through brk", monotonic=False)

Observation = tuple[Instrument, int, dict[str, AttributeValue]]


def _observations(totals: Totals) -> list[Observation]:
    """The sums one totals snapshot holds, as (instrument, value, attributes)."""
    if isinstance(totals, SyscallTotals):
        name: dict[str, AttributeValue] = {SYSCALL_NAME: totals.syscall}
        return [(SYSCALL_COUNT, totals.count, name), (SYSCALL_ERRORS, totals.errors, name)]
    if isinstance(totals, NetworkTotals):
        return [
            (NETWORK_IO, totals.bytes_sent, {IO_DIRECTION: "transmit"}),
            (NETWORK_IO, totals.bytes_received, {IO_DIRECTION: "receive"}),
            (TCP_CONNECTIONS, totals.connects, {TCP_ROLE: "client"}),
            (TCP_CONNECTIONS, totals.accepts, {TCP_ROLE: "server"}),
            (TCP_CONNECTION_FAILURES, totals.failed_connects, {}),
            (TCP_RETRANSMITS, totals.retransmits, {}),
            (TCP_RESETS, totals.resets_sent, {IO_DIRECTION: "transmit"}),
            (TCP_RESETS, totals.resets_received, {IO_DIRECTION: "receive"}),
        ]
    if isinstance(totals, MemoryTotals):
        return _memory_observations(totals)
    return []  # a loop's totals are its busy-duration histogram alone


def _memory_observations(totals: MemoryTotals) -> list[Observation]:
    observations: list[Observation] = [
        (PAGING_FAULTS, totals.minor_faults, {FAULT_TYPE: "minor"}),
        (PAGING_FAULTS, totals.major_faults, {FAULT_TYPE: "major"}),
        (MAPPING_CALLS, totals.mmap_calls, {MAPPING_OPERATION: "mmap"}),
        (MAPPING_CALLS, totals.munmap_calls, {MAPPING_OPERATION: "munmap"}),
        (MAPPING_SIZE, totals.mmap_bytes, {MAPPING_OPERATION: "mmap"}),
        (MAPPING_SIZE, totals.munmap_bytes, {MAPPING_OPERATION: "munmap"}),
        (HEAP_GROWTH, totals.brk_growth, {}),
    ]
    resident = {"anon": totals.rss_anon, "file": totals.rss_file, "shmem": totals.rss_shmem}
    if any(resident.values()):  # all 0 until the kernel reports a change: unknown, not empty
        observations.append((MEMORY_USAGE, sum(resident.values()), {}))
        observations += [(MEMORY_RESIDENT, size, {MEMORY_TYPE: kind})
                         for kind, size in resident.items()]
        observations.append((MEMORY_SWAP, totals.rss_swap, {}))
    return observations


@functools.cache
def duration_bounds(buckets: int) -> tuple[float, ...]:
    """Explicit bounds, in seconds, at 2**1 .. 2**(buckets-1) ns.

    The kernel's bucket ``i`` holds calls of ``[2**i, 2**(i+1))`` ns, so it
    is OTLP bucket ``i`` (whose upper bound is ``2**(i+1)`` ns) one for one;
    only a call of exactly a power of two nanoseconds sits on the other side
    of a bound, as OTLP bounds are inclusive.
    """
    return tuple(2 ** (i + 1) / 1e9 for i in range(buckets - 1))


def _duration_point(totals: Totals, start_ns: int,
                    time_ns: int) -> tuple[str, pb.HistogramDataPoint] | None:
    """The duration histogram a totals snapshot feeds, and its point; None if none."""
    attributes: dict[str, AttributeValue]
    if isinstance(totals, SyscallTotals):
        name, attributes = SYSCALL_DURATION, {SYSCALL_NAME: totals.syscall}
    elif isinstance(totals, LoopTotals):
        name, attributes = LOOP_BUSY_DURATION, {THREAD_ID: totals.tid}
    else:
        return None
    # The count is the buckets' sum, which OTLP requires: a snapshot of a
    # per-CPU map taken while a call is being counted may be one call apart.
    return name, pb.HistogramDataPoint(
        attributes=key_values(attributes),
        start_time_unix_nano=start_ns, time_unix_nano=time_ns,
        count=sum(totals.buckets), sum=totals.duration_ns / 1e9,
        bucket_counts=totals.buckets, explicit_bounds=duration_bounds(len(totals.buckets)))


def totals_metrics(totals: Sequence[tuple[Totals, int]], time_ns: int) -> list[pb.Metric]:
    """The metrics of one process's totals, each given with its series' start time."""
    points: dict[Instrument, list[pb.NumberDataPoint]] = {}
    durations: dict[str, list[pb.HistogramDataPoint]] = {}
    for t, start_ns in totals:
        for instrument, value, attributes in _observations(t):
            points.setdefault(instrument, []).append(point(value, time_ns, start_ns, attributes))
        duration = _duration_point(t, start_ns, time_ns)
        if duration is not None:
            durations.setdefault(duration[0], []).append(duration[1])
    metrics = [instrument.metric(p) for instrument, p in points.items()]
    metrics += [pb.Metric(name=name, unit="s", description=_DURATION_DESCRIPTIONS[name],
                          histogram=pb.Histogram(data_points=p, aggregation_temporality=CUMULATIVE))
                for name, p in durations.items()]
    return metrics


class SeriesStarts:
    """The start time of each cumulative series: when tracing of it began.

    A series first seen in a batch was not in the previous batch's snapshot,
    so it began after that batch started (the first batch starts before
    tracing does).  The start is kept while the series keeps coming, so
    every point of a series carries the same one, as cumulative points must.
    Series of processes long gone are forgotten, least recently seen first.
    """

    LIMIT = 1 << 16  # series kept; pids churn, and the kernel maps are bounded anyway

    def __init__(self) -> None:
        self._starts: dict[tuple[str, int, str], int] = {}
        self._previous_batch_ns: int | None = None

    def of(self, totals: Sequence[Totals], batch_start_ns: int) -> list[int]:
        """The start time of each of ``totals``, from a batch that began at ``batch_start_ns``."""
        since = self._previous_batch_ns if self._previous_batch_ns is not None else batch_start_ns
        self._previous_batch_ns = batch_start_ns
        starts = []
        for t in totals:
            key = totals_key(t)
            start = self._starts.pop(key, since)
            self._starts[key] = start  # re-inserted: the dict is ordered by last sight
            starts.append(start)
        while len(self._starts) > self.LIMIT:
            del self._starts[next(iter(self._starts))]
        return starts
