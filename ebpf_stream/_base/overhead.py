"""Measuring what the profiler costs: its own CPU, its BPF programs' run time, its memory.

Nothing here estimates.  CPU is the thread CPU time spent inside the
profiler's own code (its task steps and worker threads, not the host app's)
plus the kernel's per-program run time, which the kernel only accounts while
BPF statistics are enabled; we enable them for the run with
``BPF_ENABLE_STATS``, which lasts only as long as we hold its fd.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import time
from collections.abc import Callable, Coroutine, Generator, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

T = TypeVar("T")


class CpuMeter:
    """Sums the thread CPU time of the profiler's own task steps and sections."""

    def __init__(self) -> None:
        self.ns = 0

    def measure(self) -> _Section:
        """Meter a synchronous section: ``with meter.measure(): ...``."""
        return _Section(self)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro``, metering every step it takes on the event loop.

        The profiler's tasks share the host's thread, so per-thread clocks
        cannot tell them apart; timing each resumption of the coroutine
        charges everything they do, the engine's internals included, and
        nothing the host's tasks do in between.
        """
        return await _MeteredCoroutine(coro, self)


class _MeteredCoroutine(Generic[T]):
    __slots__ = ("_coro", "_meter")

    def __init__(self, coro: Coroutine[Any, Any, T], meter: CpuMeter) -> None:
        self._coro = coro
        self._meter = meter

    def __await__(self) -> Generator[Any, Any, T]:
        clock, coro, meter = time.thread_time_ns, self._coro, self._meter
        value: Any = None
        error: BaseException | None = None
        while True:
            start = clock()
            try:
                step = coro.throw(error) if error is not None else coro.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            finally:
                meter.ns += clock() - start
            try:
                value, error = (yield step), None
            except BaseException as exc:  # cancellation and the like: deliver it inside
                value, error = None, exc


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
    program run time.  ``memory_bytes`` is the resident memory (RSS) the
    profiler adds to its process, what a container's memory use shows:
    its heap and the libraries it maps in (numpy, the OTLP messages), of
    which ``anon_rss_bytes`` is the heap.  ``bpf_map_bytes`` is the kernel
    memory charged for its BPF maps, which no RSS includes.  ``mode`` is how
    the run profiles (``Profiler.mode``); the fallback's sampling thread is
    part of ``user_cpu_ns``.
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
    mode: str = "off"


@dataclasses.dataclass(frozen=True, slots=True)
class Resident:
    """A process's resident memory: all of it, and its anonymous part."""

    rss: int = 0
    anon: int = 0

    @classmethod
    def now(cls) -> Resident:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
        return cls(fields.get("VmRSS", 0), fields.get("RssAnon", 0))


class OverheadMonitor:
    """Reads the counters behind ``Overhead`` for one run.

    Embedded in a host app, the profiler's CPU is what ``meter`` charged to
    its tasks and worker threads, and its memory is what the process's RSS
    grew by since it started (``baseline``, read before the run loaded
    anything: an upper bound, since the host may grow too).  With
    ``whole_process`` (the CLI, which owns its process) both are the
    process's own: every thread's CPU, the event loop's included, and all of
    its resident memory.  ``fdinfo`` and ``enable_run_time_stats`` read and
    switch on the kernel's accounting of the programs' run time.
    """

    def __init__(
        self,
        meter: CpuMeter,
        program_fds: Callable[[], Iterable[int]],
        map_fds: Callable[[], Iterable[int]],
        fdinfo: Callable[[int], dict[str, str]],
        enable_run_time_stats: Callable[[], int | None],
        *,
        whole_process: bool = False,
        baseline: Resident | None = None,
    ) -> None:
        self._program_fds = program_fds
        self._map_fds = map_fds
        self._baseline = Resident() if whole_process or baseline is None else baseline
        self._user_ns: Callable[[], int] = (
            time.process_time_ns if whole_process else lambda: meter.ns)
        self._user_ns0 = self._user_ns()
        self._fdinfo = fdinfo
        self._stats_fd = enable_run_time_stats()
        self._t0 = time.monotonic_ns()
        self._cpus = os.cpu_count() or 1

    def measure(self) -> Overhead:
        wall = max(1, time.monotonic_ns() - self._t0)
        bpf_ns = bpf_count = 0
        for fd in self._program_fds():
            info = self._fdinfo(fd)
            bpf_ns += int(info.get("run_time_ns", 0))
            bpf_count += int(info.get("run_cnt", 0))
        maps = sum(int(self._fdinfo(fd).get("memlock", 0)) for fd in self._map_fds())
        now = Resident.now()
        anon = max(0, now.anon - self._baseline.anon)
        user_ns = self._user_ns() - self._user_ns0
        return Overhead(
            cpu_percent=100.0 * (user_ns + bpf_ns) / (wall * self._cpus),
            memory_bytes=max(0, now.rss - self._baseline.rss),
            user_cpu_ns=user_ns,
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


def release_freed_memory() -> None:
    """Give the heap's freed pages back to the system (glibc's ``malloc_trim``).

    Starting frees megabytes that would otherwise stay resident in the host
    (kallsyms' parse, the transient arrays of the first batches), and the
    allocator keeps freed pages in the middle of the heap.  It takes a
    millisecond or two: call it from a worker thread.  A libc without it
    (musl) keeps its pages.
    """
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


_current_meter: contextvars.ContextVar[CpuMeter | None] = contextvars.ContextVar(
    "ebpf_stream_meter", default=None)


def bind_meter(meter: CpuMeter) -> None:
    """Charge this task's worker-thread CPU to ``meter`` (see ``run_sync``)."""
    _current_meter.set(meter)


# The profiler's own allowance of worker threads, per event loop: a host that
# keeps anyio's default pool busy (a service's sync endpoints) must not hold the
# pipeline up, nor the pipeline take the host's threads.
_THREADS = 4
_limiter: RunVar[anyio.CapacityLimiter] = RunVar("ebpf_stream_threads")


def _threads() -> anyio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(_THREADS)
        _limiter.set(limiter)
        return limiter


async def run_sync(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` in a worker thread, charging its CPU time to the task's meter.

    The worker threads are shared with the host app, so the profiler's share
    is measured inside the call rather than per thread.
    """
    meter = _current_meter.get()
    if meter is None:
        return await anyio.to_thread.run_sync(fn, *args, limiter=_threads())

    def measured() -> T:
        with meter.measure():
            return fn(*args)

    return await anyio.to_thread.run_sync(measured, limiter=_threads())
