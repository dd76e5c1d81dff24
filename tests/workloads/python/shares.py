"""CPU-bound Python functions with known, different shares of the CPU.

Each round calls ``alpha`` (4 units of work), ``beta`` (1 unit of its own,
then ``gamma`` with 2) and ``delta`` (2 units): of 9 units, the leaf shares
are 4/9, 1/9, 2/9 and 2/9, and ``beta``'s inclusive share is 3/9.  Plain
loops, no comprehensions: 3.11 gives a comprehension a frame of its own.
Rounds vary in length at random, so that no sampler beats against them.

    python shares.py SECONDS

Prints ``ready``, runs for SECONDS (or until SIGINT), then prints one JSON
line: each function's thread CPU time, measured around its calls (``beta``'s
includes ``gamma``'s), the ground truth a profiler's shares are checked with.
"""

import json
import random
import sys
import time

UNIT = 300_000  # loop iterations per unit of work: 8 to 16 ms here


def alpha(unit):
    total = 0
    for i in range(4 * unit):
        total += i * i
    return total


def gamma(unit):
    total = 0
    for i in range(2 * unit):
        total += i * i
    return total


def beta(unit, clock):
    total = 0
    for i in range(unit):
        total += i * i
    start = time.thread_time_ns()
    total += gamma(unit)
    clock["gamma"] += time.thread_time_ns() - start
    return total


def delta(unit):
    total = 0
    for i in range(2 * unit):
        total += i * i
    return total


def run(seconds):
    clock = {"alpha": 0, "beta": 0, "gamma": 0, "delta": 0}
    rng = random.Random(1)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            # A periodic workload would beat against a periodic sampler.
            unit = int(UNIT * rng.uniform(0.5, 1.5))
            start = time.thread_time_ns()
            alpha(unit)
            middle = time.thread_time_ns()
            beta(unit, clock)
            end = time.thread_time_ns()
            delta(unit)
            clock["alpha"] += middle - start
            clock["beta"] += end - middle  # inclusive of gamma
            clock["delta"] += time.thread_time_ns() - end
    except KeyboardInterrupt:
        pass  # stopped early: report what ran
    return clock


if __name__ == "__main__":
    print("ready", flush=True)
    print(json.dumps(run(float(sys.argv[1]))), flush=True)
