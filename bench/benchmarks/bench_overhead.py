"""Steady-state cost of whole-system profiling on a busy machine, at 19, 49 and 99 Hz.

One CPU-bound process per CPU keeps the machine busy, so every timer tick
lands on a running task and the BPF program runs at the full rate.  A
separate profiler process (``_overhead_probe``) runs the production preset
and reports, after a warm-up that leaves out compiling, loading and the
first symbolization, the deltas over a window of:

* the library's own meter (``get_overhead()``): CPU of the profiler's task
  steps and worker threads, plus BPF program run time;
* the kernel's view of the whole profiler process (every thread, the event
  loop included), plus the same BPF run time.  The BPF program runs in the
  context of whichever task the timer interrupted, so its time is charged to
  the busy processes and must be added to the profiler process's own.

Memory is the process's anonymous RSS plus the memlock of its BPF maps, at
the end of the window.  For context, bcc's ``profile`` tool is measured the
same way, from outside, on the same busy machine.  Every rate and the
baseline are measured ``repeats`` times, interleaved, and reported as medians:
a process starting elsewhere on the machine costs a burst of symbolization,
so single windows vary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ebpf_stream

from ._support import ProcessSnapshot, bpf_unavailable, machine_percent, median, prepare_bcc

RATES = (19, 49, 99)
WARMUP_S = 5.0
WINDOW_S = 30.0
REPEATS = 3
WINDOW_ENV = "EBPF_STREAM_BENCH_WINDOW_S"  # override WINDOW_S and REPEATS under asv
REPEATS_ENV = "EBPF_STREAM_BENCH_REPEATS"
PROFILE_TOOL = Path("/usr/sbin/profile-bpfcc")
BASELINE_HZ = 49
OURS = "ebpf-stream"

# Spins 16 frames deep, so every sample walks a real user stack, and spends about
# 5% of its time in the kernel (reading /dev/zero), as servers do: kernel stacks
# show up from the first seconds, so the one-time load of kernel symbols falls in
# the warm-up at every rate rather than in the window at the lowest.
_BUSY_C = r"""
#include <fcntl.h>
#include <unistd.h>
static volatile unsigned long sink;
static char buf[1 << 20];
static int zero;
__attribute__((noinline)) static void spin(int depth) {
    if (depth > 0) {
        spin(depth - 1);
        sink++;
    }
    for (;;) {
        for (unsigned long i = 0; i < 200000; i++)
            sink++;
        if (read(zero, buf, sizeof buf) < 0)
            sink++;
    }
}
int main(void) {
    zero = open("/dev/zero", O_RDONLY);
    spin(16);
    return 0;
}
"""


@contextlib.contextmanager
def busy_processes(n: int | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Keep ``n`` CPUs (default: all) busy until the block exits."""
    n = n or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ebpf-stream-busy-") as tmp:
        binary = Path(tmp) / "busy"
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc and subprocess.run(
            [cc, "-O1", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls",
             "-x", "c", "-", "-o", str(binary)],
            input=_BUSY_C.encode(), capture_output=True,
        ).returncode == 0:
            cmd = [str(binary)]
        else:
            cmd = [sys.executable, "-c", "while True: pass"]
        procs = [subprocess.Popen(cmd) for _ in range(n)]
        try:
            yield procs
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()


@dataclasses.dataclass(frozen=True, slots=True)
class OverheadFigures:
    """One tool's steady-state cost over one window; CPU in % of the whole machine."""

    tool: str
    hz: int
    window_s: float
    samples_per_s: float
    # The library's meter: user-space CPU it attributes to itself, plus BPF.
    meter_cpu_percent: float
    meter_user_cpu_percent: float
    # The kernel's view of the process, plus BPF: precise clock, and /proc/PID/stat.
    process_cpu_percent: float
    process_user_cpu_percent: float
    stat_cpu_percent: float
    bpf_cpu_percent: float
    bpf_ns_per_run: float
    memory_bytes: int
    anon_rss_bytes: int
    bpf_map_bytes: int
    # Processes created anywhere on the machine: each new one must be symbolized.
    machine_forks_per_s: float


def _figures(tool: str, hz: int, a: ProcessSnapshot, b: ProcessSnapshot, samples: float,
             meter: tuple[dict[str, Any], dict[str, Any]] | None = None) -> OverheadFigures:
    """Figures for the window from ``a`` to ``b``.

    ``meter`` is the library's own ``Overhead`` at (about) the same two
    instants, when the tool is ours.
    """
    wall = b.wall_ns - a.wall_ns
    bpf = b.bpf_run_ns - a.bpf_run_ns
    runs = b.bpf_run_count - a.bpf_run_count
    clock = b.clock_cpu_ns - a.clock_cpu_ns
    stat = b.stat_cpu_ns - a.stat_cpu_ns
    meter_cpu = meter_user = 0.0
    memory = b.anon_rss_bytes + b.bpf_map_bytes
    if meter is not None:
        oa, ob = meter
        meter_wall = ob["wall_ns"] - oa["wall_ns"]
        meter_user = machine_percent(ob["user_cpu_ns"] - oa["user_cpu_ns"], meter_wall)
        meter_cpu = machine_percent(ob["user_cpu_ns"] - oa["user_cpu_ns"]
                                    + ob["bpf_cpu_ns"] - oa["bpf_cpu_ns"], meter_wall)
        memory = ob["memory_bytes"]
    return OverheadFigures(
        tool=tool,
        hz=hz,
        window_s=wall / 1e9,
        samples_per_s=samples / (wall / 1e9),
        meter_cpu_percent=meter_cpu,
        meter_user_cpu_percent=meter_user,
        process_cpu_percent=machine_percent(clock + bpf, wall),
        process_user_cpu_percent=machine_percent(clock, wall),
        stat_cpu_percent=machine_percent(stat + bpf, wall),
        bpf_cpu_percent=machine_percent(bpf, wall),
        bpf_ns_per_run=bpf / runs if runs else 0.0,
        memory_bytes=memory,
        anon_rss_bytes=b.anon_rss_bytes,
        bpf_map_bytes=b.bpf_map_bytes,
        machine_forks_per_s=(b.machine_forks - a.machine_forks) / (wall / 1e9),
    )


def measure_ebpf_stream(hz: int, warmup_s: float, window_s: float) -> OverheadFigures:
    """Run the profiler process at ``hz`` and turn its report into figures."""
    package = __package__ or "benchmarks"
    root = Path(__file__).resolve().parents[package.count(".") + 1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    # cwd: ``-m`` puts it first on sys.path, and it must not shadow ebpf_stream.
    proc = subprocess.run(
        [sys.executable, "-m", f"{package}._overhead_probe", "--hz", str(hz),
         "--warmup", str(warmup_s), "--window", str(window_s)],
        env=env, cwd=root, capture_output=True, text=True, timeout=warmup_s + window_s + 120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"profiler process failed ({proc.returncode}):\n{proc.stderr}")
    report: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    if report["ebpf_stream"] != ebpf_stream.__file__:
        raise RuntimeError(f"the profiler process measured {report['ebpf_stream']}, "
                           f"not {ebpf_stream.__file__}")
    warm, end = report["warm"], report["end"]
    return _figures(
        OURS, hz,
        ProcessSnapshot(**warm["process"]), ProcessSnapshot(**end["process"]),
        samples=end["stats"]["received"] - warm["stats"]["received"],
        meter=(warm["overhead"], end["overhead"]),
    )


def measure_profile_tool(hz: int, warmup_s: float, window_s: float) -> OverheadFigures | None:
    """bcc's ``profile -F hz``, measured from outside; None when it is not installed."""
    if not PROFILE_TOOL.exists():
        return None
    from ebpf_stream._bpf.syscalls import enable_run_time_stats

    env = dict(os.environ, **prepare_bcc())
    stats_fd = enable_run_time_stats()  # run_time_ns is only accounted while held
    proc = subprocess.Popen(
        [str(PROFILE_TOOL), "-F", str(hz), "-f"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while ProcessSnapshot.take(proc.pid).bpf_run_count == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                _, err = proc.communicate(timeout=5)
                raise RuntimeError(f"{PROFILE_TOOL} did not start:\n{err.decode()}")
            time.sleep(0.1)
        time.sleep(warmup_s)
        a = ProcessSnapshot.take(proc.pid)
        time.sleep(window_s)
        b = ProcessSnapshot.take(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)  # it prints its folded stacks, then exits
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        if stats_fd is not None:
            os.close(stats_fd)
    # Samples are counted in its BPF map, not in user space: one program run each.
    return _figures(f"bcc {PROFILE_TOOL.name}", hz, a, b,
                    samples=b.bpf_run_count - a.bpf_run_count)


def median_figures(windows: Sequence[OverheadFigures]) -> OverheadFigures:
    """Each numeric field's median over ``windows`` (all of one tool and rate)."""
    first = windows[0]
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(OverheadFigures):
        value = getattr(first, f.name)
        if isinstance(value, str) or f.name == "hz":
            fields[f.name] = value
        else:
            fields[f.name] = type(value)(median(getattr(w, f.name) for w in windows))
    return OverheadFigures(**fields)


@dataclasses.dataclass(frozen=True, slots=True)
class OverheadRun:
    """Every window measured: each rate of ebpf-stream and the baseline tool, per repeat."""

    windows: tuple[OverheadFigures, ...]

    def of(self, tool: str, hz: int) -> list[OverheadFigures]:
        return [w for w in self.windows if w.tool == tool and w.hz == hz]

    def rows(self) -> list[tuple[OverheadFigures, list[OverheadFigures]]]:
        """(per-field medians, the windows) for each tool and rate, in measuring order."""
        keys = dict.fromkeys((w.tool, w.hz) for w in self.windows)
        return [(median_figures(ws), ws) for ws in (self.of(*k) for k in keys)]

    def at(self, hz: int, tool: str = OURS) -> OverheadFigures:
        return median_figures(self.of(tool, hz))

    @property
    def baseline(self) -> OverheadFigures | None:
        ws = [w for w in self.windows if w.tool != OURS]
        return median_figures(ws) if ws else None


def measure_overhead(rates: Sequence[int] = RATES, *, warmup_s: float = WARMUP_S,
                     window_s: float = WINDOW_S, repeats: int = REPEATS,
                     baseline: bool = True) -> OverheadRun:
    """Measure every rate, then the baseline, ``repeats`` times over, interleaved.

    Interleaving spreads slow drifts of the machine (other work starting and
    stopping) over every rate instead of biasing one.
    """
    windows: list[OverheadFigures] = []
    with busy_processes():
        time.sleep(1.0)  # let them reach their spin
        for _ in range(repeats):
            windows += [measure_ebpf_stream(hz, warmup_s, window_s) for hz in rates]
            if baseline and (other := measure_profile_tool(BASELINE_HZ, warmup_s, window_s)):
                windows.append(other)
    return OverheadRun(tuple(windows))


# -- asv ---------------------------------------------------------------------
# One run measures every rate, so all figures share the same machine state.

Cache = OverheadRun | str


def setup_cache() -> Cache:
    return bpf_unavailable() or measure_overhead(
        window_s=float(os.environ.get(WINDOW_ENV, WINDOW_S)),
        repeats=int(os.environ.get(REPEATS_ENV, REPEATS)))


setup_cache.timeout = 1800  # type: ignore[attr-defined]


def setup(cache: Cache, *params: object) -> None:
    if isinstance(cache, str):
        raise NotImplementedError(cache)


def track_cpu_percent(cache: OverheadRun, hz: int) -> float:
    """Machine CPU % as the library reports it (its meter plus BPF run time)."""
    return cache.at(hz).meter_cpu_percent


def track_process_cpu_percent(cache: OverheadRun, hz: int) -> float:
    """Machine CPU % of the whole profiler process plus BPF run time."""
    return cache.at(hz).process_cpu_percent


def track_bpf_cpu_percent(cache: OverheadRun, hz: int) -> float:
    return cache.at(hz).bpf_cpu_percent


def track_memory_mib(cache: OverheadRun, hz: int) -> float:
    return cache.at(hz).memory_bytes / 2**20


for _fn, _unit in ((track_cpu_percent, "%"), (track_process_cpu_percent, "%"),
                   (track_bpf_cpu_percent, "%"), (track_memory_mib, "MiB")):
    _fn.unit = _unit  # type: ignore[attr-defined]
    _fn.params = list(RATES)  # type: ignore[attr-defined]
    _fn.param_names = ["hz"]  # type: ignore[attr-defined]


class ProfileToolBaseline:
    """bcc's profile tool at 49 Hz, from the same run; skipped when not installed."""

    unit = "%"

    def setup(self, cache: Cache) -> None:
        if isinstance(cache, OverheadRun) and cache.baseline is None:
            raise NotImplementedError(f"{PROFILE_TOOL} is not installed")

    def track_cpu_percent(self, cache: OverheadRun) -> float:
        assert cache.baseline is not None
        return cache.baseline.process_cpu_percent
