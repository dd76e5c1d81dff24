"""Traced data in OTLP: syscall, network, memory and event-loop totals as metrics, discrete
events (loop stalls among them) as logs.

Batches are built by hand, converted, and what comes out is checked exactly (names, units,
values, attributes, temporality, histogram buckets, log attributes); then the same batch goes
through real gRPC and HTTP receivers and through an OTLP/JSON file.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from google.protobuf.message import Message
from mock_transport import MockTransport
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceResponse,
)
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from otlp_json_decode import decode_otlp_json
from otlp_receivers import Receiver, grpc_receiver, http_receiver
from otlp_stacks import resource_attributes as attributes
from sample_frames import (
    EVAL,
    EXT4,
    HANDLE_RUN,
    HANDLER,
    HANDLER_LATER,
    MAIN,
    PERIOD,
    READ,
    RUN_ONCE,
    START,
    WORK,
    native,
    python,
)
from sample_profiles import CHECKOUT, HEALTH, ITEM

from ebpf_stream._base.errors import ExportError
from ebpf_stream._base.otlp_settings import Protocol, Signal, otlp_endpoints
from ebpf_stream._convert.converter import BatchRequests, EventConverter
from ebpf_stream._convert.logs import STALL_FRAMES, STALL_STACKS
from ebpf_stream._model.batch import Batch, SlowCall, Stall, StallStack, TraceRecord
from ebpf_stream._model.events import (
    LoopStall,
    LoopTotals,
    MemoryTotals,
    NetworkTotals,
    OomKill,
    SlowSyscall,
    SyscallTotals,
    TcpConnection,
    Totals,
)
from ebpf_stream._model.profile import ProcessInfo, Profile
from ebpf_stream._outputs.otlp.exporter import OtlpExporter
from ebpf_stream._outputs.otlp.json_file import OtlpJsonFileExporter
from ebpf_stream._outputs.otlp.transport import DeliveryError

pytestmark = pytest.mark.anyio

INTERVAL = 1_000_000_000
APP = ProcessInfo(10, "app", "app", "/usr/bin/app --serve")
DB = ProcessInfo(20, "db", "postgres", "postgres -D /data")
GONE_PID = 30  # not in profile.processes: a process that exited before it was described
CUMULATIVE = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
BUCKETS = 32

READS = SyscallTotals(10, "app", "read", count=7, errors=2, duration_ns=9_300,
                      buckets=[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 2] + [0] * (BUCKETS - 12))
OPENS = SyscallTotals(10, "app", "openat", count=3, errors=0, duration_ns=3_000_000_000,
                      buckets=[0] * (BUCKETS - 1) + [3])
APP_NET = NetworkTotals(10, "app", bytes_sent=1000, bytes_received=25_000, connects=3,
                        accepts=1, failed_connects=1, retransmits=4, resets_sent=2,
                        resets_received=5)
DB_MEMORY = MemoryTotals(20, "db", minor_faults=300, major_faults=2, rss_anon=4096 * 10,
                         rss_file=4096 * 20, rss_shmem=4096, rss_swap=8192, mmap_calls=6,
                         mmap_bytes=1 << 20, munmap_calls=2, munmap_bytes=1 << 16,
                         brk_growth=-4096)
# The loop thread 10 had 5 busy periods: 2 in [2**26, 2**27) ns and 3 in [2**28, 2**29) ns.
LOOP = LoopTotals(10, 10, "app", count=5, duration_ns=1_500_000_000,
                  buckets=[0] * 26 + [2, 0, 3] + [0] * (BUCKETS - 29))
FRESH_MEMORY = MemoryTotals(GONE_PID, "short", minor_faults=1, major_faults=0, rss_anon=0,
                            rss_file=0, rss_shmem=0, rss_swap=0, mmap_calls=0, mmap_bytes=0,
                            munmap_calls=0, munmap_bytes=0, brk_growth=0)

CLIENT = TcpConnection(START + 100, START + 250_000_100, 10, "app", "client", "closed", 4,
                       "10.0.0.1", 40000, "10.0.0.2", 443, 1200, 34000, 1)
SERVER = TcpConnection(START + 200, START + 300, 20, "db", "server", "reset", 6, "::1", 5432,
                       "::1", 51000, 0, 17, 0)
SLOW = SlowCall(SlowSyscall(START + 500, 10, 11, "app-worker", "read", 25_000_000,
                            -errno.EAGAIN, [1, 2], [3, 4]),
                (MAIN, WORK, READ, EXT4))
# Slept 300.1 ms in handler line 3 (sampled 3 times there), sampled once in line 4.
STALL = Stall(LoopStall(START + 700, 10, 10, "app", busy_since=12345, duration_ns=301_000_000),
              (StallStack((MAIN, EVAL, RUN_ONCE, HANDLE_RUN, HANDLER), 3, 300_100_000),
               StallStack((MAIN, RUN_ONCE, HANDLE_RUN, HANDLER_LATER, EVAL), 1, 0)))
OOM = OomKill(START + 900, 20, "db", total_vm=1 << 30, anon_rss=1 << 29, file_rss=1 << 20,
              shmem_rss=0, oom_score_adj=500)


def make_batch(start_ns: int = START, *, totals: list[Totals] | None = None,
               records: list[TraceRecord] | None = None, samples: int = 3) -> Batch:
    profile = Profile(period_ns=PERIOD, start_ns=start_ns, end_ns=start_ns + INTERVAL,
                      processes={10: APP, 20: DB})
    if samples:
        profile.add(10, "app", (MAIN, WORK), samples, [start_ns + i for i in range(samples)])
    return Batch(profile,
                 records=[CLIENT, SERVER, SLOW, STALL, OOM] if records is None else records,
                 totals=[READS, OPENS, APP_NET, LOOP, DB_MEMORY, FRESH_MEMORY] if totals is None
                 else totals)


def convert(batch: Batch, converter: EventConverter | None = None) -> BatchRequests:
    return (converter or EventConverter(resource_attributes={})).convert_batch(batch)


Metrics = dict[tuple[int, str], metrics_pb2.Metric]


def metrics_by_pid(request: ExportMetricsServiceRequest) -> Metrics:
    out: Metrics = {}
    for rm in request.resource_metrics:
        pid = int(attributes(rm.resource)["process.pid"])  # type: ignore[call-overload]
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                assert (pid, metric.name) not in out, "one metric per name and resource"
                out[pid, metric.name] = metric
    return out


def values(metric: metrics_pb2.Metric) -> dict[tuple[tuple[str, object], ...], int]:
    """{point attributes: value} of a sum, checking it is cumulative."""
    assert metric.sum.aggregation_temporality == CUMULATIVE
    return {tuple(sorted(attributes(p).items())): p.as_int for p in metric.sum.data_points}


def logs_by_pid(request: ExportLogsServiceRequest) -> list[tuple[int, logs_pb2.LogRecord]]:
    return [(int(attributes(rl.resource)["process.pid"]), record)  # type: ignore[call-overload]
            for rl in request.resource_logs for sl in rl.scope_logs for record in sl.log_records]


def record_named(request: ExportLogsServiceRequest, event_name: str,
                 pid: int) -> dict[str, object]:
    (record,) = [r for p, r in logs_by_pid(request) if r.event_name == event_name and p == pid]
    return attributes(record)


# -- metrics -----------------------------------------------------------------------------------


def test_syscall_counts_and_errors_per_process_and_syscall() -> None:
    metrics = metrics_by_pid(convert(make_batch()).metrics)
    count, errors = metrics[10, "process.syscall.count"], metrics[10, "process.syscall.errors"]
    assert (count.unit, errors.unit) == ("{call}", "{call}")
    assert count.sum.is_monotonic and errors.sum.is_monotonic
    assert values(count) == {(("syscall.name", "read"),): 7, (("syscall.name", "openat"),): 3}
    assert values(errors) == {(("syscall.name", "read"),): 2, (("syscall.name", "openat"),): 0}
    for p in count.sum.data_points:
        assert (p.start_time_unix_nano, p.time_unix_nano) == (START, START + INTERVAL)


def test_syscall_duration_histogram_maps_the_log2_buckets_exactly() -> None:
    metric = metrics_by_pid(convert(make_batch()).metrics)[10, "process.syscall.duration"]
    assert metric.unit == "s"
    assert metric.histogram.aggregation_temporality == CUMULATIVE
    points = {attributes(p)["syscall.name"]: p for p in metric.histogram.data_points}
    read, openat = points["read"], points["openat"]
    assert list(read.explicit_bounds) == [2 ** i / 1e9 for i in range(1, BUCKETS)]
    assert list(read.bucket_counts) == READS.buckets
    # Bucket 10 holds [1024, 2048) ns: OTLP's (bounds[9], bounds[10]] = (1024, 2048] ns.
    assert (read.explicit_bounds[9], read.explicit_bounds[10]) == (1024e-9, 2048e-9)
    assert (read.count, read.sum) == (7, 9_300 / 1e9)
    assert (openat.count, openat.sum, openat.bucket_counts[-1]) == (3, 3.0, 3)
    assert (read.start_time_unix_nano, read.time_unix_nano) == (START, START + INTERVAL)


def test_loop_busy_histogram_per_thread_with_the_syscall_bounds() -> None:
    other = LoopTotals(10, 14, "app", count=1, duration_ns=2_000,
                       buckets=[0] * 10 + [1] + [0] * (BUCKETS - 11))
    metrics = metrics_by_pid(convert(make_batch(totals=[LOOP, other, READS])).metrics)
    metric = metrics[10, "asyncio.loop.busy.duration"]
    assert metric.unit == "s"
    assert metric.histogram.aggregation_temporality == CUMULATIVE
    assert [attributes(p) for p in metric.histogram.data_points] == [
        {"thread.id": 10}, {"thread.id": 14}]
    points = {attributes(p)["thread.id"]: p for p in metric.histogram.data_points}
    loop = points[10]
    assert list(loop.explicit_bounds) == list(
        metrics[10, "process.syscall.duration"].histogram.data_points[0].explicit_bounds)
    assert list(loop.bucket_counts) == LOOP.buckets
    assert (loop.count, loop.sum) == (5, 1.5)
    assert (points[14].count, points[14].sum, points[14].bucket_counts[10]) == (1, 2e-6, 1)
    assert (loop.start_time_unix_nano, loop.time_unix_nano) == (START, START + INTERVAL)
    # A loop's totals are a histogram and nothing else.
    assert {name for pid, name in metrics if pid == 10} == {
        "process.cpu.time", "process.syscall.count", "process.syscall.errors",
        "process.syscall.duration", "asyncio.loop.busy.duration"}


def test_network_totals() -> None:
    metrics = metrics_by_pid(convert(make_batch()).metrics)
    io = metrics[10, "process.network.io"]
    assert io.unit == "By" and io.sum.is_monotonic
    assert values(io) == {(("network.io.direction", "transmit"),): 1000,
                          (("network.io.direction", "receive"),): 25_000}
    assert values(metrics[10, "process.tcp.connections"]) == {
        (("tcp.connection.role", "client"),): 3, (("tcp.connection.role", "server"),): 1}
    assert values(metrics[10, "process.tcp.connection.failures"]) == {(): 1}
    assert values(metrics[10, "process.tcp.retransmits"]) == {(): 4}
    assert values(metrics[10, "process.tcp.resets"]) == {
        (("network.io.direction", "transmit"),): 2, (("network.io.direction", "receive"),): 5}
    assert metrics[10, "process.tcp.connections"].unit == "{connection}"


def test_memory_totals() -> None:
    metrics = metrics_by_pid(convert(make_batch()).metrics)
    faults = metrics[20, "process.paging.faults"]
    assert faults.unit == "{fault}" and faults.sum.is_monotonic
    assert values(faults) == {(("process.paging.fault_type", "minor"),): 300,
                              (("process.paging.fault_type", "major"),): 2}
    usage = metrics[20, "process.memory.usage"]
    assert usage.unit == "By" and not usage.sum.is_monotonic
    assert values(usage) == {(): 4096 * 31}
    assert values(metrics[20, "process.memory.resident"]) == {
        (("process.memory.type", "anon"),): 4096 * 10,
        (("process.memory.type", "file"),): 4096 * 20,
        (("process.memory.type", "shmem"),): 4096}
    assert values(metrics[20, "process.memory.swap"]) == {(): 8192}
    assert values(metrics[20, "process.memory.mapping.calls"]) == {
        (("process.memory.mapping.operation", "mmap"),): 6,
        (("process.memory.mapping.operation", "munmap"),): 2}
    assert values(metrics[20, "process.memory.mapping.size"]) == {
        (("process.memory.mapping.operation", "mmap"),): 1 << 20,
        (("process.memory.mapping.operation", "munmap"),): 1 << 16}
    growth = metrics[20, "process.memory.heap.growth"]
    assert not growth.sum.is_monotonic and values(growth) == {(): -4096}


def test_resident_sizes_are_left_out_until_the_kernel_reports_one() -> None:
    metrics = metrics_by_pid(convert(make_batch()).metrics)
    names = {name for pid, name in metrics if pid == GONE_PID}
    assert names == {"process.paging.faults", "process.memory.mapping.calls",
                     "process.memory.mapping.size", "process.memory.heap.growth"}


def test_one_resource_per_process_carries_its_cpu_time_and_totals() -> None:
    request = convert(make_batch()).metrics
    resources = [attributes(rm.resource) for rm in request.resource_metrics]
    assert sorted(r["process.pid"] for r in resources) == [10, 20, GONE_PID]  # type: ignore[type-var]
    app = next(r for r in resources if r["process.pid"] == 10)
    assert app["process.command_line"] == "/usr/bin/app --serve"
    gone = next(r for r in resources if r["process.pid"] == GONE_PID)
    assert gone["service.name"] == "unknown_service:short"
    names = {name for pid, name in metrics_by_pid(request) if pid == 10}
    assert {"process.cpu.time", "process.syscall.count", "process.network.io"} <= names


def test_series_start_when_they_are_first_seen_and_keep_it() -> None:
    converter = EventConverter(resource_attributes={})
    later = START + INTERVAL
    convert(make_batch(totals=[READS]), converter)
    second = metrics_by_pid(convert(make_batch(later, totals=[READS, APP_NET]), converter).metrics)
    third = metrics_by_pid(convert(make_batch(later + INTERVAL, totals=[READS, APP_NET]),
                                   converter).metrics)

    def starts(metrics: Metrics, name: str) -> set[int]:
        data = metrics[10, name]
        points = data.sum.data_points if data.HasField("sum") else data.histogram.data_points
        return {p.start_time_unix_nano for p in points}

    # READS was in the first batch; APP_NET first came in the second, so it began after the
    # first batch's snapshot, which was taken after the first batch started.
    assert starts(second, "process.syscall.count") == starts(third, "process.syscall.count") == {
        START}
    assert starts(third, "process.syscall.duration") == {START}
    assert starts(second, "process.network.io") == starts(third, "process.network.io") == {
        START}
    fresh = metrics_by_pid(convert(make_batch(later + 2 * INTERVAL, totals=[READS, OPENS]),
                                   converter).metrics)
    assert {attributes(p)["syscall.name"]: p.start_time_unix_nano
            for p in fresh[10, "process.syscall.count"].sum.data_points} == {
        "read": START, "openat": later + INTERVAL}


def test_batch_without_traced_data_has_no_logs_and_only_cpu_metrics() -> None:
    converted = convert(make_batch(totals=[], records=[]))
    assert converted.logs.ListFields() == []
    assert {name for _, name in metrics_by_pid(converted.metrics)} == {"process.cpu.time"}
    empty = convert(make_batch(totals=[], records=[], samples=0))
    assert [r.ListFields() for r in (empty.profiles, empty.metrics, empty.logs)] == [[], [], []]


# -- logs --------------------------------------------------------------------------------------


def test_closed_connections_are_log_records_with_both_endpoints() -> None:
    logs = convert(make_batch()).logs
    client = record_named(logs, "tcp.connection.closed", 10)
    assert client == {
        "network.transport": "tcp", "network.type": "ipv4",
        "network.local.address": "10.0.0.1", "network.local.port": 40000,
        "network.peer.address": "10.0.0.2", "network.peer.port": 443,
        "tcp.connection.role": "client", "tcp.connection.outcome": "closed",
        "tcp.connection.duration": 0.25, "tcp.connection.bytes_sent": 1200,
        "tcp.connection.bytes_received": 34000, "tcp.connection.retransmits": 1,
    }
    server = record_named(logs, "tcp.connection.closed", 20)
    assert (server["network.type"], server["network.peer.port"], server["tcp.connection.outcome"],
            server["tcp.connection.role"]) == ("ipv6", 51000, "reset", "server")
    records = {r.time_unix_nano: r for _, r in logs_by_pid(logs)}
    assert records[CLIENT.end_ns].severity_number == logs_pb2.SeverityNumber.SEVERITY_NUMBER_INFO
    assert records[SERVER.end_ns].body.string_value.startswith(
        "TCP server [::1]:5432 -> [::1]:51000 reset")


def test_slow_syscalls_carry_errno_thread_and_stack() -> None:
    logs = convert(make_batch()).logs
    slow = record_named(logs, "syscall.slow", 10)
    assert slow == {
        "syscall.name": "read", "syscall.duration": 0.025, "syscall.return_value": -errno.EAGAIN,
        "error.type": "EAGAIN", "thread.id": 11, "thread.name": "app-worker",
        "code.stacktrace": "main (/usr/bin/app)\nwork (/usr/bin/app)\n"
                           "vfs_read ([kernel.kallsyms])\next4_file_read_iter (ext4)",
    }
    (record,) = [r for _, r in logs_by_pid(logs) if r.event_name == "syscall.slow"]
    assert record.time_unix_nano == SLOW.call.timestamp_ns
    assert record.body.string_value == "read took 25.000 ms, failed with EAGAIN"


def test_a_successful_slow_syscall_has_no_error_type() -> None:
    ok = SlowCall(SlowSyscall(START, 10, 10, "app", "mmap", 20_000_000, 0x7F00_0000_0000, [], []),
                  ())
    slow = record_named(convert(make_batch(records=[ok])).logs, "syscall.slow", 10)
    assert "error.type" not in slow and "code.stacktrace" not in slow
    assert slow["syscall.return_value"] == 0x7F00_0000_0000


def test_oom_kills_are_warnings_about_the_victim() -> None:
    logs = convert(make_batch()).logs
    (record,) = [r for p, r in logs_by_pid(logs) if r.event_name == "process.oom_kill"]
    assert record.severity_number == logs_pb2.SeverityNumber.SEVERITY_NUMBER_WARN
    assert record.severity_text == "WARN"
    assert record.time_unix_nano == OOM.timestamp_ns
    assert record_named(logs, "process.oom_kill", 20) == {
        "process.pid": 20, "process.executable.name": "db",
        "process.oom_kill.total_vm": 1 << 30, "process.oom_kill.anon_rss": 1 << 29,
        "process.oom_kill.file_rss": 1 << 20, "process.oom_kill.shmem_rss": 0,
        "process.oom_kill.oom_score_adj": 500,
    }


def test_a_stall_is_a_warning_naming_the_culprit_with_its_stacks() -> None:
    logs = convert(make_batch()).logs
    (record,) = [r for _, r in logs_by_pid(logs) if r.event_name == "asyncio.loop.stall"]
    assert record.severity_number == logs_pb2.SeverityNumber.SEVERITY_NUMBER_WARN
    assert record.severity_text == "WARN"
    assert record.time_unix_nano == STALL.stall.timestamp_ns
    assert record.body.string_value == "asyncio loop blocked for 301 ms in handler (app.py:3)"
    assert record_named(logs, "asyncio.loop.stall", 10) == {
        "thread.id": 10, "asyncio.loop.stall.duration": 0.301,
        "code.function.name": "handler", "code.file.path": "/srv/app.py",
        "code.line.number": 3,
        "code.stacktrace": "\n".join([
            "slept 300.1 ms / 3 samples:",
            "  at handler (/srv/app.py:3)",
            "  at Handle._run (/usr/lib/python3.11/asyncio/events.py:80)",
            "  at BaseEventLoop._run_once (/usr/lib/python3.11/asyncio/base_events.py:1922)",
            "  at _PyEval_EvalFrameDefault (/usr/bin/python3.11)",
            "  at main (/usr/bin/app)",
            "slept 0.0 ms / 1 samples:",
            "  at _PyEval_EvalFrameDefault (/usr/bin/python3.11)",
            "  at handler (/srv/app.py:4)",
            "  at Handle._run (/usr/lib/python3.11/asyncio/events.py:80)",
            "  at BaseEventLoop._run_once (/usr/lib/python3.11/asyncio/base_events.py:1922)",
            "  at main (/usr/bin/app)",
        ]),
    }


def test_the_culprit_is_the_innermost_named_python_frame_of_the_heaviest_stack() -> None:
    lost = python("[unknown python]", "[unknown]", 0)
    stall = Stall(STALL.stall, (StallStack((RUN_ONCE, HANDLER_LATER, lost, EVAL), 5, 0),
                                StallStack((RUN_ONCE, HANDLER), 1, 0)))
    logs = convert(make_batch(records=[stall])).logs
    (record,) = [r for _, r in logs_by_pid(logs)]
    assert record.body.string_value == "asyncio loop blocked for 301 ms in handler (app.py:4)"
    assert record_named(logs, "asyncio.loop.stall", 10)["code.line.number"] == 4


def test_a_stall_without_stacks_names_no_code() -> None:
    logs = convert(make_batch(records=[Stall(STALL.stall, ())])).logs
    (record,) = [r for _, r in logs_by_pid(logs)]
    assert record.body.string_value == "asyncio loop blocked for 301 ms"
    assert record_named(logs, "asyncio.loop.stall", 10) == {
        "thread.id": 10, "asyncio.loop.stall.duration": 0.301}


def test_a_stall_names_the_request_that_blocked_the_loop_and_links_to_its_span() -> None:
    # ITEM's stacks slept longest; HEALTH's were sampled more, and one ran outside any.
    stall = Stall(STALL.stall, (StallStack((RUN_ONCE, HANDLER), 1, 200_000_000, ITEM),
                                StallStack((RUN_ONCE, HANDLER_LATER), 1, 90_000_000, ITEM),
                                StallStack((RUN_ONCE, HANDLER_LATER), 3, 250_000_000, HEALTH),
                                StallStack((RUN_ONCE,), 9, 0)))
    logs = convert(make_batch(records=[stall])).logs
    (record,) = [r for _, r in logs_by_pid(logs)]
    assert (record.trace_id.hex(), record.span_id.hex()) == (ITEM.trace_id, ITEM.span_id)
    assert record.body.string_value == (
        "asyncio loop blocked for 301 ms in handler (app.py:3) "
        f"during GET /items/{{id}}, trace {ITEM.trace_id}")
    named = record_named(logs, "asyncio.loop.stall", 10)
    assert (named["http.route"], named["http.request.method"]) == ("/items/{id}", "GET")


def test_a_stall_in_a_request_without_a_span_has_no_ids() -> None:
    stall = Stall(STALL.stall, (StallStack((RUN_ONCE, HANDLER), 2, 0, CHECKOUT),))
    logs = convert(make_batch(records=[stall])).logs
    (record,) = [r for _, r in logs_by_pid(logs)]
    assert (record.trace_id, record.span_id) == (b"", b"")
    assert record.body.string_value.endswith(" during POST /checkout")
    named = record_named(logs, "asyncio.loop.stall", 10)
    assert (named["http.route"], named["http.request.method"]) == ("/checkout", "POST")


def test_a_stall_outside_any_request_names_none() -> None:
    logs = convert(make_batch()).logs
    (record,) = [r for _, r in logs_by_pid(logs) if r.event_name == "asyncio.loop.stall"]
    assert (record.trace_id, record.span_id) == (b"", b"")
    assert not {"http.route", "http.request.method"} & set(attributes(record))


def test_a_stall_stack_trace_is_bounded() -> None:
    deep = tuple(native(f"f{i}", address=i) for i in range(STALL_FRAMES + 6))
    stacks = tuple(StallStack(deep, i, 0) for i in range(STALL_STACKS + 2))
    logs = convert(make_batch(records=[Stall(STALL.stall, stacks)])).logs
    trace = str(record_named(logs, "asyncio.loop.stall", 10)["code.stacktrace"]).split("\n")
    headers = [i for i, line in enumerate(trace) if line.startswith("slept ")]
    assert len(headers) == STALL_STACKS
    first = trace[headers[0]:headers[1]]
    # Leaf first: the innermost frames are kept.
    assert first[1:3] == [f"  at f{STALL_FRAMES + 5} (/usr/bin/app)",
                          f"  at f{STALL_FRAMES + 4} (/usr/bin/app)"]
    assert len(first) == 1 + STALL_FRAMES + 1 and first[-1] == "  ... 6 more frames"
    assert trace[-1] == "  ... 2 more stacks"


def test_records_go_on_the_resource_of_their_process() -> None:
    logs = convert(make_batch()).logs
    assert len(logs.resource_logs) == 2
    by_pid: dict[int, list[str]] = {}
    for pid, record in logs_by_pid(logs):
        by_pid.setdefault(pid, []).append(record.event_name)
    assert by_pid == {10: ["tcp.connection.closed", "syscall.slow", "asyncio.loop.stall"],
                      20: ["tcp.connection.closed", "process.oom_kill"]}
    db = next(rl.resource for rl in logs.resource_logs
              if attributes(rl.resource)["process.pid"] == 20)
    assert attributes(db)["process.executable.name"] == "postgres"


# -- delivery ----------------------------------------------------------------------------------

RECEIVERS: dict[str, tuple[Callable[[], AbstractAsyncContextManager[Receiver]], Protocol]] = {
    "grpc": (grpc_receiver, Protocol.GRPC),
    "http": (http_receiver, Protocol.HTTP_PROTOBUF),
}


@pytest.mark.parametrize("protocol", sorted(RECEIVERS))
async def test_round_trip_through_a_receiver(protocol: str) -> None:
    receiving, wire = RECEIVERS[protocol]
    batch = make_batch()
    async with receiving() as receiver:
        async with OtlpExporter(receiver.endpoint, protocol=wire, environ={},
                                resource_attributes={}, timeout_s=2.0) as exporter:
            logging.getLogger("ebpf_stream").warning("engine warning during the batch")
            await exporter.export(batch)
        (metrics,) = await receiver.wait_for("metrics")
        (logs,) = await receiver.wait_for("logs")
        await receiver.wait_for("profiles")
    assert exporter.stats.undelivered == exporter.stats.export_errors == 0
    expected = convert(batch)
    assert metrics == expected.metrics
    # One logs request: the batch's events, then the engine's own record on its resource.
    assert list(logs.resource_logs[:2]) == list(expected.logs.resource_logs)  # type: ignore[attr-defined]
    (engine,) = logs.resource_logs[2:]  # type: ignore[attr-defined]
    assert [r.body.string_value for sl in engine.scope_logs for r in sl.log_records] == [
        "engine warning during the batch"]


async def test_otlp_json_file_holds_the_metrics_and_logs(tmp_path: Path) -> None:
    path = tmp_path / "trace.otlp.jsonl"
    exporter = OtlpJsonFileExporter(path)
    batch = make_batch()
    await exporter.export(batch)
    await exporter.export(make_batch(totals=[], records=[]))  # no logs line for this one
    await exporter.aclose()
    lines = path.read_bytes().splitlines()
    assert [next(k for k in ("resourceProfiles", "resourceMetrics", "resourceLogs")
                 if f'"{k}"'.encode() in line) for line in lines] == [
        "resourceProfiles", "resourceMetrics", "resourceLogs", "resourceProfiles",
        "resourceMetrics"]
    expected = EventConverter().convert_batch(batch)
    assert decode_otlp_json(lines[1], ExportMetricsServiceRequest) == expected.metrics
    assert decode_otlp_json(lines[2], ExportLogsServiceRequest) == expected.logs


OK: dict[Signal, Message] = {
    Signal.PROFILES: ExportProfilesServiceResponse(),
    Signal.METRICS: ExportMetricsServiceResponse(),
    Signal.LOGS: ExportLogsServiceResponse(),
}


@pytest.mark.parametrize(("failing", "lost"), [
    (Signal.LOGS, 5),  # the five records
    (Signal.PROFILES, 3),  # the three CPU samples
    (Signal.METRICS, 0),  # totals are cumulative: the next batch carries them again
])
async def test_a_request_given_up_costs_the_samples_it_carries(failing: Signal,
                                                               lost: int) -> None:
    sent: list[Signal] = []

    def handler(signal: Signal) -> Callable[[Message], object]:
        async def handle(request: Message) -> Message:
            sent.append(signal)
            if signal is failing:
                raise DeliveryError("HTTP 400: bad (test)", retryable=False)
            return OK[signal]
        return handle

    transports = {s: MockTransport(ep, handler(s))  # type: ignore[arg-type]
                  for s, ep in otlp_endpoints({}, endpoint="http://mock.invalid:4318").items()}
    with pytest.raises(ExportError, match="HTTP 400"):
        async with OtlpExporter(environ={}, transports=transports) as exporter:
            await exporter.export(make_batch())
    assert sent == [Signal.PROFILES, Signal.METRICS, Signal.LOGS]
    assert make_batch().sample_count == 3 + 5
    assert (exporter.stats.undelivered, exporter.stats.export_errors) == (lost, 1)
