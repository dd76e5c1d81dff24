"""Two Python threads running at once, each in functions of its own with known shares.

Thread ``left`` loops over ``port`` (3 units of work) and ``étrave`` (1 unit,
a name a str keeps in its non-ASCII layout); thread ``right`` over
``starboard`` (1 unit) and ``stern`` (2 units).  On a
free-threaded build nothing makes them take turns: with two CPUs both run
at the same moment.  Rounds vary in length at random, so that no sampler
beats against them.  Plain loops, as in shares.py.

    python threads.py SECONDS

Prints ``ready``, runs for SECONDS (or until SIGINT), then prints one JSON
line: each function's thread CPU time, measured around its calls (the
ground truth a profiler's shares are checked with), and whether the GIL
was enabled.
"""

import json
import random
import sys
import threading
import time

UNIT = 200_000  # loop iterations per unit of work


def port(unit):
    total = 0
    for i in range(3 * unit):
        total += i * i
    return total


def étrave(unit):
    total = 0
    for i in range(unit):
        total += i * i
    return total


def starboard(unit):
    total = 0
    for i in range(unit):
        total += i * i
    return total


def stern(unit):
    total = 0
    for i in range(2 * unit):
        total += i * i
    return total


def worker(functions, seed, deadline, stop, clock):
    rng = random.Random(seed)
    while time.monotonic() < deadline and not stop.is_set():
        unit = int(UNIT * rng.uniform(0.5, 1.5))
        for function in functions:
            start = time.thread_time_ns()
            function(unit)
            clock[function.__name__] += time.thread_time_ns() - start


def run(seconds):
    clock = {"port": 0, "étrave": 0, "starboard": 0, "stern": 0}
    deadline = time.monotonic() + seconds
    stop = threading.Event()
    threads = [threading.Thread(target=worker, name=name, args=(functions, seed, deadline,
                                                                stop, clock))
               for name, functions, seed in (("left", (port, étrave), 1),
                                             ("right", (starboard, stern), 2))]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            time.sleep(0.05)
    except KeyboardInterrupt:
        stop.set()  # stopped early: report what ran
    for thread in threads:
        thread.join()
    gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    return {"clock": clock, "gil": gil}


if __name__ == "__main__":
    print("ready", flush=True)
    print(json.dumps(run(float(sys.argv[1]))), flush=True)
