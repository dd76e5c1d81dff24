"""A fixed amount of CPU-bound Python work, run DEPTH frames deep.

    python spin.py DEPTH ITERATIONS

Prints ``ready``, waits for a line on stdin (so that a profiler can attach
first), runs ITERATIONS loop iterations in a function called DEPTH frames
below ``<module>``, then prints the wall time it took in ns.
"""

import sys
import time


def nest(depth, iterations):
    if depth > 1:
        return nest(depth - 1, iterations)
    total = 0
    for i in range(iterations):
        total += i * i
    return total


if __name__ == "__main__":
    depth, iterations = int(sys.argv[1]), int(sys.argv[2])
    sys.setrecursionlimit(depth + 100)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic_ns()
    nest(depth, iterations)
    print(time.monotonic_ns() - start, flush=True)
