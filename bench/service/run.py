"""A service under load: what each way of profiling costs a FastAPI app.

Runs ``app.py`` under uvicorn (one worker, ``--loop asyncio``, ``--http
h11``, no access log) in seven modes: ``none``; ``ebpf-stream`` (production
preset in the lifespan, started in the background, folded + OTLP/JSON
files); ``py-spy`` (``py-spy record --rate 100 --nonblocking`` attached
from outside); ``pyroscope`` (pyroscope-io's agent at 100 Hz, uploading to
a port where nothing listens); ``otel`` (OpenTelemetry's FastAPI
instrumentation, the SDK and a batch span processor to an exporter that
discards); ``otel+ebpf-stream`` (that tracing, profiled as in
``ebpf-stream``, so that samples name their requests); ``otel+publish``
(that tracing, publishing requests as the profiler's start does, with no
profiler: the wrapper of OpenTelemetry's context alone).  Each round runs
every mode once, in an order rotated from round to round.  Per run:

1. spawn the service; **time to ready** is from spawn until ``/health``
   first answers 200 (polled every 5 ms); for ebpf-stream (both modes), also
   until the profiler has left ``starting`` (its probes load in the
   background);
2. attach py-spy (py-spy mode), warm up with wrk, then drive ``/work`` with
   wrk (fixed threads, connections, duration, ``--latency``);
3. over exactly wrk's run, the service's CPU (utime + stime of its process
   tree from ``/proc/PID/stat``) divided by the requests wrk completed; and
   its VmRSS, RssAnon and RssFile before and at the end of the load, and
   py-spy's own CPU over the same window; ebpf-stream's ``get_overhead()``
   from ``/overhead`` right after;
4. stop it with SIGINT, timing the shutdown, and check the profiler's output
   (with ebpf-stream, how many of its OTLP samples name a span and the route).

The service is pinned to one CPU and wrk (and py-spy) to the other, so
everything the profiler does in the service's process competes with the
service's requests, and the load generator never does.

    sudo .venv/bin/python bench/service/run.py                # 5 rounds of 30 s: about 20 minutes
    sudo .venv/bin/python bench/service/run.py --quick        # 2 rounds of 10 s: about 3 minutes
    sudo .venv/bin/python bench/service/run.py --modes none ebpf-stream otel otel+ebpf-stream
    sudo .venv/bin/python bench/service/run.py --rounds 1 --duration 5 --modes none ebpf-stream
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for its helpers
from benchmarks._support import checkout_of

MODES = ("none", "ebpf-stream", "py-spy", "pyroscope", "otel", "otel+ebpf-stream",
         "otel+publish")
PROFILED = ("ebpf-stream", "otel+ebpf-stream")  # ebpf-stream in the process
HERE = Path(__file__).resolve().parent
PY_SPY = Path(sys.executable).parent / "py-spy"
WORK_PATH = "/work?seed=42"
POLL_S = 0.005
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 2**20


# -- processes -------------------------------------------------------------------


def free_port() -> int:
    """A loopback port that nothing listens on (the socket is closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on


def tree(pid: int) -> list[int]:
    """``pid`` and its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``'s process tree, reaped children included."""
    ticks = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            f = _stat_fields(p)
            ticks += sum(int(f[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / CLK_TCK


def memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of ``pid``, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for(what: str, check: Callable[[], bool], alive: Callable[[], bool],
             timeout: float = START_TIMEOUT_S, poll: float = POLL_S) -> float:
    """Poll ``check`` every ``poll`` seconds until it holds; the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return time.monotonic()
        if not alive():
            raise RuntimeError(f"exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {timeout:g} s")
        time.sleep(poll)


# -- wrk -------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclasses.dataclass
class WrkFigures:
    requests: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx responses plus socket errors


def parse_wrk(out: str) -> WrkFigures:
    percentiles = dict(re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.M))
    requests = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", out, re.M)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not (requests and rate and "50" in percentiles and "99" in percentiles):
        raise ValueError(f"cannot read wrk's output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    if socket_errors := re.search(r"Socket errors:(.*)$", out, re.M):
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return WrkFigures(int(requests.group(1)), _ms(requests.group(2)) / 1e3,
                      float(rate.group(1)), _ms(percentiles["50"]), _ms(percentiles["99"]),
                      errors)


def wrk(port: int, args: argparse.Namespace, seconds: float, cpu: int | None) -> str:
    argv = pinned(cpu, ["wrk", f"-t{args.threads}", f"-c{args.connections}",
                        f"-d{seconds:g}s", "--timeout", "5s", "--latency",
                        f"http://127.0.0.1:{port}{WORK_PATH}"])
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


# -- one run ---------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    mode: str
    round: int
    position: int  # place in the round's order, from 0
    ready_ms: float = 0.0
    profiling_ms: float | None = None  # ebpf-stream: until the profiler left "starting"
    wrk: WrkFigures | None = None
    cpu_s: float = 0.0
    cpu_us_per_request: float = 0.0
    memory_before: dict[str, int] = dataclasses.field(default_factory=dict)
    memory_after: dict[str, int] = dataclasses.field(default_factory=dict)
    tool_cpu_s: float | None = None  # py-spy's own process
    tool_cpu_us_per_request: float | None = None
    tool_memory: dict[str, int] | None = None
    overhead: dict[str, Any] | None = None  # ebpf-stream's /overhead at the end of the load
    overhead_at_load: dict[str, Any] | None = None  # and as the load window began
    shutdown_ms: float = 0.0
    # ebpf-stream: the service's samples, and those naming a span and the route of /work
    requests: dict[str, int] | None = None
    outputs: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    log: list[str] = dataclasses.field(default_factory=list)


def attributed(path: Path) -> dict[str, int]:
    """Samples in an OTLP/JSON profiles file: all, those linked to a span, and those
    with ``http.route`` ``/work`` (the requests under load) as well."""
    counts = {"samples": 0, "with_span": 0, "with_route": 0}
    with path.open() as f:
        for line in f:
            request = json.loads(line)
            if "resourceProfiles" not in request:
                continue
            d = request["dictionary"]
            strings = d.get("stringTable", [])
            route = {i for i, a in enumerate(d.get("attributeTable", []))
                     if a and strings[a.get("keyStrindex", 0)] == "http.route"
                     and a["value"].get("stringValue") == "/work"}
            for resource in request["resourceProfiles"]:
                for scope in resource["scopeProfiles"]:
                    for profile in scope["profiles"]:
                        if strings[profile["sampleType"].get("typeStrindex", 0)] != "samples":
                            continue
                        for sample in profile.get("samples", []):
                            n = len(sample.get("timestampsUnixNano", [])) or sum(
                                int(v) for v in sample.get("values", []))
                            counts["samples"] += n
                            if sample.get("linkIndex"):
                                counts["with_span"] += n
                                if route & set(sample.get("attributeIndices", [])):
                                    counts["with_route"] += n
    return counts


def folded_samples(path: Path) -> int:
    total = 0
    with path.open(errors="replace") as f:
        for line in f:
            head, _, count = line.rstrip("\n").rpartition(" ")
            if head and count.isdigit():
                total += int(count)
    return total


@contextlib.contextmanager
def service(mode: str, port: int, work_dir: Path,
            cpu: int | None) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ, BENCH_SERVICE_MODE=mode, BENCH_SERVICE_OUT=str(work_dir),
               BENCH_SERVICE_PYROSCOPE=f"http://127.0.0.1:{free_port()}", PYTHONUNBUFFERED="1")
    argv = pinned(cpu, [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "app:app",
                        "--host", "127.0.0.1", "--port", str(port), "--loop", "asyncio",
                        "--http", "h11", "--no-access-log"])
    with (work_dir / "service.log").open("wb") as log:
        # Run from the scratch directory: ``python -m`` puts its working directory first
        # on sys.path, where a checkout's ebpf_stream would shadow PYTHONPATH's.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=work_dir)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def measure_run(mode: str, round_: int, position: int, args: argparse.Namespace) -> Run:
    run = Run(mode, round_, position)
    work_dir = Path(tempfile.mkdtemp(prefix=f"bench-service-{mode}-"))
    port = free_port()
    py_spy: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        with service(mode, port, work_dir, args.service_cpu) as proc:
            alive = lambda: proc.poll() is None  # noqa: E731
            ready = wait_for("/health", lambda: get(port, "/health")[0] == 200, alive)
            run.ready_ms = (ready - t0) * 1e3
            if mode in PROFILED:
                def started() -> bool:
                    run.overhead = json.loads(get(port, "/overhead")[1])
                    return run.overhead["mode"] != "starting"
                # Polled less often: these requests share the loop with the start.
                started_at = wait_for("the profiler to start", started, alive, poll=0.05)
                run.profiling_ms = (started_at - t0) * 1e3
                assert run.overhead is not None
                if run.overhead["mode"] != "bpf":
                    raise RuntimeError(f"ebpf-stream is not profiling: {run.overhead}")
                if run.overhead["module"] != args.ebpf_stream_module:
                    raise RuntimeError(f"the service imported {run.overhead['module']}, "
                                       f"not {args.ebpf_stream_module}")
            if mode == "py-spy":
                spy_log = work_dir / "py-spy.log"
                with spy_log.open("wb") as out:
                    py_spy = subprocess.Popen(
                        pinned(args.load_cpu, [str(PY_SPY), "record", "--rate", "100",
                                               "--nonblocking", "--format", "raw",
                                               "-o", str(work_dir / "py-spy.folded"),
                                               "--pid", str(proc.pid)]),
                        stdout=out, stderr=subprocess.STDOUT)
                wait_for("py-spy to sample", lambda: b"Sampling process" in spy_log.read_bytes(),
                         lambda: py_spy is not None and py_spy.poll() is None, timeout=30)
            if args.warmup > 0:
                wrk(port, args, args.warmup, args.load_cpu)

            run.memory_before = memory(proc.pid)
            if mode in PROFILED:
                run.overhead_at_load = json.loads(get(port, "/overhead")[1])
            tool0 = cpu_seconds(py_spy.pid) if py_spy else 0.0
            cpu0 = cpu_seconds(proc.pid)
            out = wrk(port, args, args.duration, args.load_cpu)
            run.cpu_s = cpu_seconds(proc.pid) - cpu0
            tool1 = cpu_seconds(py_spy.pid) if py_spy else 0.0
            run.memory_after = memory(proc.pid)
            run.wrk = parse_wrk(out)
            (work_dir / "wrk.txt").write_text(out)
            requests = max(1, run.wrk.requests)
            run.cpu_us_per_request = run.cpu_s / requests * 1e6
            if py_spy:
                run.tool_cpu_s = tool1 - tool0
                run.tool_cpu_us_per_request = run.tool_cpu_s / requests * 1e6
                run.tool_memory = memory(py_spy.pid)
            if mode in PROFILED:
                run.overhead = json.loads(get(port, "/overhead")[1])

            if py_spy:
                py_spy.send_signal(signal.SIGINT)
                py_spy.wait(STOP_TIMEOUT_S)
            t1 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(STOP_TIMEOUT_S)
            run.shutdown_ms = (time.monotonic() - t1) * 1e3
        for name in ("cpu.folded", "cpu.otlp.jsonl", "py-spy.folded"):
            path = work_dir / name
            if path.exists():
                run.outputs[name] = {"bytes": path.stat().st_size}
                if name.endswith(".folded"):
                    run.outputs[name]["samples"] = folded_samples(path)
        run.log = (work_dir / "service.log").read_text(errors="replace").splitlines()[-40:]
        if mode in PROFILED and not run.outputs.get("cpu.folded", {}).get("samples"):
            raise RuntimeError(f"ebpf-stream wrote no samples; see {work_dir}")
        if mode in PROFILED:
            run.requests = attributed(work_dir / "cpu.otlp.jsonl")
        if mode == "py-spy" and not run.outputs.get("py-spy.folded", {}).get("samples"):
            raise RuntimeError(f"py-spy wrote no samples; see {work_dir}")
        if run.wrk.errors:
            raise RuntimeError(f"{run.wrk.errors} failed requests; see {work_dir}/wrk.txt")
    except BaseException:
        print(f"  {mode}: failed; its files are in {work_dir}", file=sys.stderr)
        if py_spy and py_spy.poll() is None:
            py_spy.kill()
        raise
    if not args.keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return run


# -- figures ---------------------------------------------------------------------


def _value(run: Run, key: str) -> float | None:
    w = run.wrk
    assert w is not None
    values: dict[str, float | None] = {
        "ready_ms": run.ready_ms, "req_per_s": w.req_per_s, "p50_ms": w.p50_ms,
        "p99_ms": w.p99_ms, "cpu_us_per_request": run.cpu_us_per_request,
        "total_cpu_us_per_request": run.cpu_us_per_request + (run.tool_cpu_us_per_request or 0),
        "rss_before_mib": run.memory_before["VmRSS"] / MIB,
        "rss_mib": run.memory_after["VmRSS"] / MIB,
        "anon_mib": run.memory_after["RssAnon"] / MIB,
        "file_mib": run.memory_after["RssFile"] / MIB,
        "shutdown_ms": run.shutdown_ms,
        "tool_cpu_us_per_request": run.tool_cpu_us_per_request,
        "profiling_ms": run.profiling_ms,
    }
    return values[key]


KEYS = ("ready_ms", "req_per_s", "p50_ms", "p99_ms", "cpu_us_per_request",
        "total_cpu_us_per_request", "rss_before_mib", "rss_mib", "anon_mib", "file_mib",
        "shutdown_ms", "tool_cpu_us_per_request", "profiling_ms")
RATIO_KEYS = ("req_per_s", "p50_ms", "p99_ms", "cpu_us_per_request",
              "total_cpu_us_per_request", "ready_ms")
DELTA_KEYS = ("rss_mib", "anon_mib")


def summarize(runs: list[Run], modes: list[str]) -> dict[str, Any]:
    """Medians per mode; ratios (and MiB differences) to ``none`` paired round by round."""
    by: dict[tuple[str, int], Run] = {(r.mode, r.round): r for r in runs}
    rounds = sorted({r.round for r in runs})
    medians: dict[str, dict[str, float | None]] = {}
    for mode in modes:
        mine = [r for r in runs if r.mode == mode]
        medians[mode] = {}
        for key in KEYS:
            values = [v for r in mine if (v := _value(r, key)) is not None]
            medians[mode][key] = statistics.median(values) if values else None

    def paired(mode: str, base: str, key: str, delta: bool = False) -> float | None:
        values = []
        for n in rounds:
            if (mode, n) in by and (base, n) in by:
                a, b = _value(by[mode, n], key), _value(by[base, n], key)
                if a is not None and b:
                    values.append(a - b if delta else a / b)
        return statistics.median(values) if values else None

    vs_none: dict[str, dict[str, float | None]] = {}
    if "none" in modes:
        for mode in modes:
            vs_none[mode] = {key: paired(mode, "none", key) for key in RATIO_KEYS}
            vs_none[mode] |= {f"{key}_delta": paired(mode, "none", key, delta=True)
                              for key in DELTA_KEYS}
    ebpf_vs_pyroscope = None
    if "ebpf-stream" in modes and "pyroscope" in modes:
        ebpf_vs_pyroscope = paired("ebpf-stream", "pyroscope", "cpu_us_per_request")
    # Profiled and traced against traced alone: what ebpf-stream, its requests
    # named, costs a service that OpenTelemetry already traces.
    vs_otel: dict[str, dict[str, float | None]] = {}
    for mode in ("otel+publish", "otel+ebpf-stream"):
        if "otel" in modes and mode in modes:
            vs_otel[mode] = {key: paired(mode, "otel", key) for key in RATIO_KEYS}
            vs_otel[mode] |= {f"{key}_delta": paired(mode, "otel", key, delta=True)
                              for key in DELTA_KEYS}
    return {"medians": medians, "ratios_to_none": vs_none, "ratios_to_otel": vs_otel,
            "cpu_per_request_ebpf_stream_vs_pyroscope": ebpf_vs_pyroscope,
            "ebpf_stream_overhead": _overhead(runs, "ebpf-stream"),
            "otel_ebpf_stream_overhead": _overhead(runs, "otel+ebpf-stream")}


def _overhead(runs: list[Run], mode: str) -> dict[str, float] | None:
    """Medians of ``mode``'s ``/overhead`` readings, and of its requests named."""
    overheads = [r.overhead for r in runs if r.mode == mode and r.overhead]
    overhead = {key: statistics.median(o[key] for o in overheads)
                for key in ("cpu_percent", "memory_bytes", "anon_rss_bytes", "bpf_map_bytes")
                } if overheads else None
    # The profiler's own CPU over exactly the load window, as get_overhead() counts
    # it, against the service's: what CPU per request should rise by, below the
    # noise that the paired ratio cannot see under.
    shares = [((r.overhead["user_cpu_ns"] - r.overhead_at_load["user_cpu_ns"])
               + (r.overhead["bpf_cpu_ns"] - r.overhead_at_load["bpf_cpu_ns"])) / 1e9 / r.cpu_s
              for r in runs if r.mode == mode and r.overhead and r.overhead_at_load]
    if overhead is not None and shares:
        overhead["own_cpu_share_of_service"] = statistics.median(shares)
    named = [r.requests for r in runs if r.mode == mode and r.requests]
    if overhead is not None and named:
        overhead["samples"] = statistics.median(n["samples"] for n in named)
        overhead["with_span_share"] = statistics.median(
            n["with_span"] / max(1, n["samples"]) for n in named)
        overhead["with_route_share"] = statistics.median(
            n["with_route"] / max(1, n["samples"]) for n in named)
    return overhead


def _f(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def tables(summary: dict[str, Any], modes: list[str], runs_per_mode: int) -> str:
    med = summary["medians"]
    lines = [
        f"Medians of {runs_per_mode} run(s) per mode:",
        "",
        "| mode | time to ready ms | req/s | p50 ms | p99 ms | service CPU µs/request "
        "| + py-spy's CPU µs/request | RSS MiB before load | RSS MiB after (anon + file) "
        "| shutdown ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in modes:
        m = med[mode]
        lines.append(
            f"| {mode} | {_f(m['ready_ms'], ',.0f')} | {_f(m['req_per_s'], ',.0f')} | "
            f"{_f(m['p50_ms'], '.2f')} | {_f(m['p99_ms'], '.2f')} | "
            f"{_f(m['cpu_us_per_request'], ',.0f')} | {_f(m['tool_cpu_us_per_request'], ',.0f')} | "
            f"{_f(m['rss_before_mib'], '.1f')} | {_f(m['rss_mib'], '.1f')} "
            f"({_f(m['anon_mib'], '.1f')} + {_f(m['file_mib'], '.1f')}) | "
            f"{_f(m['shutdown_ms'], ',.0f')} |")
    if summary["ratios_to_none"]:
        lines += [
            "",
            "Ratios to `none`, paired round by round (median of the rounds' ratios; RSS as "
            "a difference):",
            "",
            "| mode | req/s | p50 | p99 | service CPU/request | CPU/request incl. py-spy "
            "| time to ready | RSS after, MiB more (anon) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for mode in modes:
            r = summary["ratios_to_none"][mode]
            lines.append(
                f"| {mode} | {_f(r['req_per_s'], '.3f')}x | {_f(r['p50_ms'], '.3f')}x | "
                f"{_f(r['p99_ms'], '.3f')}x | {_f(r['cpu_us_per_request'], '.3f')}x | "
                f"{_f(r['total_cpu_us_per_request'], '.3f')}x | {_f(r['ready_ms'], '.2f')}x | "
                f"{_f(r['rss_mib_delta'], '+.1f')} ({_f(r['anon_mib_delta'], '+.1f')}) |")
    if summary["ratios_to_otel"]:
        lines += [
            "",
            "Ratios to `otel`, paired the same way:",
            "",
            "| mode | req/s | p50 | p99 | service CPU/request | time to ready "
            "| RSS after, MiB more (anon) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for mode, r in summary["ratios_to_otel"].items():
        lines.append(
            f"| {mode} | {_f(r['req_per_s'], '.3f')}x | {_f(r['p50_ms'], '.3f')}x | "
            f"{_f(r['p99_ms'], '.3f')}x | {_f(r['cpu_us_per_request'], '.3f')}x | "
            f"{_f(r['ready_ms'], '.2f')}x | "
            f"{_f(r['rss_mib_delta'], '+.1f')} ({_f(r['anon_mib_delta'], '+.1f')}) |")
    if (ratio := summary["cpu_per_request_ebpf_stream_vs_pyroscope"]) is not None:
        lines += ["", f"Service CPU per request, ebpf-stream / pyroscope (paired): {ratio:.3f}x"]
    for mode, key in (("ebpf-stream", "ebpf_stream_overhead"),
                      ("otel+ebpf-stream", "otel_ebpf_stream_overhead")):
        if not (o := summary.get(key)):
            continue
        m = med[mode]
        lines += ["", f"{mode}: `get_overhead()` at the end of the load (medians): "
                  f"cpu_percent {o['cpu_percent']:.3f}, memory {o['memory_bytes'] / MIB:.1f} MiB "
                  f"of RSS added ({o['anon_rss_bytes'] / MIB:.1f} anonymous), BPF maps "
                  f"{o['bpf_map_bytes'] / MIB:.1f} MiB apart; "
                  f"profiling from spawn {_f(m['profiling_ms'], ',.0f')} ms"]
        if (share := o.get("own_cpu_share_of_service")) is not None:
            lines += ["", f"{mode}: the profiler's own CPU over the load window (user + BPF, "
                      f"as `get_overhead()` counts it) against the service's: {100 * share:.2f}%"]
        if (samples := o.get("samples")) is not None:
            lines += ["", f"{mode}: of the service's samples over the run ({samples:,.0f}), "
                      f"{100 * o['with_span_share']:.1f}% name a span and "
                      f"{100 * o['with_route_share']:.1f}% a span and the route `/work` "
                      "(medians)"]
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------


def code_version() -> str:
    """The commit of the ebpf_stream the service imports, ``+dirty`` if it differs from it."""
    spec = importlib.util.find_spec("ebpf_stream")
    if spec is None or spec.origin is None:
        return "ebpf_stream not found"
    return checkout_of(Path(spec.origin).resolve().parents[1])


def versions() -> dict[str, str]:
    out = {}
    for dist in ("fastapi", "starlette", "uvicorn", "h11", "pyroscope-io", "py-spy",
                 "opentelemetry-sdk", "opentelemetry-instrumentation-fastapi"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out["wrk"] = subprocess.run(["wrk", "--version"], capture_output=True,
                                    text=True).stdout.split()[1]
    return out


def machine_line() -> str:
    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "")
    return (f"{datetime.date.today().isoformat()}, {os.cpu_count()} vCPU {model}, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def check(modes: list[str]) -> str | None:
    if not shutil.which("wrk"):
        return "wrk is not installed (apt-get install -y wrk)"
    if os.geteuid() != 0 and {"ebpf-stream", "otel+ebpf-stream", "py-spy"} & set(modes):
        return "ebpf-stream and py-spy need root"
    if {"otel", "otel+ebpf-stream", "otel+publish"} & set(modes) and importlib.util.find_spec(
            "opentelemetry.instrumentation.fastapi") is None:
        return ("opentelemetry-instrumentation-fastapi is not installed "
                "(pip install opentelemetry-sdk opentelemetry-instrumentation-fastapi)")
    if "py-spy" in modes and not PY_SPY.exists():
        return f"{PY_SPY} is missing (pip install py-spy)"
    if "pyroscope" in modes and importlib.util.find_spec("pyroscope") is None:
        return "pyroscope-io is not installed (pip install pyroscope-io)"
    if importlib.util.find_spec("uvicorn") is None:
        return "uvicorn is not installed (pip install uvicorn)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, help="rounds of every mode (default 5; quick 2)")
    parser.add_argument("--duration", type=float,
                        help="seconds of load per run (default 30; quick 10)")
    parser.add_argument("--warmup", type=float,
                        help="seconds of load before the measured one (default 5; quick 2)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), metavar="MODE",
                        help=f"some of {', '.join(MODES)} (space or comma separated)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 10 s")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--connections", type=int, default=8,
                        help="wrk connections (default 8)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the service and the load generator to separate CPUs")
    parser.add_argument("--keep", action="store_true", help="keep each run's files")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    modes = [m for item in args.modes for m in item.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    rounds = args.rounds or (2 if args.quick else 5)
    args.duration = args.duration or (10.0 if args.quick else 30.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 5.0)
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    args.service_cpu, args.load_cpu = (1, 0) if pin else (None, None)
    if problem := check(modes):
        print(problem, file=sys.stderr)
        return 2

    code = code_version()
    spec = importlib.util.find_spec("ebpf_stream")
    args.ebpf_stream_module = spec.origin if spec else None
    settings = {"rounds": rounds, "duration_s": args.duration, "warmup_s": args.warmup,
                "wrk": f"-t{args.threads} -c{args.connections} --latency {WORK_PATH}",
                "uvicorn": "--loop asyncio --http h11 --no-access-log, one worker",
                "pinning": (f"service on CPU {args.service_cpu}, wrk and py-spy on CPU "
                            f"{args.load_cpu}") if pin else "none"}
    figures: dict[str, Any] = {"machine": machine_line(), "code": code, "versions": versions(),
                               "settings": settings, "command": " ".join(sys.argv)}
    print(f"Machine: {figures['machine']}\nCode: {code}\n"
          f"Versions: {', '.join(f'{k} {v}' for k, v in figures['versions'].items())}\n"
          f"Settings: {json.dumps(settings)}\n", flush=True)

    runs: list[Run] = []
    for n in range(rounds):
        order = modes[n % len(modes):] + modes[:n % len(modes)]
        for position, mode in enumerate(order):
            run = measure_run(mode, n, position, args)
            runs.append(run)
            w = run.wrk
            assert w is not None
            print(f"round {n + 1}/{rounds} {mode}: ready {run.ready_ms:,.0f} ms"
                  + (f" (profiling {run.profiling_ms:,.0f} ms)" if run.profiling_ms else "")
                  + f", {w.req_per_s:,.0f} req/s, p50 {w.p50_ms:.2f} ms, p99 {w.p99_ms:.2f} ms, "
                  f"{run.cpu_us_per_request:,.0f} µs CPU/request"
                  + (f" + py-spy {run.tool_cpu_us_per_request:,.0f}"
                     if run.tool_cpu_us_per_request is not None else "")
                  + f", RSS {run.memory_after['VmRSS'] / MIB:.1f} MiB, "
                  f"shutdown {run.shutdown_ms:,.0f} ms", flush=True)

    summary = summarize(runs, modes)
    print("\n" + tables(summary, modes, rounds))
    notes = sorted({line for r in runs for line in r.log if not line.startswith("INFO:")})
    if notes:
        print("\nThe services logged:\n" + "\n".join(f"  {line}" for line in notes))
    if args.json:
        figures |= summary | {"runs": [dataclasses.asdict(r) for r in runs]}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if (after := code_version()) != code:
        print(f"Warning: the code changed during the run; now {after}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
