"""What syscall tracing costs a process that does nothing but syscalls.

``tests/workloads/getppid_loop.c`` makes a fixed number of ``getppid`` calls
flat out on one core and reports the time per call.  It runs with tracing
off; under the floor, the least any tracepoint-based exact counter can cost
(a per-CPU counter on ``raw_syscalls:sys_enter``, filtered by pid, loaded by
bcc in a separate process); and under our ``SyscallProbe``, targeting the
loop's pid and system-wide, with latency (entry and exit hooks, two clock
reads) and counts only (the exit hook alone).  Any syscall tracepoint forces the kernel's slow
syscall path on every task, so the floor is far above "off"; ours is judged
against the floor.  Modes are interleaved round by round and reported as
medians, and every traced run checks that the count is exact.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread

from ebpf_stream import EbpfConfig, Stats
from ebpf_stream._model.events import EventMessage
from ebpf_stream._probes.syscalls import SyscallProbe

from ._support import bpf_unavailable, median, prepare_bcc

CALLS = 20_000_000
ROUNDS = 5
MODES = ("off", "floor", "ours (pid)", "ours (system-wide)", "ours (pid), counts only",
         "ours (system-wide), counts only")
_LOOP_SOURCE = Path(__file__).resolve().parents[2] / "tests" / "workloads" / "getppid_loop.c"
_SYSTEM_PYTHON = "/usr/bin/python3"  # bcc's own interpreter

# The floor: one per-CPU counter bumped on every syscall entry of one pid.
_FLOOR = r"""
import sys
from bcc import BPF
b = BPF(text='''
BPF_PERCPU_ARRAY(calls, u64, 1);
TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
    if ((bpf_get_current_pid_tgid() >> 32) != PID)
        return 0;
    int zero = 0;
    u64 *n = calls.lookup(&zero);
    if (n)
        (*n)++;
    return 0;
}''', cflags=["-DPID=" + sys.argv[1]])
print("ready", flush=True)
sys.stdin.read()
print(sum(b["calls"][0]))
"""


def build_loop(directory: Path) -> Path:
    """The loop, optimized as a real program would be."""
    binary = directory / "getppid_loop"
    cc = shutil.which("cc") or shutil.which("gcc") or "cc"
    subprocess.run([cc, "-O2", "-fno-omit-frame-pointer", "-o", str(binary), str(_LOOP_SOURCE)],
                   check=True)
    return binary


class Loop:
    """One run of the loop: started and waiting, then released and timed."""

    def __init__(self, binary: Path, calls: int) -> None:
        self.calls = calls
        self.proc = subprocess.Popen([str(binary), str(calls)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self) -> float:
        """Release the loop; its ns per call once it is done."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        done, ns = self.proc.stdout.readline().split()
        assert done == "done"
        return float(ns)

    def end(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def run_off(loop: Loop) -> float:
    return loop.run()


def run_floor(loop: Loop) -> float:
    env = dict(os.environ, **prepare_bcc())
    floor = subprocess.Popen([_SYSTEM_PYTHON, "-c", _FLOOR, str(loop.pid)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert floor.stdout is not None and floor.stdout.readline().strip() == "ready"
        ns = loop.run()
        counted, _ = floor.communicate("")
    finally:
        floor.kill()
        floor.wait()
    # Every syscall after attaching counts, the loop's calls among them.
    assert int(counted) >= loop.calls, (counted, loop.calls)
    return ns


async def _run_ours(loop: Loop, system_wide: bool, latency: bool = True) -> float:
    config = (EbpfConfig.for_environment("production").with_syscall_tracing(True)
              .with_syscall_latency(latency))
    probe = SyscallProbe(config, Stats(), targets=None if system_wide else [loop.pid])

    async def discard(message: EventMessage) -> None:
        pass

    await probe.open()
    probe.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe.run, discard)
            ns = await anyio.to_thread.run_sync(loop.run)
            tg.cancel_scope.cancel()
        counted = sum(t.count for t in probe.read_totals()
                      if t.pid == loop.pid and t.syscall == "getppid")  # type: ignore[union-attr]
    finally:
        probe.close()
    assert counted == loop.calls, f"counted {counted} of {loop.calls} getppid calls"
    return ns


def run_ours(loop: Loop) -> float:
    return anyio.run(_run_ours, loop, False)


def run_ours_system_wide(loop: Loop) -> float:
    return anyio.run(_run_ours, loop, True)


def run_ours_counts_only(loop: Loop) -> float:
    return anyio.run(_run_ours, loop, False, False)


def run_ours_system_wide_counts_only(loop: Loop) -> float:
    return anyio.run(_run_ours, loop, True, False)


RUNNERS: dict[str, Callable[[Loop], float]] = dict(zip(MODES, (
    run_off, run_floor, run_ours, run_ours_system_wide, run_ours_counts_only,
    run_ours_system_wide_counts_only), strict=True))


@dataclasses.dataclass
class SyscallLoadFigures:
    calls: int
    rounds: int
    ns_per_call: dict[str, list[float]]

    def median_ns(self, mode: str) -> float:
        return median(self.ns_per_call[mode])

    def slowdown(self, mode: str) -> float:
        return self.median_ns(mode) / self.median_ns("off")

    def calls_per_s(self, mode: str) -> float:
        return 1e9 / self.median_ns(mode)


def measure_syscall_load(calls: int = CALLS, rounds: int = ROUNDS) -> SyscallLoadFigures:
    """Every mode ``rounds`` times, interleaved; counts checked exact on every traced run."""
    prepare_bcc()
    with tempfile.TemporaryDirectory() as tmp:
        binary = build_loop(Path(tmp))
        figures = SyscallLoadFigures(calls, rounds, {mode: [] for mode in MODES})
        for _ in range(rounds):
            for mode, runner in RUNNERS.items():
                loop = Loop(binary, calls)
                try:
                    figures.ns_per_call[mode].append(runner(loop))
                finally:
                    loop.end()
    return figures


# -- asv ----------------------------------------------------------------------

Cache = SyscallLoadFigures | str


def setup_cache() -> Cache:
    return bpf_unavailable() or measure_syscall_load()


setup_cache.timeout = 900  # type: ignore[attr-defined]


def setup(cache: Cache) -> None:
    if isinstance(cache, str):
        raise NotImplementedError(cache)


def track_slowdown_floor(figures: SyscallLoadFigures) -> float:
    return figures.slowdown("floor")


def track_slowdown_ours_pid(figures: SyscallLoadFigures) -> float:
    return figures.slowdown("ours (pid)")


def track_slowdown_ours_system_wide(figures: SyscallLoadFigures) -> float:
    return figures.slowdown("ours (system-wide)")


def track_slowdown_ours_pid_counts_only(figures: SyscallLoadFigures) -> float:
    return figures.slowdown("ours (pid), counts only")


def track_slowdown_ours_system_wide_counts_only(figures: SyscallLoadFigures) -> float:
    return figures.slowdown("ours (system-wide), counts only")
