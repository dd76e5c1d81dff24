"""The framework helpers in real servers: uvicorn, gunicorn and aiohttp on 127.0.0.1, under wrk.

Each test starts a service as its users run it, configured by the
environment alone, drives it over HTTP and stops it with the signal its
server is stopped with; then reads what it wrote and what it logged.  The
services log through ``logging.lastResort`` (none of them configures the
root logger), so each warning of ours is one bare line on stderr.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import sysconfig
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

import otlp_stacks
import pytest
from _support import NOBODY, SYSTEM_PYTHON
from anyio.from_thread import start_blocking_portal
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from otlp_json_decode import decode_otlp_json
from otlp_receivers import http_receiver
from services import Service, app_directory, clean_environment

from ebpf_stream._convert import pprof_pb2 as _pprof_pb2

ROOT = Path(__file__).resolve().parent.parent
BUSY = "checkout_busy_handler"
BLOCK = "checkout_block_handler"  # sleeps 200 ms on the event loop: one stall per request

FASTAPI_APP = f"""
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request

from ebpf_stream.integrations.starlette import ProfilingLifespan


# Ground truth for the busy handler's share: its own CPU, and the process's,
# from the moment the profiler runs (this lifespan runs inside its own).
BUSY_NS = 0
PROFILED_FROM = (0, 0)  # the process's CPU, the profiler's own


def profiler_ns() -> int:
    profiler = profiling.profiler
    return 0 if profiler is None else profiler.get_overhead().user_cpu_ns


@asynccontextmanager
async def app_lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
    global PROFILED_FROM
    PROFILED_FROM = (time.process_time_ns(), profiler_ns())
    yield {{"greeting": "hello"}}
    Path(f"app-shutdown.{{os.getpid()}}").write_text("done")


# APP_OUTPUT: an output the code names, as a service would in its source.
code = {{"outputs": [os.environ["APP_OUTPUT"]]}} if "APP_OUTPUT" in os.environ else {{}}
profiling = ProfilingLifespan(app_lifespan, **code)
app = FastAPI(lifespan=profiling)


@app.get("/mode")
async def mode(request: Request) -> dict[str, object]:
    profiler = profiling.profiler
    return {{"pid": os.getpid(), "mode": None if profiler is None else profiler.mode,
            "state": request.state.greeting}}


@app.get("/busy")
async def {BUSY}() -> dict[str, int]:
    global BUSY_NS
    start = time.thread_time_ns()
    deadline, n = time.perf_counter() + 0.002, 0
    while time.perf_counter() < deadline:
        n += 1
    BUSY_NS += time.thread_time_ns() - start
    return {{"n": n}}


@app.get("/truth")
async def truth() -> dict[str, int]:
    return {{"busy_ns": BUSY_NS, "process_ns": time.process_time_ns() - PROFILED_FROM[0],
            "profiler_ns": profiler_ns() - PROFILED_FROM[1]}}


@app.get("/block")
async def {BLOCK}() -> dict[str, bool]:
    time.sleep(0.2)
    return {{"blocked": True}}
"""

AIOHTTP_APP = f"""
import os
import sys
import time

from aiohttp import web

from ebpf_stream.integrations.aiohttp import ProfilingContext

code = {{"outputs": [os.environ["APP_OUTPUT"]]}} if "APP_OUTPUT" in os.environ else {{}}
profiling = ProfilingContext(**code)


async def mode(request: web.Request) -> web.Response:
    profiler = profiling.profiler
    return web.json_response({{"pid": os.getpid(),
                              "mode": None if profiler is None else profiler.mode}})


async def {BUSY}(request: web.Request) -> web.Response:
    deadline, n = time.perf_counter() + 0.002, 0
    while time.perf_counter() < deadline:
        n += 1
    return web.json_response({{"n": n}})


async def {BLOCK}(request: web.Request) -> web.Response:
    time.sleep(0.2)
    return web.json_response({{"blocked": True}})


app = web.Application()
app.cleanup_ctx.append(profiling)
app.router.add_get("/mode", mode)
app.router.add_get("/busy", {BUSY})
app.router.add_get("/block", {BLOCK})

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def assert_clean_shutdown(service: Service, cwd: Path, workers: Iterable[int]) -> None:
    """Exit status 0, nothing in the server's log says shutdown went wrong, and each
    worker's FastAPI app ran its own lifespan's shutdown."""
    err = service.stderr
    assert service.returncode == 0, err
    assert "Traceback" not in err, err
    assert "shutdown failed" not in err.lower(), err
    if "uvicorn" in service.kind.lower():
        assert "Application shutdown complete." in err, err
        for pid in workers:
            assert (cwd / f"app-shutdown.{pid}").exists(), f"worker {pid}: no app shutdown"


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """The apps, in a directory any uid may write to."""
    with app_directory({"app_fastapi.py": FASTAPI_APP, "app_aiohttp.py": AIOHTTP_APP},
                       "out") as path:
        yield path


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as resources:
        yield resources


def environment(**variables: str) -> dict[str, str]:
    """A clean environment (see ``clean_environment``) exporting every second."""
    return clean_environment(**{"EBPF_STREAM_EXPORT_INTERVAL": "1", **variables})


# -- what the files hold --------------------------------------------------------------------


def folded(path: Path) -> dict[str, int]:
    stacks = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        assert stack and count.isdigit(), line
        stacks[stack] = int(count)
    return stacks


def pprof(path: Path) -> tuple[set[int], set[str]]:
    """(the pids of the samples, the function names) of a pprof file."""
    profile = _pprof_pb2.Profile.FromString(gzip.decompress(path.read_bytes()))
    strings = profile.string_table
    pids = {label.num for sample in profile.sample for label in sample.label
            if strings[label.key] == "pid"}
    return pids, {strings[f.name] for f in profile.function}


def otlp_profiles(path: Path) -> list[ExportProfilesServiceRequest]:
    lines = path.read_bytes().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    return [decode_otlp_json(line, ExportProfilesServiceRequest) for line in lines
            if b'"resourceProfiles"' in line]


def wait_for(condition: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def names_busy(path: Path) -> bool:
    return path.exists() and any(f"{BUSY} (" in stack for stack in folded(path))


# -- one process ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uvicorn", "aiohttp"])
@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_a_service_serves_at_once_is_profiled_under_load_and_shuts_down_clean(
        kind: str, service_dir: Path, services: list[Service],
        stack: contextlib.ExitStack) -> None:
    out = service_dir / "out"
    outputs = [out / "cpu.folded", out / "cpu.pb.gz", out / "cpu.otlp.jsonl", out / "cpu.svg"]
    # And OTLP, to a collector the environment names.
    portal = stack.enter_context(start_blocking_portal("asyncio"))
    collector = stack.enter_context(portal.wrap_async_context_manager(http_receiver()))
    service = Service(kind, service_dir, environment(
        EBPF_STREAM_OUTPUT=",".join(map(str, outputs)), OTEL_SERVICE_NAME="checkout",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint))
    services.append(service)
    first = service.first_answer()
    assert first["pid"] == service.proc.pid
    assert first["mode"] == "starting", "the service answers while the probes come up"
    if kind == "uvicorn":
        assert first["state"] == "hello", "the app's own lifespan ran, and its state is served"
    service.modes(1)
    service.load()
    wait_for(lambda: names_busy(out / "cpu.folded"))
    service.stop()
    assert_clean_shutdown(service, service_dir, [service.proc.pid])
    assert service.ours == [], service.stderr

    app = "app_fastapi.py" if kind == "uvicorn" else "app_aiohttp.py"
    assert any(re.search(rf"{BUSY} \({app}:\d+\)", stack) for stack in folded(outputs[0]))
    pids, functions = pprof(outputs[1])
    assert pids == {service.proc.pid} and BUSY in functions
    requests = otlp_profiles(outputs[2])
    stacks = otlp_stacks.stacks(requests)
    assert {pid for pid, _ in stacks} == {service.proc.pid}
    assert any(frame.startswith(f"{BUSY} ({app}:") for _, frames in stacks for frame in frames)
    resources = [otlp_stacks.resource_attributes(rp.resource)
                 for request in requests for rp in request.resource_profiles]
    assert {r["service.name"] for r in resources} == {"checkout"}
    sent = otlp_stacks.stacks(collector.requests("profiles"))  # type: ignore[arg-type]
    assert {pid for pid, _ in sent} == {service.proc.pid}
    assert sum(sent.values()) == sum(stacks.values()), "the collector got what the file holds"
    assert any(BUSY in text for text in ET.parse(outputs[3]).getroot().itertext())


# -- several processes ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uvicorn --workers 2", "gunicorn UvicornWorker",
                                  "gunicorn GunicornWebWorker"])
@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_each_worker_profiles_itself_and_no_two_write_one_file(
        kind: str, service_dir: Path, services: list[Service]) -> None:
    out = service_dir / "out"
    service = Service(kind, service_dir, environment(
        EBPF_STREAM_OUTPUT=f"{out}/cpu.{{pid}}.pb.gz,{out}/cpu.folded"))
    services.append(service)
    workers = set(service.modes(2))
    assert service.proc.pid not in workers, "the workers profile, not the supervisor"
    service.load(connections=8)
    wait_for(lambda: all((out / f"cpu.{pid}.pb.gz").exists() for pid in workers))
    service.stop()
    assert_clean_shutdown(service, service_dir, workers)

    # {pid} names each worker's file; the name without it went to one worker, and the
    # other wrote its own file, saying so once.
    (taker,) = [pid for pid in workers if (out / f"cpu.{pid}.folded").exists()]
    (owner,) = workers - {taker}
    assert service.ours == [
        f"ebpf-stream: {out}/cpu.folded is written by pid {owner}; this process (pid {taker}) "
        f"writes {out}/cpu.{taker}.folded (put {{pid}} in EBPF_STREAM_OUTPUT to name each "
        "process's file)"], service.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [*(f"cpu.{pid}.pb.gz" for pid in workers), "cpu.folded", f"cpu.{taker}.folded"])
    assert (out / ".cpu.folded.lock").read_text() == f"{owner}\n"
    functions: set[str] = set()
    for pid in workers:
        pids, names = pprof(out / f"cpu.{pid}.pb.gz")
        assert pids <= {pid}, f"cpu.{pid}.pb.gz holds samples of {pids}"
        functions |= names
        folded(out / ("cpu.folded" if pid == owner else f"cpu.{pid}.folded"))
    assert BUSY in functions


# -- the environment refuses BPF ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uvicorn", "aiohttp"])
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or not SYSTEM_PYTHON.exists(),
                    reason="dropping privileges needs root, setpriv and Debian's python3")
def test_an_unprivileged_service_is_profiled_in_fallback_mode_under_load(
        kind: str, service_dir: Path, services: list[Service]) -> None:
    out = service_dir / "out"
    # 499 Hz: about 2,000 samples in the load, so that a share is known to a point.
    env = environment(EBPF_STREAM_OUTPUT=f"{out}/cpu.folded,{out}/trace.otlp.jsonl",
                      EBPF_STREAM_SAMPLE_RATE="499",
                      PYTHONPATH=f"{ROOT}:{sysconfig.get_paths()['purelib']}")
    service = Service(kind, service_dir, env, prefix=NOBODY, python=str(SYSTEM_PYTHON))
    services.append(service)
    assert service.first_answer()["pid"] == service.proc.pid
    service.modes(1, mode="fallback")
    service.load(seconds=4, connections=8)
    for _ in range(3):
        assert service.get("/block") == {"blocked": True}
        time.sleep(0.3)
    truth = service.get("/truth") if kind == "uvicorn" else None
    service.stop()
    assert_clean_shutdown(service, service_dir, [service.proc.pid])
    (line,) = service.ours
    assert line.startswith("ebpf-stream: profiling in fallback mode (in-process sampling, "
                           "Python frames only): privileges: loading BPF needs "
                           "CAP_BPF and CAP_PERFMON"), line
    assert "uid 65534" in line and "fix: " in line
    stacks = folded(out / "cpu.folded")
    assert any(BUSY in stack for stack in stacks), sorted(stacks.items(), key=lambda s: -s[1])[:5]
    if truth is not None:
        # The busy handler's share of the profile is its share of the service's CPU:
        # the process's, less the profiler's own (which get_overhead() reports, and
        # which the profile leaves out).
        busy = sum(n for stack, n in stacks.items() if BUSY in stack) / sum(stacks.values())
        host_ns = int(truth["process_ns"]) - int(truth["profiler_ns"])  # type: ignore[call-overload]
        expected = int(truth["busy_ns"]) / host_ns  # type: ignore[call-overload]
        assert abs(busy - expected) <= 0.03, (busy, expected, truth, sum(stacks.values()))
    # One stall per /block request, naming it.  (Under wrk, uvloop's waits, which are
    # polled, may also show the loop kept off a loaded machine's CPU as a stall.)
    stalls = [a for a in stall_records(out / "trace.otlp.jsonl")
              if a["code.function.name"] == BLOCK]
    assert len(stalls) == 3, stalls
    assert all(0.19 <= a["asyncio.loop.stall.duration"] < 0.3 for a in stalls), stalls


def stall_records(path: Path) -> list[dict[str, object]]:
    """The attributes of each stall log record in an OTLP/JSON file, in time order."""
    records = []
    for line in path.read_text().splitlines():
        for resource in json.loads(line).get("resourceLogs", []):
            for scope in resource["scopeLogs"]:
                assert {"key": "ebpf_stream.mode", "value": {"stringValue": "fallback"}} in (
                    scope["scope"]["attributes"])
                for record in scope["logRecords"]:
                    if record.get("eventName") == "asyncio.loop.stall":
                        records.append((int(record["timeUnixNano"]), {
                            a["key"]: next(iter(a["value"].values()))
                            for a in record["attributes"]}))
    return [attributes for _, attributes in sorted(records, key=lambda r: r[0])]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or not SYSTEM_PYTHON.exists(),
                    reason="dropping privileges needs root, setpriv and Debian's python3")
def test_where_profiling_is_mandatory_an_unprivileged_service_does_not_start(
        service_dir: Path, services: list[Service]) -> None:
    env = environment(EBPF_STREAM_OUTPUT=f"{service_dir}/out/cpu.folded",
                      EBPF_STREAM_ON_UNAVAILABLE="raise",
                      PYTHONPATH=f"{ROOT}:{sysconfig.get_paths()['purelib']}")
    service = Service("uvicorn", service_dir, env, prefix=NOBODY, python=str(SYSTEM_PYTHON))
    services.append(service)
    assert service.proc.wait(60) != 0
    assert service.get("/mode") is None
    assert service.ours == [], "raised, not logged as a warning"
    (line,) = [line for line in service.stderr.splitlines() if "CAP_BPF" in line]
    assert line.startswith("ebpf_stream._base.errors.EnvironmentCheckError: privileges: "), line
    assert "Application startup failed" in service.stderr


# -- mistakes and failures ------------------------------------------------------------------


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_a_service_stopped_while_the_probes_come_up_shuts_down_clean(
        service_dir: Path, services: list[Service]) -> None:
    service = Service("uvicorn", service_dir, environment(
        EBPF_STREAM_OUTPUT=f"{service_dir}/out/cpu.folded"))
    services.append(service)
    assert service.first_answer()["mode"] == "starting"
    service.stop()
    assert_clean_shutdown(service, service_dir, [service.proc.pid])
    assert service.ours == [], service.stderr


@pytest.mark.parametrize(("kind", "source"), [("uvicorn", "env"), ("aiohttp", "code")])
def test_an_output_directory_that_does_not_exist_stops_the_service_at_startup(
        kind: str, source: str, service_dir: Path, services: list[Service]) -> None:
    bad = service_dir / "missing" / "cpu.folded"
    name = "EBPF_STREAM_OUTPUT" if source == "env" else "outputs"
    service = Service(kind, service_dir, environment(**{
        "EBPF_STREAM_OUTPUT" if source == "env" else "APP_OUTPUT": str(bad)}))
    services.append(service)
    assert service.proc.wait(60) != 0
    assert service.get("/mode") is None
    message = f"{name}: cannot write {bad}: directory {bad.parent} does not exist"
    lines = [line for line in service.stderr.splitlines() if "cannot write" in line]
    assert len(lines) == 1 and lines[0].endswith(f"ConfigError: {message}"), service.stderr


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_an_exporter_failing_during_the_run_never_fails_the_shutdown(
        service_dir: Path, services: list[Service]) -> None:
    out = service_dir / "out" / "gone"
    out.mkdir()
    path = out / "cpu.folded"
    service = Service("uvicorn", service_dir, environment(
        EBPF_STREAM_OUTPUT=str(path), EBPF_STREAM_EXPORT_INTERVAL="0.5"))
    services.append(service)
    service.modes(1)
    service.load(seconds=1)
    wait_for(path.exists)
    shutil.rmtree(out)  # from now on, every write fails
    service.load(seconds=2)
    service.stop()
    assert_clean_shutdown(service, service_dir, [service.proc.pid])
    failure = f"cannot write {path}: No such file or directory"
    assert f"ebpf-stream: profiling ended with an error: {failure}" in service.ours, (
        service.stderr)
    assert len(service.ours) == 1, service.stderr
    # When it happened, the engine logged it too, also as one line.
    assert f"exporter FoldedFileExporter failed: {failure}" in service.stderr.splitlines()
