"""Two kinds of request interleaved on one event loop, each named by the middleware's scope.

    python requests.py LOOP SECONDS      (LOOP: asyncio or uvloop)

Prints ``ready`` once it publishes its requests, then serves for SECONDS:
requests to ``/few`` burn CPU in ``few_burn``, requests to ``/many`` in
``many_burn`` from a context holding 40 more variables (its HAMT root is an
array node), yielding between slices so that the two interleave.
"""

import asyncio
import contextvars
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from ebpf_stream._context.publisher import publish, request_scope

MANY = [contextvars.ContextVar(f"workload.var{i}") for i in range(40)]


def few_burn():
    deadline = time.thread_time() + 0.002
    while time.thread_time() < deadline:
        pass


def many_burn():
    deadline = time.thread_time() + 0.002
    while time.thread_time() < deadline:
        pass


async def serve(route, burn, until):
    if route == "/many":
        for i, var in enumerate(MANY):
            var.set(i)
    while time.monotonic() < until:
        with request_scope(route, "GET"):
            for _ in range(5):
                burn()
                await asyncio.sleep(0)


async def main(seconds):
    until = time.monotonic() + seconds
    await asyncio.gather(serve("/few", few_burn, until), serve("/many", many_burn, until))


if __name__ == "__main__":
    assert publish() is not None
    print("ready", flush=True)
    if sys.argv[1] == "uvloop":
        import uvloop

        uvloop.run(main(float(sys.argv[2])))
    else:
        asyncio.run(main(float(sys.argv[2])))
