"""The OTLP exporter end to end, against real gRPC and HTTP receivers on loopback.

What arrives is decoded and compared with the profile that was exported; failures, throttling,
partial success, a receiver that is down or slow, and the queue's overflow policies are
checked for what gets retried, what gets lost and how the loss is counted.  The retry logic
itself is also checked against ``MockTransport``.
"""

from __future__ import annotations

import gc
import itertools
import logging
import random
import time
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import otlp_stacks
import pytest
from google.protobuf.message import Message
from mock_transport import MockTransport
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)
from opentelemetry.proto.logs.v1 import logs_pb2
from otlp_json_decode import decode_otlp_json
from otlp_receivers import Behaviour, Receiver, closed_port, grpc_receiver, http_receiver

from ebpf_stream._base.config import EbpfConfig, OverflowPolicy
from ebpf_stream._base.errors import ExportError
from ebpf_stream._base.otlp_settings import Endpoint, Protocol, Signal, otlp_endpoints
from ebpf_stream._base.overhead import Overhead
from ebpf_stream._base.stats import Stats
from ebpf_stream._model.batch import Batch
from ebpf_stream._model.labels import KERNEL_SUFFIX
from ebpf_stream._model.profile import Frame, FrameKind, ProcessInfo, Profile
from ebpf_stream._outputs import base
from ebpf_stream._outputs.otlp import delivery as exporter_module
from ebpf_stream._outputs.otlp.delivery import backoff
from ebpf_stream._outputs.otlp.exporter import OtlpExporter
from ebpf_stream._outputs.otlp.json_file import OtlpJsonFileExporter
from ebpf_stream._outputs.otlp.transport import DeliveryError

pytestmark = pytest.mark.anyio

PERIOD = 10_000_000  # 100 Hz
START = 1_700_000_000_000_000_000
DURATION = 10_000_000_000

RECEIVERS: dict[str, Callable[..., AbstractAsyncContextManager[Receiver]]] = {
    "grpc": grpc_receiver,
    "http": http_receiver,
}
PROTOCOLS = {"grpc": Protocol.GRPC, "http": Protocol.HTTP_PROTOBUF}
FAST = {"timeout_s": 2.0, "retry_for_s": 5.0, "flush_timeout_s": 5.0}

Stacks = Counter[tuple[int, tuple[str, ...]]]


# -- building batches --------------------------------------------------------------------------

_NATIVE = [Frame(f"fn_{i}", f"/usr/lib/lib{i % 20}.so", FrameKind.NATIVE, 0x1000 + 16 * i)
           for i in range(500)]
_KERNEL = [Frame(f"k_{i}", "[kernel.kallsyms]", FrameKind.KERNEL, 0xFFFF_FFFF_8100_0000 + 16 * i)
           for i in range(50)]


def make_profile(samples: int = 600, *, stacks: int = 60, pids: Iterable[int] = (100, 101, 102),
                 seed: int = 0, depth: int = 12) -> Profile:
    """A realistic interval: several processes, shared frames, kernel tails, timestamps.

    Big and repetitive enough that gzip shrinks it (grpc sends a message uncompressed when
    gzip would not make it smaller).
    """
    rng = random.Random(seed)
    pids = list(pids)
    profile = Profile(period_ns=PERIOD, start_ns=START, end_ns=START + DURATION,
                      processes={pid: ProcessInfo(pid, f"svc{pid}", f"svc{pid}",
                                                  f"/usr/bin/svc{pid} --port 80")
                                 for pid in pids})
    shapes = []
    for i in range(stacks):
        frames = tuple(rng.choice(_NATIVE) for _ in range(depth))
        if i % 3 == 0:
            frames += tuple(rng.choice(_KERNEL) for _ in range(3))
        shapes.append((pids[i % len(pids)], frames))
    for n in range(samples):
        pid, frames = shapes[n % stacks]
        profile.add(pid, f"svc{pid}", frames, 1, [START + rng.randrange(DURATION)])
    return profile


def expected(*profiles: Profile, scale: int = 1) -> Stacks:
    out: Stacks = Counter()
    for profile in profiles:
        for s in profile:
            names = tuple(f.name + (KERNEL_SUFFIX if f.kind is FrameKind.KERNEL else "")
                          for f in s.frames)
            out[s.pid, names] += s.count * scale
    return out


def arrived(receiver: Receiver, sample_type: str = "samples") -> Stacks:
    requests: list[ExportProfilesServiceRequest] = receiver.requests(  # type: ignore[assignment]
        "profiles")
    return otlp_stacks.stacks(requests, sample_type=sample_type)


def profile_ids(receiver: Receiver) -> list[bytes]:
    return [p.profile_id for r in receiver.requests("profiles")
            for rp in r.resource_profiles  # type: ignore[attr-defined]
            for sp in rp.scope_profiles for p in sp.profiles]


def context(policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST,
            stats: Stats | None = None) -> base.ExportContext:
    return base.ExportContext(config=EbpfConfig().with_overflow_policy(policy),
                              stats=stats or Stats(),
                              overhead=lambda: Overhead(cpu_percent=0.5, memory_bytes=4096))


def make_exporter(protocol: str, endpoint: str, **kwargs: Any) -> OtlpExporter:
    options: dict[str, Any] = {"protocol": PROTOCOLS[protocol], "environ": {}, **FAST}
    options.update(kwargs)
    return OtlpExporter(endpoint, **options)


@asynccontextmanager
async def receiving(protocol: str, behaviour: Behaviour | None = None,
                    ) -> AsyncIterator[Receiver]:
    async with RECEIVERS[protocol](behaviour or Behaviour()) as receiver:
        yield receiver


@pytest.fixture(params=sorted(RECEIVERS))
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff from 20 ms instead of 250 ms, so retries take test time, not minutes."""
    monkeypatch.setattr(exporter_module, "_BACKOFF_FIRST_S", 0.02)


@pytest.fixture(autouse=True)
def engine_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="ebpf_stream")
    return caplog


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ebpf_stream" and r.levelno == level]


def metric_values(receiver: Receiver) -> dict[str, list[tuple[dict[str, object], float]]]:
    """{metric name: [(point attributes, value)]} over every successful metrics call."""
    out: dict[str, list[tuple[dict[str, object], float]]] = {}
    for request in receiver.requests("metrics"):
        for rm in request.resource_metrics:  # type: ignore[attr-defined]
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    data = getattr(metric, metric.WhichOneof("data"))
                    for point in data.data_points:
                        value = getattr(point, point.WhichOneof("value"))
                        out.setdefault(metric.name, []).append(
                            (otlp_stacks.resource_attributes(point), value))
    return out


# -- round trip --------------------------------------------------------------------------------


async def test_round_trip_profiles_metrics_and_logs(protocol: str,
                                                    engine_log: pytest.LogCaptureFixture) -> None:
    profiles = [make_profile(seed=1), make_profile(seed=2, pids=(100, 200))]
    stats = Stats(received=1234, dropped_kernel=3, lost_stacks=2)
    async with receiving(protocol) as receiver:
        exporter = make_exporter(protocol, receiver.endpoint)
        exporter.bind(context(stats=stats))
        async with exporter:
            logging.getLogger("ebpf_stream").warning("ring buffer full: lost %d samples", 17)
            for profile in profiles:
                await exporter.export(Batch(profile))
            logging.getLogger("ebpf_stream").error("late trouble")  # sent by aclose
        assert exporter.stats is stats

    assert arrived(receiver) == expected(*profiles)
    assert arrived(receiver, "cpu") == expected(*profiles, scale=PERIOD)
    ids = profile_ids(receiver)
    assert len(ids) == len(set(ids)) == 2 * (3 + 2)  # two profiles per process per batch
    assert all(not c.failed for c in receiver.calls)

    metrics = metric_values(receiver)
    cpu_time = sum(v for _, v in metrics["process.cpu.time"])
    assert cpu_time == pytest.approx(sum(p.sample_count for p in profiles) * PERIOD / 1e9)
    assert {a["cpu.mode"] for a, _ in metrics["process.cpu.time"]} == {"user", "system"}
    assert [v for _, v in metrics["ebpf_stream.samples.received"]] == [1234, 1234]
    assert [v for _, v in metrics["ebpf_stream.stacks.lost"]] == [2, 2]
    dropped = {str(a["ebpf_stream.drop.reason"]): v
               for a, v in metrics["ebpf_stream.samples.dropped"]}
    assert dropped == {"kernel": 3, "pipeline": 0, "export": 0}
    assert [v for _, v in metrics["ebpf_stream.overhead.memory.usage"]] == [4096, 4096]

    records = [(r.severity_number, r.body.string_value)
               for request in receiver.requests("logs")
               for rl in request.resource_logs  # type: ignore[attr-defined]
               for sl in rl.scope_logs for r in sl.log_records]
    sev = logs_pb2.SeverityNumber
    assert records == [(sev.SEVERITY_NUMBER_WARN, "ring buffer full: lost 17 samples"),
                       (sev.SEVERITY_NUMBER_ERROR, "late trouble")]
    assert stats.undelivered == stats.export_errors == stats.rejected == 0


async def test_an_exporter_without_a_context_exports_without_engine_metrics(
        protocol: str) -> None:
    profile = make_profile()
    async with (
        receiving(protocol) as receiver,
        make_exporter(protocol, receiver.endpoint) as exporter,
    ):
        await exporter.export(Batch(profile))
        await exporter.export(Batch(Profile(period_ns=PERIOD, start_ns=START,
                                            end_ns=START)))  # nothing to send
    assert arrived(receiver) == expected(profile)
    assert set(metric_values(receiver)) == {"process.cpu.time"}
    assert [c.signal for c in receiver.calls] == ["profiles", "metrics"]
    assert exporter.stats == Stats()


@pytest.mark.parametrize(("environ", "service", "extra"), [
    ({"OTEL_SERVICE_NAME": "checkout"}, "checkout", {}),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=billing,team=perf%20eng"}, "billing",
     {"team": "perf eng"}),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=billing", "OTEL_SERVICE_NAME": "checkout"},
     "checkout", {}),
    ({}, "unknown_service:svc100", {}),
], ids=["service-name", "resource-attributes", "service-name-wins", "fallback"])
async def test_resource_attributes_and_headers_from_the_environment(
        protocol: str, environ: dict[str, str], service: str, extra: dict[str, str]) -> None:
    environ = {**environ, "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cret,x-tenant=team%201"}
    async with (
        receiving(protocol) as receiver,
        make_exporter(protocol, receiver.endpoint, environ=environ) as exporter,
    ):
        await exporter.export(Batch(make_profile(pids=(100,))))
    assert len(receiver.calls) == 2
    for call in receiver.calls:
        assert call.headers["x-api-key"] == "s3cret"
        assert call.headers["x-tenant"] == "team 1"
        for rp in getattr(call.request, f"resource_{call.signal}"):
            attributes = otlp_stacks.resource_attributes(rp.resource)
            assert attributes["service.name"] == service
            assert attributes["process.pid"] == 100
            for key, value in extra.items():
                assert attributes[key] == value


async def test_explicit_resource_attributes_and_headers_replace_the_environment(
        protocol: str) -> None:
    environ = {"OTEL_SERVICE_NAME": "from-env", "OTEL_EXPORTER_OTLP_HEADERS": "x-old=1"}
    async with (
        receiving(protocol) as receiver,
        make_exporter(protocol, receiver.endpoint, environ=environ,
                      resource_attributes={"service.name": "explicit"},
                      headers={"x-new": "2"}) as exporter,
    ):
        await exporter.export(Batch(make_profile(pids=(100,))))
    for call in receiver.calls:
        assert call.headers["x-new"] == "2" and "x-old" not in call.headers
    (request,) = receiver.requests("profiles")
    for rp in request.resource_profiles:  # type: ignore[attr-defined]
        assert otlp_stacks.resource_attributes(rp.resource)["service.name"] == "explicit"


@pytest.mark.parametrize("gzip", [True, False], ids=["gzip", "identity"])
async def test_compression(protocol: str, gzip: bool) -> None:
    profile = make_profile(samples=2000, stacks=200)
    async with receiving(protocol) as receiver, make_exporter(protocol, receiver.endpoint,
                             compression="gzip" if gzip else "none") as exporter:
        await exporter.export(Batch(profile))
    assert [c.compression for c in receiver.calls] == ["gzip" if gzip else "identity"] * 2
    assert arrived(receiver) == expected(profile)


async def test_compression_from_the_environment(protocol: str) -> None:
    environ = {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
               "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "none"}
    async with (
        receiving(protocol) as receiver,
        make_exporter(protocol, receiver.endpoint, environ=environ) as exporter,
    ):
        await exporter.export(Batch(make_profile(samples=2000, stacks=200)))
    assert {c.signal: c.compression for c in receiver.calls} == {
        "profiles": "gzip", "metrics": "identity"}


# -- failures and retries ----------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "failure"), [
    ("grpc", "unavailable"), ("http", "unavailable"), ("http", "bad_gateway")])
async def test_unavailable_is_retried_and_nothing_is_lost(
        protocol: str, failure: str, engine_log: pytest.LogCaptureFixture) -> None:
    profiles = [make_profile(seed=i, pids=(100 + i,)) for i in range(3)]
    stats = Stats()
    async with receiving(protocol, Behaviour(fail_first=3, failure=failure)) as receiver:
        exporter = make_exporter(protocol, receiver.endpoint)
        exporter.bind(context(stats=stats))
        async with exporter:
            await exporter.export(Batch(profiles[0]))
            await receiver.wait_for("profiles")  # retried until it got through
            for profile in profiles[1:]:  # these carry the retry warning as a log record
                await exporter.export(Batch(profile))
    assert [c.failed for c in receiver.calls[:4]] == [True, True, True, False]
    assert [c.signal for c in receiver.calls[:4]] == ["profiles"] * 4
    # Every sample arrived exactly once: no batch lost, none sent twice.
    assert arrived(receiver) == expected(*profiles)
    ids = profile_ids(receiver)
    assert len(ids) == len(set(ids)) == 2 * 3
    assert (stats.undelivered, stats.export_errors) == (0, 0)
    warnings = messages(engine_log, logging.WARNING)
    assert len(warnings) == 1 and "retrying" in warnings[0]
    assert any("recovered" in m for m in messages(engine_log, logging.INFO))
    # The retry warning itself reached the receiver as a log record.
    bodies = [r.body.string_value for req in receiver.requests("logs")
              for rl in req.resource_logs for sl in rl.scope_logs  # type: ignore[attr-defined]
              for r in sl.log_records]
    assert bodies == warnings


@pytest.mark.parametrize(("protocol", "retry_after_s"), [("grpc", 0.4), ("http", 1.0)])
async def test_throttling_is_retried_after_the_delay_the_receiver_asks_for(
        protocol: str, retry_after_s: float) -> None:
    """gRPC RESOURCE_EXHAUSTED with RetryInfo, HTTP 429 with Retry-After (whole seconds)."""
    profile = make_profile()
    behaviour = Behaviour(fail_first=1, failure="resource_exhausted", retry_after_s=retry_after_s)
    stats = Stats()
    async with receiving(protocol, behaviour) as receiver:
        exporter = make_exporter(protocol, receiver.endpoint)
        exporter.bind(context(stats=stats))
        async with exporter:
            await exporter.export(Batch(profile))
    first, second = receiver.calls[:2]
    assert (first.signal, first.failed, second.signal, second.failed) == (
        "profiles", True, "profiles", False)
    gap = second.at - first.at
    print(f"\n{protocol}: asked for {retry_after_s}s, retried after {gap:.3f}s")
    assert retry_after_s <= gap < retry_after_s + 0.5
    assert arrived(receiver) == expected(profile)
    assert stats.undelivered == 0


async def test_http_429_without_retry_after_is_retried_with_backoff() -> None:
    profile = make_profile()
    async with (
        receiving("http", Behaviour(fail_first=2, failure="resource_exhausted")) as rx,
        make_exporter("http", rx.endpoint) as exporter,
    ):
        await exporter.export(Batch(profile))
    assert [c.failed for c in rx.calls[:3]] == [True, True, False]
    assert arrived(rx) == expected(profile)
    assert exporter.stats.undelivered == 0


@pytest.mark.parametrize(("protocol", "failure", "status"), [
    ("grpc", "resource_exhausted", "RESOURCE_EXHAUSTED"),  # without RetryInfo: final
    ("grpc", "invalid", "INVALID_ARGUMENT"),
    ("http", "invalid", "HTTP 400"),
])
async def test_final_errors_are_not_retried(
        protocol: str, failure: str, status: str, engine_log: pytest.LogCaptureFixture) -> None:
    profile = make_profile()
    stats = Stats()
    async with receiving(protocol, Behaviour(fail_first=1, failure=failure)) as receiver:
        exporter = make_exporter(protocol, receiver.endpoint)
        exporter.bind(context(stats=stats))
        with pytest.raises(ExportError) as caught:
            async with exporter:
                await exporter.export(Batch(profile))
                await receiver.wait_for("metrics")
    # The profiles call failed once and was given up; the batch's metrics still went.
    assert [(c.signal, c.failed) for c in receiver.calls[:2]] == [
        ("profiles", True), ("metrics", False)]
    assert receiver.requests("profiles") == []
    assert (stats.undelivered, stats.export_errors) == (profile.sample_count, 1)
    message = str(caught.value)
    assert receiver.endpoint in message and status in message
    assert f"{profile.sample_count:,} samples not delivered" in message
    assert not any("retrying" in m for m in messages(engine_log, logging.WARNING))
    assert any(status in m for m in messages(engine_log, logging.ERROR))


async def test_partial_success_is_counted_and_logged_not_raised(
        protocol: str, engine_log: pytest.LogCaptureFixture) -> None:
    profile = make_profile()
    stats = Stats()
    async with receiving(protocol, Behaviour(reject=2)) as receiver:
        exporter = make_exporter(protocol, receiver.endpoint)
        exporter.bind(context(stats=stats))
        async with exporter:  # no ExportError
            await exporter.export(Batch(profile))
    calls = [c for c in receiver.calls if not c.failed]
    assert {c.signal for c in calls} >= {"profiles", "metrics"}
    assert stats.rejected == 2 * len(calls)
    assert (stats.undelivered, stats.export_errors) == (0, 0)
    warnings = [m for m in messages(engine_log, logging.WARNING) if "rejected" in m]
    assert len(warnings) == len(calls)
    assert "rejected 2 profiles: rejected by test" in warnings[0]
    assert arrived(receiver) == expected(profile)


# -- receiver down -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(OverflowPolicy))
async def test_receiver_down_close_raises_naming_the_endpoint_within_the_flush_timeout(
        protocol: str, policy: OverflowPolicy) -> None:
    port = closed_port()
    endpoint = f"http://127.0.0.1:{port}"
    profiles = [make_profile(seed=i) for i in range(2)]
    stats = Stats()
    flush_timeout = 0.5
    exporter = make_exporter(protocol, endpoint, retry_for_s=30.0,
                             flush_timeout_s=flush_timeout, queue_size=1)
    exporter.bind(context(policy, stats))
    with pytest.raises(ExportError) as caught:
        async with exporter:
            for profile in profiles:
                await exporter.export(Batch(profile))
            await anyio.sleep(0.1)  # let the first attempts fail: the retry warning is logged
            started = time.monotonic()
    elapsed = time.monotonic() - started
    print(f"\n{protocol}/{policy}: aclose took {elapsed:.3f}s (flush timeout {flush_timeout}s)")
    assert flush_timeout <= elapsed < flush_timeout + 1.0
    message = str(caught.value)
    assert endpoint in message
    assert "flush timeout" in message
    assert stats.undelivered == sum(p.sample_count for p in profiles)
    assert f"{stats.undelivered:,} samples not delivered" in message
    assert stats.export_errors >= 1


@pytest.mark.parametrize("policy", [OverflowPolicy.DROP_OLDEST, OverflowPolicy.DROP_NEWEST])
async def test_receiver_down_memory_stays_bounded_and_every_sample_is_counted(
        policy: OverflowPolicy, engine_log: pytest.LogCaptureFixture) -> None:
    batch = Batch(make_profile(samples=3000, stacks=300))
    batches, queue_size = 200, 3
    stats = Stats()
    exporter = make_exporter("http", f"http://127.0.0.1:{closed_port()}", retry_for_s=30.0,
                             flush_timeout_s=0.2, queue_size=queue_size)
    exporter.bind(context(policy, stats))
    longest = 0
    with pytest.raises(ExportError):
        async with exporter:
            for _ in range(batches):
                await exporter.export(batch)
                longest = max(longest, len(exporter._queue))
            gc.collect()
            held = sum(isinstance(o, exporter_module._Outgoing) for o in gc.get_objects())
    assert longest == queue_size
    assert held <= queue_size + 1  # the queue, and the batch being sent
    assert stats.undelivered == batches * batch.profile.sample_count
    full = [m for m in messages(engine_log, logging.WARNING) if "queue full" in m]
    assert len(full) == 1  # said once, not once per dropped batch


# -- receiver slow -----------------------------------------------------------------------------


async def test_slow_receiver_with_block_policy_pushes_back_and_loses_nothing(
        protocol: str) -> None:
    profiles = [make_profile(seed=i, pids=(100 + i,)) for i in range(4)]
    stats = Stats()
    durations = []
    async with receiving(protocol, Behaviour(delay_s=0.15)) as receiver:
        exporter = make_exporter(protocol, receiver.endpoint, queue_size=1)
        exporter.bind(context(OverflowPolicy.BLOCK, stats))
        async with exporter:
            for profile in profiles:
                started = time.monotonic()
                await exporter.export(Batch(profile))
                durations.append(time.monotonic() - started)
    print(f"\n{protocol}: export() took " + ", ".join(f"{d:.3f}s" for d in durations))
    # The first two fit (one sending, one queued); then export() waits for the sender.
    assert max(durations[:2]) < 0.1
    assert min(durations[2:]) > 0.1
    assert arrived(receiver) == expected(*profiles)
    assert (stats.undelivered, stats.export_errors) == (0, 0)


@pytest.mark.parametrize(("policy", "kept"), [
    (OverflowPolicy.DROP_NEWEST, [0, 1]), (OverflowPolicy.DROP_OLDEST, [0, 4])])
async def test_slow_receiver_with_a_drop_policy_drops_and_counts(
        protocol: str, policy: OverflowPolicy, kept: list[int]) -> None:
    profiles = [make_profile(seed=i, pids=(100 + i,)) for i in range(5)]
    stats = Stats()
    async with receiving(protocol, Behaviour(delay_s=0.2)) as receiver:
        exporter = make_exporter(protocol, receiver.endpoint, queue_size=1)
        exporter.bind(context(policy, stats))
        async with exporter:
            await exporter.export(Batch(profiles[0]))
            await receiver.wait_for("profiles")  # batch 0 is being sent
            for profile in profiles[1:]:
                started = time.monotonic()
                await exporter.export(Batch(profile))
                assert time.monotonic() - started < 0.1  # never waits for the receiver
    assert arrived(receiver) == expected(*(profiles[i] for i in kept))
    lost = sum(p.sample_count for i, p in enumerate(profiles) if i not in kept)
    assert stats.undelivered == lost
    assert stats.export_errors == 0


async def test_host_loop_keeps_its_latency_while_exporting_large_batches(protocol: str) -> None:
    """A task sleeping 10 ms in a loop records how late it wakes, idle and while exporting.

    Conversion and HTTP encoding run in worker threads; what remains on the loop is sending
    (and, for gRPC, compressing: grpc does that on the calling thread).  The bound is on top
    of the lag measured idle, so a busy test machine does not fail it.
    """
    batches = [Batch(make_profile(samples=50_000, stacks=5_000, depth=20, seed=i))
               for i in range(2)]
    lags: dict[str, list[float]] = {"idle": [], "exporting": []}
    phase = "idle"
    done = anyio.Event()

    async def monitor() -> None:
        while not done.is_set():
            started = time.monotonic()
            await anyio.sleep(0.01)
            lags[phase].append(time.monotonic() - started - 0.01)

    async with receiving(protocol) as receiver:
        # Built outside the measurement: creating the HTTP clients loads CA certificates.
        exporter = make_exporter(protocol, receiver.endpoint, compression="gzip")
        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor)
            await anyio.sleep(0.2)
            phase = "exporting"
            started = time.monotonic()
            async with exporter:
                for _ in range(3):
                    for batch in batches:
                        await exporter.export(batch)
            elapsed = time.monotonic() - started
            done.set()
    idle, worst = max(lags["idle"]), max(lags["exporting"])
    sent = sum(len(c.request.SerializeToString()) for c in receiver.calls)
    print(f"\n{protocol}: 6 batches of 50,000 samples ({sent / 1e6:.1f} MB of requests) "
          f"exported in {elapsed:.2f}s; worst event-loop lag {worst * 1000:.1f} ms over "
          f"{len(lags['exporting'])} ticks (idle: {idle * 1000:.1f} ms; the receiver shares "
          f"the loop)")
    assert len(lags["exporting"]) > 5
    assert worst < 0.1 + idle
    assert sum(arrived(receiver).values()) == 6 * 50_000


# -- retry logic, with MockTransport -----------------------------------------------------------

Handler = Callable[[Message], Awaitable[Message]]
OK: dict[Signal, Message] = {
    Signal.PROFILES: ExportProfilesServiceResponse(),
    Signal.METRICS: ExportMetricsServiceResponse(),
    Signal.LOGS: ExportLogsServiceResponse(),
}


def mock_endpoints() -> dict[Signal, Endpoint]:
    return otlp_endpoints({}, endpoint="http://mock.invalid:4318")


class Script:
    """Answers each signal from a list of outcomes (an exception or OK), recording call times."""

    def __init__(self, **outcomes: list[DeliveryError | None]) -> None:
        self.outcomes = {Signal(k): list(v) for k, v in outcomes.items()}
        self.calls: list[tuple[Signal, float]] = []

    def handler(self, signal: Signal) -> Handler:
        async def handle(request: Message) -> Message:
            self.calls.append((signal, time.monotonic()))
            outcomes = self.outcomes.get(signal, [])
            outcome = outcomes.pop(0) if len(outcomes) > 1 else (outcomes or [None])[0]
            if outcome is not None:
                raise outcome
            return OK[signal]
        return handle

    def times(self, signal: Signal) -> list[float]:
        return [t for s, t in self.calls if s is signal]

    def exporter(self, **kwargs: Any) -> OtlpExporter:
        transports = {s: MockTransport(ep, self.handler(s)) for s, ep in mock_endpoints().items()}
        options: dict[str, Any] = {"environ": {}, "transports": transports, **kwargs}
        return OtlpExporter(**options)


def retryable(retry_after: float | None = None) -> DeliveryError:
    return DeliveryError("UNAVAILABLE: down (test)", retryable=True, retry_after=retry_after)


def final() -> DeliveryError:
    return DeliveryError("HTTP 400: bad (test)", retryable=False)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_backoff_doubles_with_jitter_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter_module, "_BACKOFF_FIRST_S", 0.25)
    for attempt in range(12):
        step = min(8.0, 0.25 * 2 ** attempt)
        for _ in range(50):
            assert step * 0.5 <= backoff(attempt) <= step
    assert backoff(10_000) <= 8.0  # no overflow however long the outage
    assert len({backoff(3) for _ in range(20)}) > 1  # jittered


async def test_mock_retryable_failures_back_off_exponentially(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter_module, "random", types.SimpleNamespace(
        uniform=lambda low, high: high))  # no jitter: the full step every time
    script = Script(profiles=[retryable()] * 4 + [None])
    async with script.exporter(retry_for_s=5.0) as exporter:
        await exporter.export(Batch(make_profile()))
    times = script.times(Signal.PROFILES)
    assert len(times) == 5
    steps = [0.02, 0.04, 0.08, 0.16]
    for gap, step in zip(gaps(times), steps, strict=True):
        assert step <= gap < step + 0.05
    assert (exporter.stats.undelivered, exporter.stats.export_errors) == (0, 0)


async def test_mock_retry_for_s_bounds_the_retries() -> None:
    retry_for = 0.3
    script = Script(profiles=[retryable()])  # always failing
    profile = make_profile()
    with pytest.raises(ExportError, match="UNAVAILABLE: down"):
        async with script.exporter(retry_for_s=retry_for) as exporter:
            await exporter.export(Batch(profile))
            while not script.times(Signal.METRICS):
                await anyio.sleep(0.01)
    profiles = script.times(Signal.PROFILES)
    given_up = script.times(Signal.METRICS)[0]  # metrics go once profiles are given up
    assert len(profiles) >= 3
    assert given_up - profiles[0] <= retry_for + 0.05
    # It did not give up early either: the next backoff would have passed the deadline.
    assert given_up - profiles[0] >= retry_for / 4
    assert (exporter.stats.undelivered, exporter.stats.export_errors) == (
        profile.sample_count, 1)


async def test_mock_retry_after_is_honoured_and_a_delay_past_the_deadline_gives_up() -> None:
    script = Script(profiles=[retryable(retry_after=0.2), None],
                    metrics=[retryable(retry_after=10.0)])
    with pytest.raises(ExportError, match="v1/metrics failed: UNAVAILABLE"):
        async with script.exporter(retry_for_s=1.0) as exporter:
            await exporter.export(Batch(make_profile()))
    (gap,) = gaps(script.times(Signal.PROFILES))
    assert 0.2 <= gap < 0.3
    # Asked to wait 10 s with 1 s of retrying allowed: given up at once, not after a sleep.
    assert len(script.times(Signal.METRICS)) == 1
    # Metrics carry no samples: counted as an error, not as undelivered samples.
    assert (exporter.stats.undelivered, exporter.stats.export_errors) == (0, 1)


async def test_mock_final_errors_stop_at_once() -> None:
    script = Script(profiles=[DeliveryError("HTTP 400", retryable=False, retry_after=0.01)])
    profile = make_profile()
    started = time.monotonic()
    with pytest.raises(ExportError, match="HTTP 400"):
        async with script.exporter() as exporter:
            await exporter.export(Batch(profile))
    assert time.monotonic() - started < 0.5
    assert len(script.times(Signal.PROFILES)) == 1
    assert len(script.times(Signal.METRICS)) == 1
    assert exporter.stats.undelivered == profile.sample_count


async def test_mock_a_failure_of_one_batch_does_not_hold_up_the_next() -> None:
    script = Script(profiles=[final(), None])
    first, second = make_profile(seed=1), make_profile(seed=2)
    with pytest.raises(ExportError):
        async with script.exporter() as exporter:
            await exporter.export(Batch(first))
            await exporter.export(Batch(second))
    assert len(script.times(Signal.PROFILES)) == 2
    assert exporter.stats.undelivered == first.sample_count


async def test_mock_an_export_waiting_for_room_as_closing_starts_is_counted_undelivered() -> None:
    script = Script(profiles=[retryable()])  # always failing: the queue stays full
    profile = make_profile()
    returned: list[bool] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            with pytest.raises(ExportError, match="flush timeout"):
                async with script.exporter(overflow_policy=OverflowPolicy.BLOCK, queue_size=1,
                                           retry_for_s=30.0, flush_timeout_s=0.2) as exporter:

                    async def waiting_export() -> None:
                        await exporter.export(Batch(profile))
                        returned.append(True)

                    await exporter.export(Batch(profile))  # being sent
                    await exporter.export(Batch(profile))  # queued
                    tg.start_soon(waiting_export)  # waits for room until closing turns it away
                    await anyio.sleep(0.05)
    assert returned == [True]
    assert exporter.stats.undelivered == 3 * profile.sample_count


async def test_mock_transport_is_only_asked_for_what_has_content() -> None:
    script = Script()
    async with script.exporter() as exporter:
        await exporter.export(Batch(Profile(period_ns=PERIOD, start_ns=START, end_ns=START)))
    assert script.calls == []


# -- lifecycle ---------------------------------------------------------------------------------


async def test_export_outside_async_with_raises_and_aclose_twice_is_harmless() -> None:
    script = Script()
    exporter = script.exporter()
    with pytest.raises(RuntimeError, match="async with"):
        await exporter.export(Batch(make_profile()))
    await exporter.aclose()
    await exporter.aclose()

    async with script.exporter() as exporter:
        await exporter.export(Batch(make_profile()))
        await exporter.aclose()
        await exporter.aclose()
        with pytest.raises(RuntimeError):
            await exporter.export(Batch(make_profile()))
    await exporter.aclose()
    assert [s for s, _ in script.calls] == [Signal.PROFILES, Signal.METRICS]


def test_exporter_is_built_outside_an_event_loop() -> None:
    """The CLI builds its exporters before the loop runs."""
    for protocol in PROTOCOLS.values():
        exporter = OtlpExporter("http://localhost:4318", protocol=protocol, environ={})
        assert exporter.endpoints[Signal.PROFILES].protocol is protocol


async def test_queue_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        OtlpExporter("http://localhost:4318", environ={}, queue_size=0)


async def test_close_sends_the_last_logs_without_dropping_a_batch_for_them(
        protocol: str) -> None:
    """At close the queue may be full: the final log records go anyway, over the bound."""
    profiles = [make_profile(seed=i, pids=(100 + i,)) for i in range(2)]
    stats = Stats()
    async with receiving(protocol, Behaviour(delay_s=0.1)) as receiver:
        exporter = make_exporter(protocol, receiver.endpoint, queue_size=1)
        exporter.bind(context(OverflowPolicy.DROP_OLDEST, stats))
        async with exporter:
            await exporter.export(Batch(profiles[0]))
            await receiver.wait_for("profiles")
            await exporter.export(Batch(profiles[1]))  # the queue is full now
            logging.getLogger("ebpf_stream").warning("last words")
    assert arrived(receiver) == expected(*profiles)
    assert stats.undelivered == 0
    (logs,) = receiver.requests("logs")
    assert [r.body.string_value for rl in logs.resource_logs  # type: ignore[attr-defined]
            for sl in rl.scope_logs for r in sl.log_records] == ["last words"]


async def test_cancelled_host_still_flushes(protocol: str) -> None:
    """Cancelling the host's code does not stop the sender: close still delivers."""
    profile = make_profile()
    async with receiving(protocol) as receiver:
        with anyio.CancelScope() as scope:
            async with make_exporter(protocol, receiver.endpoint) as exporter:
                await exporter.export(Batch(profile))
                scope.cancel()
                await anyio.sleep(1)
    assert scope.cancelled_caught
    assert arrived(receiver) == expected(profile)
    assert exporter.stats.undelivered == 0


# -- OTLP/JSON file ----------------------------------------------------------------------------


async def test_json_file_lines_decode_to_the_same_stacks(tmp_path: Path) -> None:
    path = tmp_path / "cpu.otlp.jsonl"
    profiles = [make_profile(seed=1), make_profile(seed=2, pids=(300,))]
    exporter = OtlpJsonFileExporter(path)
    exporter.bind(context(stats=Stats(received=99)))
    for profile in profiles:
        await exporter.export(Batch(profile))
    await exporter.export(Batch(Profile(period_ns=PERIOD, start_ns=START, end_ns=START)))
    await exporter.aclose()

    lines = path.read_bytes().splitlines()
    profile_lines = [line for line in lines if b'"resourceProfiles"' in line]
    metric_lines = [line for line in lines if b'"resourceMetrics"' in line]
    assert len(profile_lines) == 2 and len(metric_lines) == 3  # engine metrics every time
    assert len(lines) == 5
    requests = [decode_otlp_json(line, ExportProfilesServiceRequest) for line in profile_lines]
    assert otlp_stacks.stacks(requests) == expected(*profiles)
    assert otlp_stacks.stacks(requests, sample_type="cpu") == expected(*profiles, scale=PERIOD)
    received = []
    for line in metric_lines:
        request = decode_otlp_json(line, ExportMetricsServiceRequest)
        received += [p.as_int for rm in request.resource_metrics for sm in rm.scope_metrics
                     for m in sm.metrics if m.name == "ebpf_stream.samples.received"
                     for p in m.sum.data_points]
    assert received == [99, 99, 99]


async def test_json_file_and_network_carry_the_same_stacks(tmp_path: Path) -> None:
    profile = make_profile(seed=5)
    path = tmp_path / "cpu.otlp.jsonl"
    file_exporter = OtlpJsonFileExporter(path)
    await file_exporter.export(Batch(profile))
    async with (
        receiving("http") as receiver,
        make_exporter("http", receiver.endpoint) as exporter,
    ):
        await exporter.export(Batch(profile))
    requests = [decode_otlp_json(line, ExportProfilesServiceRequest)
                for line in path.read_bytes().splitlines() if b'"resourceProfiles"' in line]
    assert otlp_stacks.stacks(requests) == arrived(receiver) == expected(profile)
