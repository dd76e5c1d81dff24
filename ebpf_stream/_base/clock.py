"""The samples' clock, shared by the probes that stamp records and the batcher that
cuts windows, and how long a ring reader may leave records unread.

Both stages need these and neither owns them, so they live below both: a
probe stamps a sample with its kernel time plus one wall-clock offset, and
windows are cut on the same clock, or tiling could not be exact.
"""

from __future__ import annotations

import time

from .config import EbpfConfig


def wall_clock_offset_ns() -> int:
    """Add to a ``bpf_ktime_get_ns`` (CLOCK_MONOTONIC) time to get wall-clock ns."""
    return time.time_ns() - time.monotonic_ns()


def ring_latency_s(config: EbpfConfig) -> float:
    """The longest a ring reader leaves records unread: well inside an interval."""
    return min(1.0, config.export_interval_s / 4)


class Clock:
    """CLOCK_MONOTONIC as wall-clock ns, with one offset taken at creation.

    The probes stamp samples the same way, so a step of the wall clock
    during a run moves neither samples nor windows.
    """

    def __init__(self) -> None:
        self.offset_ns = wall_clock_offset_ns()

    def now(self) -> int:
        return time.monotonic_ns() + self.offset_ns
