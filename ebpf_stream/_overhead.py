"""Measuring what the profiler costs: its own CPU, its BPF programs' run time, its memory.

Nothing here estimates.  CPU is the thread CPU time spent inside the
profiler's own code (its task steps and worker threads, not the host app's)
plus the kernel's per-program run time, which the kernel only accounts while
BPF statistics are enabled; we enable them for the run with
``BPF_ENABLE_STATS``, which lasts only as long as we hold its fd.
"""

from __future__ import annotations

import contextvars
import ctypes
import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio.to_thread

T = TypeVar("T")

_SYS_BPF = 321  # x86-64
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


class CpuMeter:
    """Sums thread CPU time spent inside ``with meter.measure():`` blocks."""

    def __init__(self) -> None:
        self.ns = 0

    def measure(self) -> _Section:
        return _Section(self)


class _Section:
    __slots__ = ("_meter", "_start")

    def __init__(self, meter: CpuMeter) -> None:
        self._meter = meter
        self._start = 0

    def __enter__(self) -> None:
        self._start = time.thread_time_ns()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._meter.ns += time.thread_time_ns() - self._start


@dataclasses.dataclass(frozen=True, slots=True)
class Overhead:
    """What the profiler cost since it started.

    ``cpu_percent`` is a share of the whole machine (all CPUs) over the
    elapsed wall time: user-space CPU of the profiler's own code plus BPF
    program run time.  ``memory_bytes`` is the profiler's anonymous memory
    plus the memory charged for its BPF maps.
    """

    cpu_percent: float
    memory_bytes: int
    user_cpu_ns: int = 0
    bpf_cpu_ns: int = 0
    bpf_run_count: int = 0
    wall_ns: int = 0
    cpus: int = 1
    anon_rss_bytes: int = 0
    bpf_map_bytes: int = 0


def _fdinfo(fd: int) -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def anon_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def enable_bpf_stats() -> int | None:
    """Enable kernel accounting of BPF run time; returns the fd that keeps it on."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.c_uint32(_BPF_STATS_RUN_TIME)
    fd = int(libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr)))
    return fd if fd >= 0 else None


class OverheadMonitor:
    """Reads the counters behind ``Overhead`` for one run.

    ``anon_baseline`` is subtracted from the process's anonymous RSS: embedded
    in a host app, the profiler's memory is what the process grew by since it
    started (an upper bound, since the host may grow too); in the CLI the
    baseline is zero and the whole process counts.
    """

    def __init__(
        self,
        meter: CpuMeter,
        program_fds: Callable[[], Iterable[int]],
        map_fds: Callable[[], Iterable[int]],
        *,
        anon_baseline: int = 0,
    ) -> None:
        self._meter = meter
        self._program_fds = program_fds
        self._map_fds = map_fds
        self._anon_baseline = anon_baseline
        self._stats_fd = enable_bpf_stats()
        self._t0 = time.monotonic_ns()
        self._cpus = os.cpu_count() or 1

    def measure(self) -> Overhead:
        wall = max(1, time.monotonic_ns() - self._t0)
        bpf_ns = bpf_count = 0
        for fd in self._program_fds():
            info = _fdinfo(fd)
            bpf_ns += int(info.get("run_time_ns", 0))
            bpf_count += int(info.get("run_cnt", 0))
        maps = sum(int(_fdinfo(fd).get("memlock", 0)) for fd in self._map_fds())
        anon = max(0, anon_rss_bytes() - self._anon_baseline)
        cpu_ns = self._meter.ns + bpf_ns
        return Overhead(
            cpu_percent=100.0 * cpu_ns / (wall * self._cpus),
            memory_bytes=anon + maps,
            user_cpu_ns=self._meter.ns,
            bpf_cpu_ns=bpf_ns,
            bpf_run_count=bpf_count,
            wall_ns=wall,
            cpus=self._cpus,
            anon_rss_bytes=anon,
            bpf_map_bytes=maps,
        )

    def close(self) -> None:
        if self._stats_fd is not None:
            os.close(self._stats_fd)
            self._stats_fd = None


_current_meter: contextvars.ContextVar[CpuMeter | None] = contextvars.ContextVar(
    "ebpf_stream_meter", default=None)


def bind_meter(meter: CpuMeter) -> None:
    """Charge this task's worker-thread CPU to ``meter`` (see ``run_sync``)."""
    _current_meter.set(meter)


async def run_sync(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` in a worker thread, charging its CPU time to the task's meter.

    The worker threads are shared with the host app, so the profiler's share
    is measured inside the call rather than per thread.
    """
    meter = _current_meter.get()
    if meter is None:
        return await anyio.to_thread.run_sync(fn, *args)

    def measured() -> T:
        with meter.measure():
            return fn(*args)

    return await anyio.to_thread.run_sync(measured)
