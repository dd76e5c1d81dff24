"""What each feature costs a fixed workload: its slowdown and the tracer's own CPU.

The workload (tests/workloads/mixed_load.c) mixes what the features observe:
syscalls, loopback TCP connections and fresh pages.  It waits for a go line,
so the profiler is fully attached before the timed part starts; each run
targets the workload's pid.  Runs of every configuration are interleaved
and the medians compared, so drift in the machine hits them all alike.

Run it with ``python bench/run.py --only features`` (root).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import msgspec

from benchmarks._support import ProcessSnapshot, median, ready_go

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from _support import build

from ebpf_stream import EbpfConfig, Profiler
from ebpf_stream.exporters import MemoryExporter

ROUNDS = 500  # about a second untraced
REPEATS = 5
FEATURES: dict[str, dict[str, bool]] = {
    "none": {},
    "cpu (49 Hz)": {"cpu_profiling": True},
    "syscalls": {"syscall_tracing": True},
    "syscalls, counts only": {"syscall_tracing": True, "syscall_latency": False},
    "network": {"network_tracing": True},
    "memory": {"memory_tracing": True},
    "all four": {"cpu_profiling": True, "syscall_tracing": True, "network_tracing": True,
                 "memory_tracing": True},
}


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureFigures:
    feature: str
    workload_ms: float  # median wall time of the timed part
    slowdown: float  # against "none" in the same run
    tracer_cpu_ms: float  # our process's CPU during the timed part


def _run_workload(binary: Path, config: EbpfConfig | None) -> tuple[float, float]:
    """(workload ms, tracer CPU ms) of one run, traced with ``config`` if given."""
    proc, go = ready_go([str(binary), str(ROUNDS)])
    if config is None:
        return go(), 0.0

    async def traced() -> tuple[float, float]:
        async with Profiler(config.with_pids([proc.pid]), [MemoryExporter()]):
            before = ProcessSnapshot.take(os.getpid())
            ms = await anyio.to_thread.run_sync(go)
            after = ProcessSnapshot.take(os.getpid())
        # BPF programs run in the workload's context: their cost is in its slowdown.
        return ms, (after.clock_cpu_ns - before.clock_cpu_ns) / 1e6

    return anyio.run(traced, backend_options={"use_uvloop": True})


def measure_features(features: Sequence[str] = tuple(FEATURES), repeats: int = REPEATS,
                     workdir: Path = Path("/tmp")) -> list[FeatureFigures]:
    binary = build("mixed_load", workdir)
    base = EbpfConfig.for_environment("production").with_sample_rate(49)
    runs: dict[str, list[tuple[float, float]]] = {f: [] for f in features}
    for _ in range(repeats):
        for feature in features:
            flags = {"cpu_profiling": False, **FEATURES[feature]}
            config = msgspec.structs.replace(base, **flags) if FEATURES[feature] else None
            runs[feature].append(_run_workload(binary, config))
            time.sleep(0.2)
    none_ms = median(ms for ms, _ in runs.get("none", [(1.0, 0.0)]))
    return [FeatureFigures(f, median(ms for ms, _ in runs[f]),
                           median(ms for ms, _ in runs[f]) / none_ms,
                           median(cpu for _, cpu in runs[f])) for f in features]
