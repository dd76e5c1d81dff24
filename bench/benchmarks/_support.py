"""Helpers shared by the benchmarks and ``bench/run.py``.

Process costs are read from the kernel, not from the process itself, so the
same code measures our profiler and a baseline tool: CPU from the process's
scheduler clock and from ``/proc/PID/stat``, BPF run time and map memory from
``/proc/PID/fdinfo``, memory from ``/proc/PID/status``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_CPUCLOCK_SCHED = 2


def bpf_unavailable() -> str | None:
    """Why BPF benchmarks cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "loading BPF programs needs root"
    try:
        system_bcc()
    except ImportError:
        return "bcc is not importable"
    return None


def prepare_bcc() -> dict[str, str]:
    """Mount tracefs if needed and point bcc at kernel headers.

    Returns the environment variables a bcc subprocess needs too.
    """
    from ebpf_stream._bpf.environment import ensure_tracefs
    from ebpf_stream._bpf.headers import find_headers

    ensure_tracefs()
    system_bcc()  # so that ``from bcc import BPF`` works from here on
    env = {"BCC_KERNEL_SOURCE": str(find_headers().path)}
    os.environ.update(env)
    return env


def system_bcc() -> ModuleType:
    """bcc, for the benchmarks that compare against it in this process.

    ebpf-stream's environment has no bcc (the compile worker runs under the
    interpreter that has it), so bcc is taken from where its package
    installed it: the system's Python, or this interpreter if it has one.
    """
    if "bcc" not in sys.modules:
        from ebpf_stream._bpf.compiler import find_compiler

        try:
            location = find_compiler().bcc
        except Exception as exc:
            raise ImportError(str(exc)) from exc
        spec = importlib.util.spec_from_file_location(
            "bcc", location / "__init__.py", submodule_search_locations=[str(location)])
        if spec is None or spec.loader is None:
            raise ImportError(f"bcc at {location} cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = module
        spec.loader.exec_module(module)
    return sys.modules["bcc"]


def checkout_of(tree: Path) -> str:
    """The commit checked out in ``tree``, ``+dirty`` if its package or kernel
    sources differ from it: the code a measurement measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=tree, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ebpf_stream", "kernel"],
                               capture_output=True, text=True, cwd=tree, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"unknown ({tree})"
    return f"{head}{'+dirty' if dirty.strip() else ''} ({tree})"


def median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


def process_clock_ns(pid: int) -> int:
    """CPU time of every thread of ``pid``, living or exited, to the nanosecond.

    This is the scheduler's own sum (CLOCK_PROCESS_CPUTIME_ID of another
    process, as clock_getcpuclockid builds it); ``/proc/PID/stat`` rounds the
    same time to clock ticks.
    """
    return time.clock_gettime_ns((~pid << 3) | _CPUCLOCK_SCHED)


def stat_cpu_ns(pid: int) -> int:
    """utime + stime of ``pid`` from ``/proc/PID/stat``, in ns (tick resolution)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _CLK_TCK


def _fdinfos(pid: int) -> Iterable[dict[str, str]]:
    base = Path(f"/proc/{pid}/fdinfo")
    for entry in base.iterdir():
        try:
            text = entry.read_text()
        except OSError:  # closed meanwhile
            continue
        info: dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
        yield info


def _machine_forks() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessSnapshot:
    """What one process has cost so far, read from outside it."""

    wall_ns: int
    clock_cpu_ns: int
    stat_cpu_ns: int
    bpf_run_ns: int
    bpf_run_count: int
    anon_rss_bytes: int
    bpf_map_bytes: int
    machine_forks: int  # processes created on the whole machine since boot

    @classmethod
    def take(cls, pid: int) -> ProcessSnapshot:
        """Read every counter of ``pid`` now; BPF objects are counted once per id."""
        progs: dict[str, tuple[int, int]] = {}
        maps: dict[str, int] = {}
        for info in _fdinfos(pid):
            if "prog_id" in info:
                progs[info["prog_id"]] = (int(info.get("run_time_ns", 0)),
                                          int(info.get("run_cnt", 0)))
            elif "map_id" in info:
                maps[info["map_id"]] = int(info.get("memlock", 0))
        anon = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
        return cls(
            wall_ns=time.monotonic_ns(),
            clock_cpu_ns=process_clock_ns(pid),
            stat_cpu_ns=stat_cpu_ns(pid),
            bpf_run_ns=sum(ns for ns, _ in progs.values()),
            bpf_run_count=sum(n for _, n in progs.values()),
            anon_rss_bytes=anon,
            bpf_map_bytes=sum(maps.values()),
            machine_forks=_machine_forks(),
        )


def machine_percent(cpu_ns: float, wall_ns: float, cpus: int | None = None) -> float:
    """``cpu_ns`` as a share of every CPU of the machine over ``wall_ns``."""
    return 100.0 * cpu_ns / (wall_ns * (cpus or os.cpu_count() or 1))


def ready_go(argv: list[str]) -> tuple[subprocess.Popen[str], Callable[[], float]]:
    """Start a workload that prints ``ready``, waits for ``go`` on stdin, then does
    its fixed work and prints the nanoseconds it took.

    Returns the process (so a profiler can attach first) and the function
    that starts the timed part and returns its milliseconds.
    """
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"

    def go() -> float:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        elapsed_ns = int(proc.stdout.readline())
        proc.wait()
        return elapsed_ns / 1e6

    return proc, go
