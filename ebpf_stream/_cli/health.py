"""The node agent's health report: how the agent itself is doing, every interval.

An agent runs unattended for weeks, so what would show it going wrong (memory
or fds growing, samples dropped or not delivered, a BPF map filling up) is
reported as it runs: one log line for journald or the pod's log, and, with a
stats file, one JSON object a line for tools to read.  Each report carries
the counters so far (cumulative, like ``Profiler.stats``), so a lost line
costs nothing.  The first report comes one interval after the start, and a
last one when the agent stops, with its final counters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import anyio

from .._base.overhead import Resident
from .._profiler import Profiler, map_usage
from .runs import human_bytes

log = logging.getLogger("ebpf_stream.agent")


class Health:
    """Writes the reports of one agent run; ``watch`` is its ``Show`` for ``run_traced``."""

    def __init__(self, interval_s: float, path: Path | None) -> None:
        self._interval = interval_s
        self._path = path
        self._born = time.monotonic()  # the agent's start, not the probes'
        self._profiler: Profiler | None = None
        # The maps as last read: the last report comes after the probes are closed.
        self._maps: dict[str, tuple[int, int]] = {}

    async def watch(self, profiler: Profiler, started: float, what: str) -> None:
        """Report every interval until cancelled, reading the maps one last time then."""
        self._profiler = profiler
        try:
            while True:
                await anyio.sleep(self._interval)
                self._maps = await anyio.to_thread.run_sync(map_usage, profiler)
                self.report()
        finally:
            with anyio.CancelScope(shield=True):
                self._maps = await anyio.to_thread.run_sync(map_usage, profiler)

    def final(self) -> None:
        """The last report, once the run has flushed; none if profiling never started."""
        if self._profiler is not None:
            self.report()

    def report(self) -> None:
        """Log one report, and append it to the stats file if there is one."""
        assert self._profiler is not None
        times = os.times()
        stats = self._profiler.stats
        report: dict[str, Any] = {
            "time": round(time.time(), 3),
            "uptime_s": round(time.monotonic() - self._born, 3),
            "rss_bytes": Resident.now().rss,
            "open_fds": len(os.listdir("/proc/self/fd")),
            "cpu_s": round(times.user + times.system, 3),
            **dataclasses.asdict(stats),
            "maps": {name: list(usage) for name, usage in self._maps.items()},
        }
        fullest = max(self._maps.items(), key=lambda item: item[1][0] / max(item[1][1], 1),
                      default=None)
        log.info("health: up %.0fs, rss %s, %d fds, cpu %.1fs; received %d, dropped %d "
                 "(kernel %d), exported %d, undelivered %d, rejected %d, export errors %d, "
                 "lost stacks %d%s",
                 report["uptime_s"], human_bytes(report["rss_bytes"]), report["open_fds"],
                 report["cpu_s"], stats.received, stats.dropped, stats.dropped_kernel,
                 stats.exported, stats.undelivered, stats.rejected, stats.export_errors,
                 stats.lost_stacks,
                 f"; fullest map {fullest[0]} {fullest[1][0]}/{fullest[1][1]}" if fullest else "")
        if self._path is not None:
            try:
                with self._path.open("a") as f:
                    f.write(json.dumps(report, separators=(",", ":")) + "\n")
            except OSError as exc:  # a full disk must not stop the profiling
                log.warning("health: cannot append to %s: %s", self._path, exc.strerror)
