"""The kernel reads each sample's request from the running task's context (real BPF).

Tasks interleave on one loop, each in its own request; one task's context
holds enough variables that its HAMT root is an array node, the other's
a bitmap node: the kernel's lookup must find the request through both, in
this process and in others, on each interpreter and loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from _support import start_ready
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from test_python_runtime import INTERPRETERS, available

from ebpf_stream import EbpfConfig, Profiler
from ebpf_stream.exporters import MemoryExporter

tracer = TracerProvider().get_tracer("tests")
MANY = [contextvars.ContextVar[int](f"tests.var{i}") for i in range(40)]


def few_vars_burn(seconds: float) -> None:
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


def many_vars_burn(seconds: float) -> None:
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


async def serve(route: str, burn: object, crowd: bool) -> str:
    if crowd:
        for i, var in enumerate(MANY):
            var.set(i)
    attributes = {"http.route": route, "http.request.method": "POST"}
    with tracer.start_as_current_span(route, attributes=attributes) as span:
        for _ in range(40):
            burn(0.005)  # type: ignore[operator]
            await asyncio.sleep(0)
        return f"{span.get_span_context().trace_id:032x}"


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_interleaved_tasks_are_each_named_by_their_own_request() -> None:
    memory = MemoryExporter()

    async def main() -> tuple[str, str]:
        config = EbpfConfig(sample_rate_hz=499, pids=(os.getpid(),))
        async with Profiler(config, [memory]) as profiler:
            assert profiler.mode == "bpf"
            traces = await asyncio.gather(serve("/few", few_vars_burn, False),
                                          serve("/many", many_vars_burn, True))
            await asyncio.sleep(0.2)
        return traces[0], traces[1]

    few_trace, many_trace = asyncio.run(main())
    assert memory.profile is not None
    named: Counter[tuple[str, str, str, str]] = Counter()
    for s in memory.profile:
        function = next((f.name for f in s.frames if f.name.endswith("_vars_burn")), "")
        if function:
            c = s.context
            named[function, c.route if c else "", c.trace_id if c else "",
                  c.method if c else ""] += s.count
    few = {k: v for k, v in named.items() if k[0] == "few_vars_burn"}
    many = {k: v for k, v in named.items() if k[0] == "many_vars_burn"}
    assert sum(few.values()) > 50 and sum(many.values()) > 50, named
    right_few = few.get(("few_vars_burn", "/few", few_trace, "POST"), 0)
    right_many = many.get(("many_vars_burn", "/many", many_trace, "POST"), 0)
    assert right_few >= 0.95 * sum(few.values()), named
    assert right_many >= 0.95 * sum(many.values()), named
    assert trace.get_current_span() is trace.INVALID_SPAN


WORKLOAD = Path(__file__).parent / "workloads" / "python" / "requests.py"
LOOPS = [(name, "asyncio") for name in INTERPRETERS] + [("venv-3.11", "uvloop")]


@pytest.mark.parametrize(("interpreter", "loop"), LOOPS, ids=[f"{i}-{loop}" for i, loop in LOOPS])
@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_each_interpreter_and_loop_has_its_requests_read(interpreter: str, loop: str) -> None:
    """Another process, on each supported interpreter and loop, named by middleware."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    check_requests([available(interpreter), str(WORKLOAD), loop, "20"])


def check_requests(command: list[str]) -> None:
    """``command`` runs requests.py: its samples are named by their own requests."""
    child = start_ready(command)
    memory = MemoryExporter()

    async def main() -> None:
        async with Profiler(EbpfConfig(sample_rate_hz=499, pids=(child.pid,)), [memory]):
            await asyncio.sleep(1.5)

    try:
        asyncio.run(main())
    finally:
        child.kill()
        child.wait()
    assert memory.profile is not None
    named: Counter[tuple[str, str]] = Counter()
    for s in memory.profile:
        function = next((f.name for f in s.frames if f.name in ("few_burn", "many_burn")), "")
        if function:
            named[function, s.context.endpoint if s.context else ""] += s.count
    for function, endpoint in (("few_burn", "GET /few"), ("many_burn", "GET /many")):
        total = sum(n for (f, _), n in named.items() if f == function)
        assert total > 100 and named[function, endpoint] >= 0.95 * total, named
