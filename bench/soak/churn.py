"""The churn a node agent lives with: processes, Python processes and threads that come and go.

Three kinds of churn run side by side until stdin closes (or SIGTERM):

* **short-lived processes**: ``--spawn-rate`` per second, alternately a
  bare ``/bin/true`` and a shell that counts for a few milliseconds, so
  that some of them are sampled and named before they are gone;
* **Python processes**: one started every ``--python-every`` seconds, each
  living 1 to 4 s: an asyncio loop whose ``handler`` blocks the loop for
  150 ms (a stall), a few threads started and joined, and CPU in named
  functions; each is new to the agent, which must find its interpreter,
  walk it, and forget it when it exits;
* **threads**: this process starts and joins ``--thread-rate`` threads per
  second, each spinning for a few milliseconds.

A rate of 0 turns that kind off (all three off: the agent's baseline).
On exit it prints one JSON line: how many of each it started.

    python churn.py [--spawn-rate 20] [--python-every 2] [--thread-rate 20]
    python churn.py --python-child SECONDS     # one Python process's life
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

_COUNT_SH = "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done"


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def child_worker(seconds: float) -> None:
    spin(seconds)


async def handler() -> None:
    time.sleep(0.15)  # blocks the loop: a stall the agent reports


async def child_main(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await handler()
        threads = [threading.Thread(target=child_worker, args=(0.02,)) for _ in range(3)]
        for t in threads:
            t.start()
        spin(0.05)
        for t in threads:
            t.join()
        await asyncio.sleep(0.1)


def _reap(children: list[subprocess.Popen[bytes]]) -> list[subprocess.Popen[bytes]]:
    return [c for c in children if c.poll() is None]


def churn(spawn_rate: float, python_every: float, thread_rate: float,
          stop: threading.Event) -> dict[str, int]:
    counts = {"processes": 0, "python_processes": 0, "threads": 0}
    children: list[subprocess.Popen[bytes]] = []

    def threads() -> None:
        while not stop.wait(1 / thread_rate):
            t = threading.Thread(target=spin, args=(0.003,))
            t.start()
            t.join()
            counts["threads"] += 1

    thread_churn = threading.Thread(target=threads, daemon=True)
    if thread_rate > 0:
        thread_churn.start()
    next_python = time.monotonic()
    tick = 1 / spawn_rate if spawn_rate > 0 else 0.1
    while not stop.wait(tick):
        if spawn_rate > 0:
            argv = ["/bin/true"] if counts["processes"] % 2 else ["/bin/sh", "-c", _COUNT_SH]
            children.append(subprocess.Popen(argv))
            counts["processes"] += 1
        if python_every > 0 and time.monotonic() >= next_python:
            next_python += python_every
            life = random.uniform(1.0, 4.0)
            children.append(subprocess.Popen(
                [sys.executable, __file__, "--python-child", f"{life:.2f}"]))
            counts["python_processes"] += 1
        children = _reap(children)
    for c in children:
        c.wait()
    if thread_churn.is_alive():
        thread_churn.join()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spawn-rate", type=float, default=20.0)
    parser.add_argument("--python-every", type=float, default=2.0)
    parser.add_argument("--thread-rate", type=float, default=20.0)
    parser.add_argument("--python-child", type=float, metavar="SECONDS")
    args = parser.parse_args()
    if args.python_child is not None:
        asyncio.run(child_main(args.python_child))
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def until_stdin_closes() -> None:  # so that it never outlives the harness
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    counts = churn(args.spawn_rate, args.python_every, args.thread_rate, stop)
    print(json.dumps(counts), flush=True)
    os._exit(0)  # the stdin reader may still block


if __name__ == "__main__":
    main()
