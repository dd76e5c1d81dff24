"""An asyncio app whose ``culprit`` coroutine blocks the loop at known moments.

``culprit`` (awaited by ``app``, awaited by ``main``: all in ``main``'s
task) blocks the loop BLOCKS times, 300 ms each: in ``time.sleep``
(``--mode sleep``) or burning CPU (``--mode cpu``).  Meanwhile ``ticker``
tasks make short awaits and short CPU bursts, far below any stall
threshold.  With ``--poller`` a thread also polls a selector outside
asyncio, sleeping 200 ms between polls: a busy period of another poller,
which is no asyncio stall.

    python stalls.py [--blocks K] [--mode sleep|cpu] [--loop asyncio|uvloop]
                     [--poller] [--delay S] [--go]

Prints ``ready``; with ``--go`` waits for a line on stdin, then waits
``--delay`` seconds in the loop before the first block.  Ends with one JSON
line: the loop's and the poller's thread ids, and each block's
CLOCK_MONOTONIC start and end in ns.
"""

import argparse
import asyncio
import json
import selectors
import socket
import sys
import threading
import time

BLOCK_S = 0.3
POLLER_SLEEP_S = 0.2
LINGER_S = 0.5


def burn(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def culprit(blocks, mode, delay):
    done = []
    await asyncio.sleep(delay)
    for _ in range(blocks):
        await asyncio.sleep(0.2)
        start = time.monotonic_ns()
        if mode == "sleep":
            time.sleep(BLOCK_S)
        else:
            burn(BLOCK_S)
        done.append([start, time.monotonic_ns()])
    return done


async def app(blocks, mode, delay):
    return await culprit(blocks, mode, delay)


async def ticker():
    while True:
        await asyncio.sleep(0.01)
        burn(0.001)


def poll(stop, ids):
    ids["poller_tid"] = threading.get_native_id()
    selector = selectors.DefaultSelector()
    reader, writer = socket.socketpair()
    selector.register(reader, selectors.EVENT_READ)
    while not stop.is_set():
        selector.select(timeout=0.01)
        time.sleep(POLLER_SLEEP_S)
    selector.close()
    reader.close()
    writer.close()


async def main(args):
    tickers = [asyncio.create_task(ticker()) for _ in range(3)]
    blocks = await app(args.blocks, args.mode, args.delay)
    # Stay a while: a profiler names the last stall's frames while we live.
    await asyncio.sleep(LINGER_S)
    for task in tickers:
        task.cancel()
    return blocks


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--mode", choices=["sleep", "cpu"], default="sleep")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--poller", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--go", action="store_true")
    args = parser.parse_args()
    print("ready", flush=True)
    if args.go:
        sys.stdin.readline()
    ids = {"loop_tid": threading.get_native_id(), "poller_tid": 0}
    stop = threading.Event()
    poller = threading.Thread(target=poll, args=(stop, ids)) if args.poller else None
    if poller is not None:
        poller.start()
    if args.loop == "uvloop":
        import uvloop

        blocks = uvloop.run(main(args))
    else:
        blocks = asyncio.run(main(args))
    stop.set()
    if poller is not None:
        poller.join()
    print(json.dumps(ids | {"blocks": blocks}), flush=True)
