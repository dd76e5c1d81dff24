"""What linking samples to requests costs: per span in the app, per sample in the kernel.

A process that publishes its requests (``ebpf_stream._context.publisher``)
pays in two places:

* **per span**, in the app: OpenTelemetry's runtime context is wrapped
  (``_context/_otel.py``), so each ``attach`` of a span also computes the
  32-byte value and sets the ``REQUEST`` context variable, and each
  ``detach`` resets it.  ``measure_spans`` times OpenTelemetry SDK spans
  (a ``TracerProvider`` with no span processor: spans are recorded and
  ended, then dropped) with the wrapper installed and without, in the
  same process, the two interleaved round by round;
* **per sample**, in the kernel: ``on_cpu_sample`` looks the variable up
  in the sampled task's context (``kernel/request_context.h``) for every
  sample of a process that publishes.  ``measure_samples`` profiles a
  workload of asyncio tasks busy inside spans at 99 Hz, publishing or
  not, and reads the program's run time from the kernel's BPF statistics
  (``kernel.bpf_stats_enabled``): one workload at a time, the two
  alternated; and both at once on one CPU, each watched by a profiler
  (so a program) of its own, so that the two run times come from the
  same seconds of the same machine.

Run it with ``python bench/requests.py`` or ``python bench/run.py --only
requests`` (the per-sample part needs root).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks._support import bpf_unavailable, median, process_clock_ns

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from _support import program_ids

# -- per span ---------------------------------------------------------------------

SPAN_ROUNDS = 15
CELL_S = 0.1  # time of one timed cell (one operation, one mode, one round)
ROUTE, METHOD = "/items/{item_id}", "GET"

SPAN = "`with start_as_current_span(\"x\"): pass`"
SERVER_SPAN = "the same, a server span with `http.route` and `http.request.method`"
CHILD_SPAN = "the same as the first, inside an open server span (the route is inherited)"
ATTACH = "`detach(attach(context))`, a context holding a span"
ATTACH_SERVER = "`detach(attach(context))`, a context holding a server span with a route"
OPERATIONS = (SPAN, SERVER_SPAN, CHILD_SPAN, ATTACH, ATTACH_SERVER)


@dataclasses.dataclass(frozen=True, slots=True)
class SpanFigures:
    """Median ns per operation over the rounds, without and with the wrapper."""

    operation: str
    calls: int  # per timed cell
    rounds: int
    plain_ns: float
    wrapped_ns: float
    paired_ratio: float  # median over rounds of wrapped / plain

    @property
    def added_ns(self) -> float:
        return self.wrapped_ns - self.plain_ns


class _LogCount(logging.Handler):
    """Counts what anything logs at WARNING or above (an exception OpenTelemetry caught)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


def _operations() -> dict[str, Callable[[int], int]]:
    """Each operation as a function of a call count returning the elapsed ns."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    tracer = TracerProvider().get_tracer("ebpf-stream-bench")  # no processor: spans dropped
    start = tracer.start_as_current_span
    server_attributes = {"http.route": ROUTE, "http.request.method": METHOD}
    attach, detach = otel_context.attach, otel_context.detach
    clock = time.perf_counter_ns

    def span(n: int) -> int:
        t0 = clock()
        for _ in range(n):
            with start("x"):
                pass
        return clock() - t0

    def server_span(n: int) -> int:
        t0 = clock()
        for _ in range(n):
            with start(f"{METHOD} {ROUTE}", kind=SpanKind.SERVER, attributes=server_attributes):
                pass
        return clock() - t0

    def child_span(n: int) -> int:
        with start(f"{METHOD} {ROUTE}", kind=SpanKind.SERVER, attributes=server_attributes):
            t0 = clock()
            for _ in range(n):
                with start("x"):
                    pass
            return clock() - t0

    plain_context = trace.set_span_in_context(tracer.start_span("x"))
    server_context = trace.set_span_in_context(tracer.start_span(
        f"{METHOD} {ROUTE}", kind=SpanKind.SERVER, attributes=server_attributes))

    def attaching(context: Any) -> Callable[[int], int]:
        def run(n: int) -> int:
            t0 = clock()
            for _ in range(n):
                detach(attach(context))
            return clock() - t0
        return run

    return {SPAN: span, SERVER_SPAN: server_span, CHILD_SPAN: child_span,
            ATTACH: attaching(plain_context), ATTACH_SERVER: attaching(server_context)}


@contextlib.contextmanager
def _wrapper() -> Iterator[Callable[[bool], None]]:
    """A switch for the publishing wrapper of OpenTelemetry's runtime context.

    ``publish()`` installs it, as ``Profiler`` and ``ServiceProfiling`` do;
    the switch then sets ``opentelemetry.context._RUNTIME_CONTEXT`` to the
    wrapper or to what it wraps (between timed cells, with nothing attached).
    """
    from opentelemetry import context as otel_context

    from ebpf_stream._context import publisher
    from ebpf_stream._context._otel import PublishingContext

    plain = otel_context._RUNTIME_CONTEXT
    if publisher.publish() is None:
        raise RuntimeError("this interpreter cannot publish its requests")
    wrapped = otel_context._RUNTIME_CONTEXT
    if not isinstance(wrapped, PublishingContext):
        raise RuntimeError(f"publish() did not wrap OpenTelemetry's context: {wrapped!r}")
    _check_published(publisher)

    def switch(on: bool) -> None:
        vars(otel_context)["_RUNTIME_CONTEXT"] = wrapped if on else plain

    try:
        yield switch
    finally:
        switch(True)  # as publish() left it


def _check_published(publisher: Any) -> None:
    """The wrapper publishes what the kernel is to read: a span's ids and route."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    tracer = TracerProvider().get_tracer("ebpf-stream-bench-check")
    with tracer.start_as_current_span("s", kind=SpanKind.SERVER,
                                      attributes={"http.route": ROUTE}) as server:
        value = publisher.REQUEST.get(publisher.NONE)
        with tracer.start_as_current_span("c") as child:
            inner = publisher.REQUEST.get(publisher.NONE)
    ids = server.get_span_context()
    if value[:24] != ids.trace_id.to_bytes(16, "big") + ids.span_id.to_bytes(8, "big"):
        raise RuntimeError("the wrapper did not publish the server span")
    if inner[:16] != value[:16] or inner[24:] != value[24:] or \
            inner[16:24] != child.get_span_context().span_id.to_bytes(8, "big"):
        raise RuntimeError("the wrapper did not publish the child span with its route")
    if publisher.REQUEST.get(publisher.NONE) != publisher.NONE:
        raise RuntimeError("the wrapper left a value published after the spans ended")


def measure_spans(rounds: int = SPAN_ROUNDS, cell_s: float = CELL_S) -> tuple[list[SpanFigures],
                                                                             list[str]]:
    """Every operation with the wrapper and without, interleaved; and what was logged.

    Call counts are set from one unwrapped calibration call so that a cell
    takes about ``cell_s``; the first round is a warm-up.  The garbage
    collector is off while a cell runs, as in ``timeit``.
    """
    logged = _LogCount()
    logging.getLogger().addHandler(logged)
    try:
        with _wrapper() as wrap:
            operations = _operations()
            calls = {}
            for name, run in operations.items():
                wrap(False)
                run(1000)
                calls[name] = max(1000, int(cell_s * 1e9 / (run(10_000) / 10_000)))
            ns: dict[tuple[str, bool], list[float]] = {}
            for round_ in range(rounds + 1):
                for name, run in operations.items():
                    order = (False, True) if round_ % 2 else (True, False)
                    for on in order:
                        wrap(on)
                        gc.collect()
                        gc.disable()
                        try:
                            elapsed = run(calls[name])
                        finally:
                            gc.enable()
                        if round_:
                            ns.setdefault((name, on), []).append(elapsed / calls[name])
    finally:
        logging.getLogger().removeHandler(logged)
    figures = [
        SpanFigures(name, calls[name], rounds, median(ns[name, False]), median(ns[name, True]),
                    median(w / p for w, p in zip(ns[name, True], ns[name, False], strict=True)))
        for name in operations]
    return figures, logged.records


def spans_table(figures: list[SpanFigures]) -> str:
    rows = [
        f"OpenTelemetry SDK spans (`TracerProvider()`, no span processor), median ns per "
        f"operation of {figures[0].rounds} rounds, the two interleaved:",
        "",
        "| operation | without the wrapper | with it | added ns | with / without (paired) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rows += [f"| {f.operation} | {f.plain_ns:,.0f} | {f.wrapped_ns:,.0f} | {f.added_ns:+,.0f} | "
             f"{f.paired_ratio:.3f}x |" for f in figures]
    return "\n".join(rows)


# -- per sample -------------------------------------------------------------------

SAMPLE_RUNS = 3  # of each mode, alternated
SAMPLE_WINDOW_S = 20.0
SAMPLE_WARMUP_S = 3.0
SAMPLE_HZ = 99
WORKLOAD_CPU, TRACER_CPU = 0, 1
PUBLISHING, NOT_PUBLISHING = "publishing", "not publishing"
ALTERNATED, SIDE_BY_SIDE = "alternated", "side by side"
PROGRAM = "on_cpu_sample"
_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


@dataclasses.dataclass(frozen=True, slots=True)
class SampleRun:
    """One window of profiling one workload."""

    design: str  # ALTERNATED: one workload at a time; SIDE_BY_SIDE: both, one profiler each
    mode: str
    run_time_ns: int  # its profiler's on_cpu_sample, both CPUs
    run_cnt: int
    samples: int  # the workload's samples in the window
    with_request: int  # of which carry a span (trace and span ids)
    with_route: int  # of which name the route and method too
    tracer_cpu_ms: float  # our process, over the window (both profilers when side by side)
    spans: int  # spans the workload ended over its whole life

    @property
    def ns_per_run(self) -> float:
        return self.run_time_ns / max(1, self.run_cnt)

    @property
    def ns_per_sample(self) -> float:
        return self.run_time_ns / max(1, self.samples)


@dataclasses.dataclass(frozen=True, slots=True)
class SampleFigures:
    """Medians over the runs of one design and mode."""

    design: str
    mode: str
    runs: int
    window_s: float
    ns_per_run: float
    ns_per_sample: float
    run_cnt: float
    samples: float
    with_request_share: float
    with_route_share: float
    tracer_cpu_ms: float
    added_ns_per_sample: float | None  # paired: median over windows of publishing - not


def _run_time(ids: set[int]) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the one ``on_cpu_sample`` among the programs ``ids``."""
    listed = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                       text=True, check=True).stdout or "[]")
    found = [p for p in listed if p["id"] in ids and p.get("name") == PROGRAM]
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} {PROGRAM} programs among {sorted(ids)}")
    return found[0].get("run_time_ns", 0), found[0].get("run_cnt", 0)


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """``kernel.bpf_stats_enabled`` set to 1, and back to what it was."""
    before = _STATS_SYSCTL.read_text().strip()
    _STATS_SYSCTL.write_text("1\n")
    try:
        yield
    finally:
        _STATS_SYSCTL.write_text(before + "\n")


def _workload(publish: bool) -> subprocess.Popen[str]:
    """The workload, pinned to its CPU, once it has printed that it is ready."""
    import ebpf_stream

    root = Path(ebpf_stream.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    script = Path(__file__).resolve().with_name("_request_workload.py")
    argv = ["taskset", "-c", str(WORKLOAD_CPU), sys.executable, str(script)]
    proc = subprocess.Popen(argv + (["--publish"] if publish else []), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline())
    if ready["ebpf_stream"] != ebpf_stream.__file__:
        raise RuntimeError(f"the workload imported {ready['ebpf_stream']}, "
                           f"not {ebpf_stream.__file__}")
    if ready["published"] != publish:
        raise RuntimeError(f"the workload was to publish: {publish}; it did: {ready}")
    return proc


def _stop(proc: subprocess.Popen[str]) -> int:
    """Close the workload's stdin; the spans it ended."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    out = proc.stdout.read()
    proc.wait(30)
    return int(json.loads(out.splitlines()[-1])["spans"]) if out.strip() else -1


def _window(publishing: list[bool], design: str, window_s: float,
            warmup_s: float) -> list[SampleRun]:
    """Each workload of ``publishing`` profiled by a profiler of its own, over one window."""
    import anyio

    from ebpf_stream import EbpfConfig, Profiler
    from ebpf_stream.exporters import MemoryExporter

    procs: dict[bool, subprocess.Popen[str]] = {}
    try:
        for publish in publishing:
            procs[publish] = _workload(publish)

        async def profiled() -> tuple[dict[bool, tuple[int, int, int, int, int]], float]:
            memories = {publish: MemoryExporter() for publish in procs}
            ids: dict[bool, set[int]] = {}
            async with contextlib.AsyncExitStack() as stack:
                for publish, proc in procs.items():
                    before = program_ids()
                    config = EbpfConfig(sample_rate_hz=SAMPLE_HZ).with_pids([proc.pid])
                    profiler = await stack.enter_async_context(
                        Profiler(config, [memories[publish]]))
                    if profiler.mode != "bpf":
                        raise RuntimeError(f"the profiler is not in BPF mode: {profiler.mode}")
                    ids[publish] = program_ids() - before
                await anyio.sleep(warmup_s)
                first = {publish: _run_time(i) for publish, i in ids.items()}
                cpu0, start_ns = process_clock_ns(os.getpid()), time.time_ns()
                await anyio.sleep(window_s)
                last = {publish: _run_time(i) for publish, i in ids.items()}
                cpu1, end_ns = process_clock_ns(os.getpid()), time.time_ns()
            counts = {}
            for publish, memory in memories.items():
                assert memory.profile is not None
                samples = with_request = with_route = 0
                for s in memory.profile:
                    if s.pid != procs[publish].pid:
                        continue
                    n = sum(1 for t in s.timestamps_ns if start_ns <= t <= end_ns)
                    samples += n
                    if s.context is not None and s.context.trace_id and s.context.span_id:
                        with_request += n
                        if s.context.route == ROUTE and s.context.method == METHOD:
                            with_route += n
                counts[publish] = (last[publish][0] - first[publish][0],
                                   last[publish][1] - first[publish][1],
                                   samples, with_request, with_route)
            return counts, (cpu1 - cpu0) / 1e6

        counts, cpu_ms = anyio.run(profiled)
    finally:
        spans = {publish: _stop(proc) for publish, proc in procs.items()}
    return [SampleRun(design, PUBLISHING if publish else NOT_PUBLISHING, *counts[publish],
                      cpu_ms, spans[publish]) for publish in publishing]


def measure_samples(runs: int = SAMPLE_RUNS, window_s: float = SAMPLE_WINDOW_S,
                    warmup_s: float = SAMPLE_WARMUP_S,
                    designs: tuple[str, ...] = (ALTERNATED, SIDE_BY_SIDE)) -> list[SampleRun]:
    """``runs`` windows of each mode with BPF statistics on, in each design.

    ALTERNATED: one workload at a time, the two modes alternated (ABBA...).
    SIDE_BY_SIDE: both workloads at once, sharing the workload CPU, each
    profiled by a profiler (and a program) of its own: the two programs'
    run times then come from the same seconds of the same machine.
    """
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {TRACER_CPU})  # threads started from now on inherit it
    done: list[SampleRun] = []
    try:
        with bpf_stats():
            for round_ in range(runs):
                order = [False, True] if round_ % 2 == 0 else [True, False]
                windows = []
                if ALTERNATED in designs:
                    windows += [[publish] for publish in order]
                if SIDE_BY_SIDE in designs:
                    windows.append(order)
                for publishing in windows:
                    design = ALTERNATED if len(publishing) == 1 else SIDE_BY_SIDE
                    for run in _window(publishing, design, window_s, warmup_s):
                        done.append(run)
                        print(f"  {design}, {run.mode}: {run.ns_per_run:,.0f} ns/run "
                              f"({run.run_cnt:,} runs), {run.ns_per_sample:,.0f} ns per "
                              f"workload sample ({run.samples:,}, {run.with_request:,} with a "
                              f"span, {run.with_route:,} with the route)",
                              file=sys.stderr, flush=True)
                    time.sleep(0.5)
    finally:
        os.sched_setaffinity(0, cpus)
    return done


def summarize_samples(runs: list[SampleRun], window_s: float) -> list[SampleFigures]:
    figures = []
    for design in (ALTERNATED, SIDE_BY_SIDE):
        if not any(r.design == design for r in runs):
            continue
        by_mode = {mode: [r for r in runs if r.design == design and r.mode == mode]
                   for mode in (NOT_PUBLISHING, PUBLISHING)}
        # Paired: the runs of one round (side by side: of one window), in order.
        paired = [on.ns_per_sample - off.ns_per_sample
                  for off, on in zip(by_mode[NOT_PUBLISHING], by_mode[PUBLISHING], strict=True)]
        for mode, mine in by_mode.items():
            figures.append(SampleFigures(
                design, mode, len(mine), window_s, median(r.ns_per_run for r in mine),
                median(r.ns_per_sample for r in mine), median(r.run_cnt for r in mine),
                median(r.samples for r in mine),
                median(r.with_request / max(1, r.samples) for r in mine),
                median(r.with_route / max(1, r.samples) for r in mine),
                median(r.tracer_cpu_ms for r in mine),
                median(paired) if mode == PUBLISHING else None))
    return figures


def samples_table(figures: list[SampleFigures]) -> str:
    rows = [
        f"`{PROGRAM}` at {SAMPLE_HZ} Hz on both CPUs, the workload(s) pinned to CPU "
        f"{WORKLOAD_CPU}, medians of {figures[0].runs} windows of {figures[0].window_s:g} s "
        "per mode. Alternated: one workload at a time; side by side: both at once, one "
        "profiler each:",
        "",
        "| design | workload | ns/run | runs | ns per workload sample | workload samples "
        "| with a span | with its route | added ns per sample (paired) | profiler CPU ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows += [f"| {f.design} | {f.mode} | {f.ns_per_run:,.0f} | {f.run_cnt:,.0f} | "
             f"{f.ns_per_sample:,.0f} | {f.samples:,.0f} | {100 * f.with_request_share:.1f}% | "
             f"{100 * f.with_route_share:.1f}% | "
             f"{'' if f.added_ns_per_sample is None else f'{f.added_ns_per_sample:+,.0f}'} | "
             f"{f.tracer_cpu_ms:,.1f} |" for f in figures]
    return "\n".join(rows)


# -- asv --------------------------------------------------------------------------


def setup_cache() -> dict[str, Any]:
    spans, logged = measure_spans()
    figures: dict[str, Any] = {"spans": {f.operation: f for f in spans}, "logged": logged}
    if bpf_unavailable() is None:
        figures["samples"] = {(f.design, f.mode): f for f in summarize_samples(
            measure_samples(), SAMPLE_WINDOW_S)}
    return figures


setup_cache.timeout = 600  # type: ignore[attr-defined]


def track_span_ns_added(figures: dict[str, Any]) -> float:
    return float(figures["spans"][SPAN].added_ns)


def track_server_span_ns_added(figures: dict[str, Any]) -> float:
    return float(figures["spans"][SERVER_SPAN].added_ns)


def track_sample_ns_added(figures: dict[str, Any]) -> float:
    if "samples" not in figures:
        raise NotImplementedError("the per-sample part needs root and bcc")
    added = figures["samples"][SIDE_BY_SIDE, PUBLISHING].added_ns_per_sample
    return float(added)
