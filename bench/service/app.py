"""The service that ``run.py`` loads: a small FastAPI app, profiled and traced seven ways.

Run under uvicorn (single worker, ``--loop asyncio``), with the way it is
profiled read from the environment at startup:

``BENCH_SERVICE_MODE``
    ``none``: no profiler.  ``ebpf-stream``: the production preset embedded
    in the lifespan with ``ebpf_stream.integrations``, started in the
    background, writing folded stacks and OTLP/JSON into
    ``BENCH_SERVICE_OUT``.  ``py-spy``: nothing in the process (``run.py``
    attaches py-spy from outside), so the same as ``none`` here.
    ``pyroscope``: pyroscope-io's agent, configured at startup at 100 Hz
    and uploading to ``BENCH_SERVICE_PYROSCOPE``, where nothing listens.
    ``otel``: no profiler, the app traced with OpenTelemetry's FastAPI
    instrumentation (``FastAPIInstrumentor.instrument_app``), the SDK's
    ``TracerProvider`` and a ``BatchSpanProcessor`` to an exporter that
    discards the spans.  ``otel+ebpf-stream``: the same tracing, profiled
    as in ``ebpf-stream``; the profiler's start publishes each request's
    span, so its samples name their requests.  ``otel+publish``: the same
    tracing, publishing each request's span (OpenTelemetry's context
    wrapped, as the profiler's start does) with no profiler: what the
    wrapper alone costs.
``BENCH_SERVICE_OUT``
    A directory for the profiler's outputs (ebpf-stream only).
``BENCH_SERVICE_PYROSCOPE``
    The server address pyroscope uploads to (pyroscope only).

Endpoints: ``/health``; ``/work?seed=N``, which builds 1,200 orders from a
seed, totals them per category, sorts them, and returns the top 25 as JSON
(about 0.75 ms of Python and 2 KB of JSON on the benchmark machine, about
1 ms of CPU per request with FastAPI and uvicorn); and, in
the two ebpf-stream modes only, ``/overhead``: the profiler's mode and
``get_overhead()``.

    BENCH_SERVICE_MODE=none .venv/bin/python -m uvicorn --app-dir bench/service app:app \\
        --loop asyncio --http h11 --no-access-log --port 8000
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

MODES = ("none", "ebpf-stream", "py-spy", "pyroscope", "otel", "otel+ebpf-stream",
         "otel+publish")
MODE = os.environ.get("BENCH_SERVICE_MODE", "none")
PROFILED = MODE in ("ebpf-stream", "otel+ebpf-stream")
TRACED = MODE in ("otel", "otel+ebpf-stream", "otel+publish")
if MODE not in MODES:
    raise SystemExit(f"BENCH_SERVICE_MODE={MODE!r} is not one of {', '.join(MODES)}")

log = logging.getLogger("uvicorn.error")  # uvicorn's own log, so the lines show in its output

# -- the work ------------------------------------------------------------------

ORDERS = 1_200
TOP = 25
_CATEGORIES = ("books", "games", "music", "tools", "garden", "toys", "food", "sports")


def make_orders(seed: int, n: int = ORDERS) -> list[dict[str, Any]]:
    """``n`` orders from a linear congruential generator: the same for the same seed."""
    x = seed or 1
    orders = []
    for i in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        orders.append({"id": i, "category": _CATEGORIES[(x >> 16) % len(_CATEGORIES)],
                       "quantity": 1 + (x >> 8) % 5, "price_cents": 100 + (x >> 12) % 9900})
    return orders


def summarize(orders: list[dict[str, Any]], top: int = TOP) -> dict[str, Any]:
    totals: dict[str, int] = {}
    counts: dict[str, int] = {}
    for order in orders:
        category = order["category"]
        totals[category] = totals.get(category, 0) + order["quantity"] * order["price_cents"]
        counts[category] = counts.get(category, 0) + 1
    best = sorted(orders, key=lambda o: o["quantity"] * o["price_cents"], reverse=True)[:top]
    return {"orders": len(orders), "totals_cents": totals, "counts": counts, "top": best}


# -- the profilers ---------------------------------------------------------------


@asynccontextmanager
async def ebpf_stream_profiling(app: FastAPI, out_dir: Path) -> AsyncIterator[None]:
    """ebpf-stream in the lifespan through its integration, as the README shows it.

    ``ServiceProfiling`` is what ``ProfilingLifespan`` runs; it is used here
    directly to keep the profiler in ``app.state.profiler`` for ``/overhead``.
    The production preset (19 Hz), started in the background.
    """
    from ebpf_stream.integrations import ServiceProfiling

    outputs = [out_dir / "cpu.folded", out_dir / "cpu.otlp.jsonl"]
    async with ServiceProfiling(outputs=outputs) as profiler:
        app.state.profiler = profiler
        yield
    if profiler is not None:
        log.info("ebpf-stream at exit: %s; %s", overhead_of(profiler), profiler.stats)


def overhead_of(profiler: Any) -> dict[str, Any]:
    o = profiler.get_overhead()
    return {"mode": profiler.mode, "memory_bytes": o.memory_bytes,
            "anon_rss_bytes": o.anon_rss_bytes, "bpf_map_bytes": o.bpf_map_bytes,
            "cpu_percent": o.cpu_percent, "user_cpu_ns": o.user_cpu_ns,
            "bpf_cpu_ns": o.bpf_cpu_ns, "wall_ns": o.wall_ns,
            "unavailable": str(profiler.unavailable) if profiler.unavailable else None,
            "stats": dataclasses.asdict(profiler.stats),
            "module": sys.modules["ebpf_stream"].__file__}


@contextmanager
def pyroscope_profiling(server_address: str) -> Iterator[None]:
    import pyroscope

    pyroscope.configure(application_name="ebpf-stream-bench-service",
                        server_address=server_address, sample_rate=100)
    try:
        yield
    finally:
        pyroscope.shutdown()


def traced(app: FastAPI) -> None:
    """OpenTelemetry's FastAPI instrumentation, with spans batched to an exporter
    that drops them: the tracing a service pays for, without a collector."""
    from collections.abc import Sequence

    from opentelemetry import trace
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if PROFILED:
        async with ebpf_stream_profiling(app, Path(os.environ["BENCH_SERVICE_OUT"])):
            yield
    elif MODE == "pyroscope":
        with pyroscope_profiling(os.environ["BENCH_SERVICE_PYROSCOPE"]):
            yield
    elif MODE == "otel+publish":
        from ebpf_stream._context.publisher import publish

        if publish() is None:
            raise RuntimeError("this interpreter cannot publish its requests")
        yield
    else:  # none, py-spy, otel
        yield


app = FastAPI(lifespan=lifespan)
if TRACED:
    traced(app)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok", "mode": MODE}


@app.get("/work")
async def work(seed: int = 1) -> dict[str, Any]:
    return summarize(make_orders(seed))


if PROFILED:

    @app.get("/overhead")
    async def overhead(request: Request) -> dict[str, Any]:
        return overhead_of(request.app.state.profiler)
