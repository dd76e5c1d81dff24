"""What Python frames and the stall detector cost the programs they watch.

Two workloads from ``tests/workloads/python/``, each timed over a fixed
amount of work after a go line (so the profiler is attached first):

* ``spin.py``: CPU-bound Python, run 10 or 100 frames deep: every sample
  walks that many interpreter frames;
* ``ping_pong.py``: asyncio round trips with a forked echo process: each one
  waits in epoll and switches tasks, which is what the stall detector hooks.

Each runs on one CPU, we on the other, untraced and under 99 Hz CPU
profiling of its pid with Python
frames off, merged without stall detection, and merged with it (the
default).  BPF programs run in the context of what they observe, so their
cost shows in the workload's time; the kernel's run-time statistics give
each program's share exactly.  Runs of every configuration are interleaved
and the medians compared.

Run it with ``python bench/run.py --only python`` (root).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import anyio.to_thread

from benchmarks._support import ProcessSnapshot, bpf_unavailable, median, ready_go

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from _support import program_ids

from ebpf_stream import EbpfConfig, Profiler
from ebpf_stream._bpf.syscalls import enable_run_time_stats
from ebpf_stream.exporters import MemoryExporter

REPEATS = 5
# The workload (the echo process included) runs on one CPU and we on the
# other: its round trips are then context switches on one CPU, and how fast
# an idle CPU wakes up does not enter its time.
WORKLOAD_CPU, TRACER_CPU = 0, 1
_WORKLOADS_DIR = Path(__file__).resolve().parents[2] / "tests" / "workloads" / "python"
# name -> arguments after the interpreter; each takes 1.3 to 1.5 s untraced here
WORKLOADS: dict[str, list[str]] = {
    "spin, 10 frames deep": [str(_WORKLOADS_DIR / "spin.py"), "10", "40000000"],
    "spin, 100 frames deep": [str(_WORKLOADS_DIR / "spin.py"), "100", "40000000"],
    "asyncio ping-pong, 150,000 round trips": [str(_WORKLOADS_DIR / "ping_pong.py"), "150000"],
}
_BASE = EbpfConfig.for_environment("development").with_sample_rate(99)
CONFIGS: dict[str, EbpfConfig | None] = {
    "none": None,
    "99 Hz, Python frames off": _BASE.with_python_frames("off"),
    "99 Hz, merged, stall detection off": _BASE.with_stall_threshold(0),
    "99 Hz, merged + stall detection": _BASE,
}
# Program groups whose run time is reported apart, by the program's name.
SAMPLING = "on_cpu_sample"
SCHED_SWITCH = "sched_switch"
EPOLL = "epoll"


def _group(program: str) -> str:
    for group in (SAMPLING, SCHED_SWITCH, EPOLL):
        if group in program:
            return group
    return "other"


def _run_times(ids: set[int]) -> tuple[Counter[str], Counter[str]]:
    """(run ns, runs) of the given programs, summed by group."""
    listed = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                       text=True, check=True).stdout or "[]")
    ns: Counter[str] = Counter()
    runs: Counter[str] = Counter()
    for program in listed:
        if program["id"] in ids:
            group = _group(program.get("name", ""))
            ns[group] += program.get("run_time_ns", 0)
            runs[group] += program.get("run_cnt", 0)
    return ns, runs


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """One timed run of a workload."""

    workload_ms: float
    tracer_cpu_ms: float = 0.0  # our process's CPU during the timed part
    target_samples: int = 0  # samples of the workload taken in the timed part
    bpf_ns: dict[str, int] = dataclasses.field(default_factory=dict)  # by program group
    bpf_runs: dict[str, int] = dataclasses.field(default_factory=dict)


def _run(argv: list[str], config: EbpfConfig | None) -> Run:
    proc, go = ready_go(["taskset", "-c", str(WORKLOAD_CPU), sys.executable, *argv])
    if config is None:
        return Run(go())

    async def traced() -> Run:
        memory = MemoryExporter()
        async with Profiler(config.with_pids([proc.pid]), [memory]):
            ids = program_ids()
            ns0, runs0 = _run_times(ids)
            before = ProcessSnapshot.take(os.getpid())
            start_ns = time.time_ns()
            ms = await anyio.to_thread.run_sync(go)
            end_ns = time.time_ns()
            after = ProcessSnapshot.take(os.getpid())
            ns1, runs1 = _run_times(ids)
        assert memory.profile is not None
        samples = sum(1 for s in memory.profile if s.pid == proc.pid
                      for t in s.timestamps_ns if start_ns <= t <= end_ns)
        return Run(ms, (after.clock_cpu_ns - before.clock_cpu_ns) / 1e6, samples,
                   dict(ns1 - ns0), dict(runs1 - runs0))

    return anyio.run(traced, backend_options={"use_uvloop": True})


@dataclasses.dataclass(frozen=True, slots=True)
class PythonFigures:
    """Medians over the repeats of one (workload, configuration)."""

    workload: str
    config: str
    workload_ms: float
    slowdown: float  # against "none" on the same workload
    tracer_cpu_ms: float
    target_samples: float
    ns_per_sample: float  # on_cpu_sample's run time per sample of the workload
    ns_per_run: dict[str, float]  # run_time_ns / run_cnt of each program group
    runs: dict[str, float]  # runs of each program group in the timed part


def _summary(workload: str, config: str, runs: list[Run], none_ms: float) -> PythonFigures:
    groups = sorted({g for r in runs for g in r.bpf_runs})
    ms = median(r.workload_ms for r in runs)
    return PythonFigures(
        workload, config, ms, ms / none_ms, median(r.tracer_cpu_ms for r in runs),
        median(r.target_samples for r in runs),
        median(r.bpf_ns.get(SAMPLING, 0) / max(1, r.target_samples) for r in runs),
        {g: median(r.bpf_ns.get(g, 0) / max(1, r.bpf_runs.get(g, 0)) for r in runs)
         for g in groups},
        {g: median(r.bpf_runs.get(g, 0) for r in runs) for g in groups})


def measure_python(repeats: int = REPEATS) -> list[PythonFigures]:
    """Every (workload, configuration) ``repeats`` times, interleaved."""
    stats_fd = enable_run_time_stats()  # run_time_ns is only accounted while held
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {TRACER_CPU})  # threads started from now on inherit it
    try:
        runs: dict[tuple[str, str], list[Run]] = {
            (w, c): [] for w in WORKLOADS for c in CONFIGS}
        for _ in range(repeats):
            for workload, argv in WORKLOADS.items():
                for name, config in CONFIGS.items():
                    runs[(workload, name)].append(_run(argv, config))
                    time.sleep(0.2)
    finally:
        os.sched_setaffinity(0, cpus)
        if stats_fd is not None:
            os.close(stats_fd)
    figures = []
    for workload in WORKLOADS:
        none_ms = median(r.workload_ms for r in runs[(workload, "none")])
        figures += [_summary(workload, name, runs[(workload, name)], none_ms)
                    for name in CONFIGS]
    return figures


# -- asv ----------------------------------------------------------------------

Cache = list[PythonFigures] | str


def setup_cache() -> Cache:
    return bpf_unavailable() or measure_python()


setup_cache.timeout = 900  # type: ignore[attr-defined]


def setup(cache: Cache) -> None:
    if isinstance(cache, str):
        raise NotImplementedError(cache)


def _figure(figures: list[PythonFigures], workload: str, config: str) -> PythonFigures:
    return next(f for f in figures if f.workload == workload and f.config == config)


def track_slowdown_spin_100_deep_merged(figures: list[PythonFigures]) -> float:
    return _figure(figures, "spin, 100 frames deep", "99 Hz, merged + stall detection").slowdown


def track_sample_ns_spin_100_deep_merged(figures: list[PythonFigures]) -> float:
    return _figure(figures, "spin, 100 frames deep",
                   "99 Hz, merged + stall detection").ns_per_sample


def track_sample_ns_spin_100_deep_off(figures: list[PythonFigures]) -> float:
    return _figure(figures, "spin, 100 frames deep", "99 Hz, Python frames off").ns_per_sample


def track_slowdown_ping_pong_stall_detection(figures: list[PythonFigures]) -> float:
    return _figure(figures, "asyncio ping-pong, 150,000 round trips",
                   "99 Hz, merged + stall detection").slowdown
