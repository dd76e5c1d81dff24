"""A Python program that alternates between two functions, for timelines.

    python alternate.py PHASES MS

Runs PHASES phases of MS milliseconds of thread CPU time each, ``alpha`` in
the even ones and ``beta`` in the odd ones, so that a timeline of its samples
reads alpha, beta, alpha, ... PHASES times, however loaded the machine is.
"""

import sys
import time


def spin(ms):
    end = time.thread_time_ns() + ms * 1_000_000
    while time.thread_time_ns() < end:
        pass


def alpha(ms):
    spin(ms)


def beta(ms):
    spin(ms)


if __name__ == "__main__":
    phases, ms = int(sys.argv[1]), int(sys.argv[2])
    for phase in range(phases):
        (beta if phase % 2 else alpha)(ms)
