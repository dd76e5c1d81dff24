"""Samples and stalls named by request, in real services under wrk.

Each service is traced with OpenTelemetry's SDK and its framework's
instrumentation, and exports its spans to a file: the ground truth of
which trace and span ran where, and of each span's CPU, which the app
measures itself.  Two routes burn CPU, each in its own function, in slices
with a yield between them, so their requests interleave on the loop; a
third blocks the loop.  The profile must then link each sample of a
route's function to a span of that route, and each stall to ``/block``.
A fourth waits in a ``to_thread`` worker, where off-CPU waits must name it.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from _support import NOBODY, SYSTEM_PYTHON, sampling
from services import Service, app_directory, clean_environment

from ebpf_stream._convert import pprof_pb2

ROOT = Path(__file__).resolve().parent.parent
ROUTES = {"/alpha": "alpha_burn", "/beta": "beta_burn"}  # route -> the function it burns in
BLOCK = "block_handler"

# Burns CPU in slices, yielding between them: requests interleave.  The
# span's CPU is what the app measured of its own slices.
COMMON = '''
import json
import os
import time

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


class FileSpans(SpanExporter):
    def __init__(self, path):
        self._file = open(path, "a", buffering=1)

    def export(self, spans):
        for s in spans:
            self._file.write(json.dumps({
                "trace_id": format(s.context.trace_id, "032x"),
                "span_id": format(s.context.span_id, "016x"),
                "route": s.attributes.get("http.route"),
                "cpu_ns": s.attributes.get("app.cpu_ns", 0)}) + "\\n")
        return SpanExportResult.SUCCESS

    def shutdown(self):
        self._file.close()


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(FileSpans(os.environ["APP_SPANS"])))
trace.set_tracer_provider(provider)


def alpha_burn(seconds):
    start, deadline = time.thread_time_ns(), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass
    return time.thread_time_ns() - start


def beta_burn(seconds):
    start, deadline = time.thread_time_ns(), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass
    return time.thread_time_ns() - start


def waiting(seconds):
    time.sleep(seconds)


async def serve(burn, seconds, sleep):
    cpu = 0
    for _ in range(3):
        cpu += burn(seconds)
        await sleep(0)
    trace.get_current_span().set_attribute("app.cpu_ns", cpu)
    return cpu
'''

FASTAPI_APP = COMMON + f'''
import asyncio

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from ebpf_stream.integrations.starlette import ProfilingLifespan

profiling = ProfilingLifespan()
app = FastAPI(lifespan=profiling)


@app.get("/mode")
async def mode():
    profiler = profiling.profiler
    return {{"pid": os.getpid(), "mode": None if profiler is None else profiler.mode}}


@app.get("/alpha")
async def alpha_handler():
    return {{"cpu": await serve(alpha_burn, 0.02, asyncio.sleep)}}


@app.get("/beta")
async def beta_handler():
    return {{"cpu": await serve(beta_burn, 0.01, asyncio.sleep)}}


@app.get("/block")
async def {BLOCK}():
    time.sleep(0.2)
    return {{"blocked": True}}


@app.get("/wait")
async def wait_handler():
    await asyncio.to_thread(waiting, 0.01)
    return {{"waited": True}}


FastAPIInstrumentor.instrument_app(app, excluded_urls="/mode")
'''

AIOHTTP_APP = COMMON + f'''
import asyncio
import sys

from aiohttp import web
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

AioHttpServerInstrumentor().instrument()  # before the app: it patches web.Application

from ebpf_stream.integrations.aiohttp import ProfilingContext

profiling = ProfilingContext()


async def mode(request):
    profiler = profiling.profiler
    return web.json_response({{"pid": os.getpid(),
                              "mode": None if profiler is None else profiler.mode}})


async def alpha_handler(request):
    return web.json_response({{"cpu": await serve(alpha_burn, 0.02, asyncio.sleep)}})


async def beta_handler(request):
    return web.json_response({{"cpu": await serve(beta_burn, 0.01, asyncio.sleep)}})


async def {BLOCK}(request):
    time.sleep(0.2)
    return web.json_response({{"blocked": True}})


async def wait_handler(request):
    await asyncio.to_thread(waiting, 0.01)
    return web.json_response({{"waited": True}})


app = web.Application()
app.cleanup_ctx.append(profiling)
app.router.add_get("/mode", mode)
app.router.add_get("/alpha", alpha_handler)
app.router.add_get("/beta", beta_handler)
app.router.add_get("/block", {BLOCK})
app.router.add_get("/wait", wait_handler)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
'''


class Span(NamedTuple):
    route: str | None
    cpu_ns: int


class Sampled(NamedTuple):
    functions: tuple[str, ...]
    labels: dict[str, str]
    weight: int
    waited_ns: int = 0  # off the CPU


@pytest.fixture
def service_dir() -> Iterator[Path]:
    with app_directory({"app_fastapi.py": FASTAPI_APP, "app_aiohttp.py": AIOHTTP_APP},
                       "out", "spans") as path:
        yield path


def environment(spans: Path, **variables: str) -> dict[str, str]:
    return clean_environment(APP_SPANS=str(spans), OTEL_SEMCONV_STABILITY_OPT_IN="http",
                             **variables)


def spans(path: Path) -> dict[tuple[str, str], Span]:
    """(trace id, span id) -> the span, of every span the app exported."""
    found = {}
    for line in path.read_text().splitlines():
        span = json.loads(line)
        found[span["trace_id"], span["span_id"]] = Span(span["route"], span["cpu_ns"])
    return found


def samples(path: Path) -> list[Sampled]:
    profile = pprof_pb2.Profile.FromString(gzip.decompress(path.read_bytes()))
    strings = profile.string_table
    functions = {f.id: strings[f.name] for f in profile.function}
    locations = {loc.id: [functions[line.function_id] for line in loc.line]
                 for loc in profile.location}
    return [Sampled(tuple(name for at in s.location_id for name in locations[at]),
                    {strings[label.key]: strings[label.str] for label in s.label if label.str},
                    s.value[0], s.value[2] if len(s.value) > 2 else 0)
            for s in profile.sample]


def stalls(path: Path) -> list[tuple[str, dict[str, str]]]:
    """(trace id, attributes) of each stall log record in an OTLP/JSON file."""
    found = []
    for line in path.read_text().splitlines():
        for resource in json.loads(line).get("resourceLogs", []):
            for scope in resource["scopeLogs"]:
                for record in scope["logRecords"]:
                    if record.get("eventName") == "asyncio.loop.stall":
                        found.append((record.get("traceId", ""), {
                            a["key"]: str(next(iter(a["value"].values())))
                            for a in record["attributes"]}))
    return found


def drive(service: Service) -> None:
    """Load on both CPU routes together, then three blocking requests."""
    service.load(seconds=6, connections=4, paths=list(ROUTES))
    for _ in range(3):
        assert service.get("/block") == {"blocked": True}
        time.sleep(0.3)  # the fallback sees a stall end at the loop's next wait


def check(profile: list[Sampled], traced: dict[tuple[str, str], Span],
          stalled: list[tuple[str, dict[str, str]]]) -> None:
    routes_of_traces = {trace: span.route for (trace, _), span in traced.items() if span.route}
    in_spans = linked = 0
    by_route: Counter[str] = Counter()
    for s in profile:
        route = next((r for r, f in ROUTES.items() if f in s.functions), None)
        trace, span_id = s.labels.get("trace_id"), s.labels.get("span_id")
        if trace and span_id:
            assert (trace, span_id) in traced, f"a sample links to a span never exported: {s}"
            by_route[routes_of_traces.get(trace, "")] += s.weight
        if route is None:
            continue
        in_spans += s.weight
        if trace and span_id:
            linked += s.weight
            # Every sample of a route's function is that route's.
            assert routes_of_traces.get(trace) == route, s
            assert s.labels.get("http.route") == route, s
            assert s.labels.get("http.request.method") == "GET", s
    assert in_spans >= 200, in_spans
    assert linked >= 0.95 * in_spans, (linked, in_spans)

    # The CPU per route, against what the app measured of its spans.
    measured: Counter[str] = Counter()
    for span in traced.values():
        if span.route in ROUTES:
            measured[span.route] += span.cpu_ns
    sampled_total = sum(by_route[r] for r in ROUTES)
    for route in ROUTES:
        share = by_route[route] / sampled_total
        truth = measured[route] / sum(measured.values())
        assert abs(share - truth) <= 0.03, (route, share, truth, by_route, measured)

    # Each stall names the request that blocked the loop: the three of /block,
    # and any the load caused on a busy machine (its request's).
    blocked = [(t, a) for t, a in stalled if a.get("code.function.name") == BLOCK]
    assert len(blocked) == 3, [(t, a.get("code.function.name"), a.get("http.route"))
                               for t, a in stalled]
    for trace, attributes in stalled:
        route = attributes.get("http.route")
        if (trace, attributes) in blocked:
            assert route == "/block", attributes
        assert route in (*ROUTES, "/block") and routes_of_traces.get(trace) == route, (
            trace, attributes)


@pytest.mark.parametrize("kind", ["uvicorn", "aiohttp"])
@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_samples_and_stalls_name_the_route_and_trace_they_ran_for(
        kind: str, service_dir: Path, services: list[Service]) -> None:
    out = service_dir / "out"
    service = Service(kind, service_dir, environment(
        service_dir / "spans" / "spans.jsonl",
        EBPF_STREAM_OUTPUT=f"{out}/cpu.pb.gz,{out}/trace.otlp.jsonl"))
    services.append(service)
    service.modes(1)
    drive(service)
    assert service.stop() == 0, service.stderr
    assert "Traceback" not in service.stderr, service.stderr
    assert (out / "cpu.pb.gz").exists(), (sorted(p.name for p in out.iterdir()), service.stderr)
    check(samples(out / "cpu.pb.gz"), spans(service_dir / "spans" / "spans.jsonl"),
          stalls(out / "trace.otlp.jsonl"))


@pytest.mark.parametrize("kind", ["uvicorn", "aiohttp"])
@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_waits_name_the_route_and_trace_they_waited_for(
        kind: str, service_dir: Path, services: list[Service]) -> None:
    out = service_dir / "out"
    traced_path = service_dir / "spans" / "spans.jsonl"
    service = Service(kind, service_dir, environment(
        traced_path, EBPF_STREAM_OUTPUT=f"{out}/cpu.pb.gz", EBPF_STREAM_OFF_CPU="true"))
    services.append(service)
    service.modes(1)
    service.load(seconds=4, connections=4, paths=["/wait"])
    assert service.stop() == 0, service.stderr
    traced = spans(traced_path)
    routes_of_traces = {trace: span.route for (trace, _), span in traced.items() if span.route}
    waits = [s for s in samples(out / "cpu.pb.gz") if s.waited_ns and "waiting" in s.functions]
    assert sum(s.waited_ns for s in waits) >= 1e9, "the load waited seconds in waiting()"
    linked = 0
    for s in waits:
        trace, span_id = s.labels.get("trace_id"), s.labels.get("span_id")
        assert s.labels.get("http.route") == "/wait", s
        if trace and span_id:
            assert (trace, span_id) in traced and routes_of_traces[trace] == "/wait", s
            linked += s.waited_ns
    assert linked >= 0.95 * sum(s.waited_ns for s in waits)


UNPRIVILEGED = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not SYSTEM_PYTHON.exists(),
    reason="dropping privileges needs root, setpriv and Debian's python3")


def unprivileged(service_dir: Path, **variables: str) -> dict[str, str]:
    return environment(service_dir / "spans" / "spans.jsonl",
                       PYTHONPATH=f"{ROOT}:{sysconfig.get_paths()['purelib']}", **variables)


@pytest.mark.parametrize("kind", ["uvicorn", "aiohttp"])
@UNPRIVILEGED
def test_an_unprivileged_service_names_its_requests_in_fallback_mode(
        kind: str, service_dir: Path, services: list[Service]) -> None:
    out = service_dir / "out"
    service = Service(kind, service_dir, unprivileged(
        service_dir, EBPF_STREAM_OUTPUT=f"{out}/cpu.pb.gz,{out}/trace.otlp.jsonl"),
        prefix=NOBODY, python=str(SYSTEM_PYTHON))
    services.append(service)
    service.modes(1, mode="fallback")
    drive(service)
    assert service.stop() == 0, service.stderr
    assert (out / "cpu.pb.gz").exists(), (sorted(p.name for p in out.iterdir()), service.stderr)
    check(samples(out / "cpu.pb.gz"), spans(service_dir / "spans" / "spans.jsonl"),
          stalls(out / "trace.otlp.jsonl"))


@UNPRIVILEGED
@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_an_agent_names_the_requests_of_an_unprivileged_service(
        service_dir: Path, services: list[Service], tmp_path: Path) -> None:
    """The service only runs the integration, with nowhere to write: it publishes,
    and ``record --pid`` run by root reads."""
    service = Service("uvicorn", service_dir, unprivileged(service_dir), prefix=NOBODY,
                      python=str(SYSTEM_PYTHON))
    services.append(service)
    assert service.first_answer()["mode"] is None, service.stderr
    pid = int(service.first_answer()["pid"])  # type: ignore[call-overload]
    out = tmp_path / "cpu.pb.gz"
    trace = tmp_path / "trace.otlp.jsonl"
    record = subprocess.Popen(
        [sys.executable, "-m", "ebpf_stream._cli", "record", "--pid", str(pid), "--rate", "99",
         "-o", str(out), "-o", str(trace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sampling(record.pid):
            assert time.monotonic() < deadline and record.poll() is None, record.stderr
            time.sleep(0.1)
        drive(service)
    finally:
        record.send_signal(2)
        _, stderr = record.communicate(timeout=60)
    assert record.returncode == 0, stderr
    assert service.stop() == 0, service.stderr
    check(samples(out), spans(service_dir / "spans" / "spans.jsonl"), stalls(trace))
