"""The workload of ``bench_requests``' per-sample part: asyncio tasks busy inside spans.

Eight tasks on one asyncio loop, each serving "requests" in turn: a server
span with ``http.route`` and ``http.request.method``, about 1 ms of Python
in it, a child span with about 1 ms more, a yield to the loop, and about
1 ms more before the server span ends.  So nearly every sample lands in a
span, in a task's own context.  OpenTelemetry's SDK ``TracerProvider``
with no span processor (spans are recorded, then dropped).

With ``--publish`` the process publishes its requests
(``ebpf_stream._context.publisher.publish()``, after the SDK is set up,
as ``Profiler`` and ``ServiceProfiling`` do); without, it does not, and the
kernel walks its Python stacks without looking for a request.

Prints one JSON line when ready (what it imported, whether it published),
runs until its stdin closes, then prints how many spans it ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

TASKS = 8
ROUTE, METHOD = "/items/{item_id}", "GET"
WORK = 20_000  # iterations of ``busy``: about 1 ms on the benchmark machine


def busy(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


async def serve(tracer: trace.Tracer, counts: list[int], stop: asyncio.Event) -> None:
    attributes = {"http.route": ROUTE, "http.request.method": METHOD}
    while not stop.is_set():
        with tracer.start_as_current_span(f"{METHOD} {ROUTE}", kind=SpanKind.SERVER,
                                          attributes=attributes):
            busy(WORK)
            with tracer.start_as_current_span("query"):
                busy(WORK)
            await asyncio.sleep(0)
            busy(WORK)
        counts[0] += 2


async def main(publish: bool) -> None:
    tracer = TracerProvider().get_tracer("ebpf-stream-bench-workload")
    published = False
    if publish:
        from ebpf_stream._context import publisher

        published = publisher.publish() is not None
    import ebpf_stream

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stdin_readable() -> None:
        if not sys.stdin.buffer.raw.read(4096):  # type: ignore[attr-defined]
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), stdin_readable)
    print(json.dumps({"ebpf_stream": ebpf_stream.__file__, "published": published}), flush=True)
    counts = [0]
    await asyncio.gather(*(serve(tracer, counts, stop) for _ in range(TASKS)))
    print(json.dumps({"spans": counts[0]}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--publish", action="store_true")
    asyncio.run(main(parser.parse_args().publish))
