"""The host ``run.py`` measures: a service-like process of 20 threads, profiled one way.

Thread layout, like a small async service: the main thread runs an asyncio
loop that handles a "request" every 10 ms (a burst of Python work, about a
fifth of a core), and 19 pool threads wait on a queue, each woken once a
second for a short job.  The ways it is profiled (``--mode``):

``none``
    nothing in the process;
``fallback``
    ebpf-stream embedded (``Profiler``, production preset at ``--rate``,
    folded output), in fallback mode: ``run.py`` starts the host without the
    BPF capabilities;
``pyroscope``
    pyroscope-io's agent at 100 Hz, uploading where nothing listens;
``external``
    nothing in the process: ``run.py`` attaches py-spy (or ebpf-stream's
    BPF mode) from outside.

Prints ``ready`` once running, runs ``--seconds``, then prints one JSON line:
the window's wall time, the process's CPU over it, and for ``fallback`` the
profiler's mode and the CPU ``get_overhead()`` measured over the same window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "workloads" / "python"))

import shares

POOL = 19
REQUEST_S = 0.010


def handle_request(unit: int) -> int:
    """The work of one request: the shares workload's functions, a few units."""
    return shares.alpha(unit) + shares.delta(unit)


def pool_worker(jobs: queue.Queue[int | None]) -> None:
    while (unit := jobs.get()) is not None:
        handle_request(unit)


async def serve(seconds: float, unit: int, jobs: queue.Queue[int | None]) -> None:
    deadline = time.monotonic() + seconds
    next_job = time.monotonic()
    while time.monotonic() < deadline:
        handle_request(unit)
        if time.monotonic() >= next_job:
            next_job += 1.0 / POOL
            jobs.put(unit)
        await asyncio.sleep(REQUEST_S)


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def main(args: argparse.Namespace) -> dict[str, object]:
    jobs: queue.Queue[int | None] = queue.Queue()
    pool = [threading.Thread(target=pool_worker, args=(jobs,)) for _ in range(POOL)]
    for thread in pool:
        thread.start()
    result: dict[str, object] = {"threads": threading.active_count()}
    try:
        if args.mode == "fallback":
            from ebpf_stream import EbpfConfig, Profiler
            from ebpf_stream.exporters import FoldedFileExporter

            config = EbpfConfig.for_environment("production").with_sample_rate(args.rate)
            async with Profiler(config, [FoldedFileExporter(args.out)]) as profiler:
                await asyncio.sleep(1.0)  # past the start
                before, wall0, cpu0 = profiler.get_overhead(), time.monotonic(), cpu_s()
                print("ready", flush=True)
                await serve(args.seconds, args.unit, jobs)
                after, wall1, cpu1 = profiler.get_overhead(), time.monotonic(), cpu_s()
            result |= {"mode": profiler.mode,
                       "profiler_cpu_s": (after.user_cpu_ns - before.user_cpu_ns) / 1e9,
                       "received": profiler.stats.received}
        else:
            if args.mode == "pyroscope":
                import pyroscope

                pyroscope.configure(application_name="ebpf-stream-bench-fallback",
                                    server_address=args.pyroscope, sample_rate=100)
            await asyncio.sleep(1.0)
            wall0, cpu0 = time.monotonic(), cpu_s()
            print("ready", flush=True)
            await serve(args.seconds, args.unit, jobs)
            wall1, cpu1 = time.monotonic(), cpu_s()
            if args.mode == "pyroscope":
                pyroscope.shutdown()
    finally:
        for _ in pool:
            jobs.put(None)
        for thread in pool:
            thread.join()
    return result | {"wall_s": wall1 - wall0, "cpu_s": cpu1 - cpu0}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["none", "fallback", "pyroscope", "external"],
                        default="none")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=19)
    parser.add_argument("--unit", type=int, default=6000)
    parser.add_argument("--out", default="host.folded")
    parser.add_argument("--pyroscope", default="http://127.0.0.1:9")
    print(json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
