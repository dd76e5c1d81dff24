"""Syscall tracing on real BPF: exact counts, errors, histograms and slow calls.

The workload (tests/workloads/getppid_loop.c) makes a known number of
getppid calls flat out (millions per second on one core), a known number of
close(-1) calls that fail with EBADF and a few 20 ms nanosleeps; every count
must come out exact, and Debian's ``syscount-bpfcc`` must agree.  Counts
and errors must be just as exact with latency off (counts only).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import anyio
import pytest
from _support import bpf_fds, build, program_ids, unloaded

from ebpf_stream import EbpfConfig, Profiler, Stats
from ebpf_stream._model.batch import SlowCall
from ebpf_stream._model.events import SyscallTotals
from ebpf_stream._probes.syscalls import SyscallProbe
from ebpf_stream.exporters import MemoryExporter

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]

CALLS = 2_000_000
FAILING = 1000
SLOW = 3
SLOW_MS = 20


@pytest.fixture(scope="module")
def getppid_loop(workload_dir: Path) -> Path:
    return build("getppid_loop", workload_dir)


@pytest.fixture(autouse=True)
def fresh_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing cached from earlier runs: every name must be right the first time."""
    monkeypatch.setenv("EBPF_STREAM_CACHE", str(tmp_path / "cache"))


class Workload:
    """getppid_loop, started and waiting for the tracer to be ready."""

    def __init__(self, binary: Path, calls: int = CALLS, failing: int = FAILING,
                 slow: int = SLOW) -> None:
        self.proc = subprocess.Popen([str(binary), str(calls), str(failing), str(slow),
                                      str(SLOW_MS)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    async def run(self) -> None:
        """Release the calls and wait until they are all made."""
        self._send()
        line = await anyio.to_thread.run_sync(self._line)
        assert line.startswith("done"), line

    def end(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # EOF ends every wait
        self.proc.wait(10)


#: With latency (histograms, slow calls) and counts only.
LATENCY = pytest.mark.parametrize("latency", [True, False], ids=["latency", "counts-only"])


def config(targets: list[int] | None, latency: bool = True) -> EbpfConfig:
    base = (EbpfConfig.for_environment("development").with_syscall_tracing(True)
            .with_cpu_profiling(False).with_export_interval(0.5)
            .with_slow_syscall_threshold(SLOW_MS / 2).with_syscall_latency(latency))
    return base.with_pids(targets) if targets else base


def totals_of(memory: MemoryExporter, pid: int) -> dict[str, SyscallTotals]:
    """The latest totals of ``pid``, by syscall name."""
    latest: dict[str, SyscallTotals] = {}
    for batch in memory.batches:
        for t in batch.totals:
            if isinstance(t, SyscallTotals) and t.pid == pid:
                latest[t.syscall] = t
    return latest


def assert_exact(totals: dict[str, SyscallTotals], latency: bool = True) -> None:
    assert totals["getppid"].count == CALLS and totals["getppid"].errors == 0
    assert totals["close"].count == FAILING and totals["close"].errors == FAILING
    sleeps = totals.get("clock_nanosleep") or totals["nanosleep"]
    assert sleeps.count == SLOW and sleeps.errors == 0
    for t in totals.values():
        assert len(t.buckets) == 32
        assert sum(t.buckets) == (t.count if latency else 0), t
        assert latency or t.duration_ns == 0, t
    if latency:
        assert sleeps.duration_ns >= SLOW * SLOW_MS * 1_000_000
        # 20 ms lies in [2^24, 2^25) ns.
        assert sleeps.buckets[24] == SLOW


async def trace(workload: Workload, targets: list[int] | None,
                latency: bool = True) -> MemoryExporter:
    """Trace the whole workload; check that nothing stays loaded afterwards."""
    memory = MemoryExporter()
    try:
        async with Profiler(config(targets, latency), [memory], system_wide=targets is None):
            ours = program_ids()
            await workload.run()
            await anyio.sleep(1.2)  # two totals snapshots, stacks symbolized while it lives
    finally:
        workload.end()
    assert len(ours) >= (3 if latency else 2) and unloaded(ours)
    assert bpf_fds() == []
    return memory


@LATENCY
@pytest.mark.anyio
async def test_counts_errors_histograms_and_slow_calls_are_exact(
        getppid_loop: Path, latency: bool) -> None:
    workload = Workload(getppid_loop)
    memory = await trace(workload, [workload.pid], latency)
    totals = totals_of(memory, workload.pid)
    assert_exact(totals, latency)
    assert {t.comm for t in totals.values()} == {"getppid_loop"}
    slow = [r for b in memory.batches for r in b.records if isinstance(r, SlowCall)]
    assert len(slow) == (SLOW if latency else 0)
    for record in slow:
        call = record.call
        assert call.pid == call.tid == workload.pid and call.comm == "getppid_loop"
        assert call.syscall in ("clock_nanosleep", "nanosleep") and call.ret == 0
        assert call.duration_ns >= SLOW_MS * 1_000_000
        assert call.user_stack and call.kernel_stack and 0 not in call.user_stack
        names = [f.name for f in record.frames]
        assert "sleep_slowly" in names and "main" in names, names


@LATENCY
@pytest.mark.anyio
async def test_system_wide_counts_are_exact(getppid_loop: Path, latency: bool) -> None:
    workload = Workload(getppid_loop)
    memory = await trace(workload, None, latency)
    assert_exact(totals_of(memory, workload.pid), latency)
    assert len({t.pid for b in memory.batches for t in b.totals}) > 1


@LATENCY
@pytest.mark.anyio
async def test_exit_group_is_counted_and_forget_deletes_exited_processes(
        getppid_loop: Path, latency: bool) -> None:
    """exit_group never returns: it is counted as its thread ends."""
    workload = Workload(getppid_loop, calls=1000, failing=0, slow=0)
    probe = SyscallProbe(config([workload.pid], latency), Stats(), targets=[workload.pid])
    await probe.open()
    probe.start()
    try:
        await workload.run()
        assert {t.syscall for t in probe.read_totals()} >= {"getppid"}  # type: ignore[union-attr]
        workload.end()
        ended = {t.syscall: t.count for t in probe.read_totals()}  # type: ignore[union-attr]
        assert ended["exit_group"] == 1 and ended["getppid"] == 1000
        probe.forget({workload.pid})
        assert probe.read_totals() == []
        assert probe.calls_not_counted == 0
    finally:
        probe.close()
        workload.end()


SYSCOUNT = Path("/usr/sbin/syscount-bpfcc")


def syscount_table(output: str) -> dict[str, int]:
    """syscount's 'SYSCALL COUNT' rows."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+(\d+)$", output, re.MULTILINE)}


@pytest.mark.skipif(not SYSCOUNT.exists(), reason="bpfcc-tools is not installed")
@pytest.mark.anyio
async def test_syscount_agrees(getppid_loop: Path) -> None:
    """bcc's syscount (its own x86-64 name table) on the same run, as an independent count."""
    workload = Workload(getppid_loop)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    syscount = subprocess.Popen([str(SYSCOUNT), "-p", str(workload.pid), "-T", "50"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
    try:
        assert syscount.stdout is not None
        while "Ctrl+C" not in (line := syscount.stdout.readline()):
            assert line, "syscount-bpfcc ended before tracing"
        memory = await trace(workload, [workload.pid])
        syscount.send_signal(signal.SIGINT)
        output, _ = syscount.communicate(timeout=30)
    finally:
        syscount.kill()
        syscount.wait()
    theirs = syscount_table(output)
    ours = {name: t.count for name, t in totals_of(memory, workload.pid).items()}
    for name in ("getppid", "close"):
        assert theirs[name] == ours[name], (name, theirs, ours)
    sleeps = "clock_nanosleep" if "clock_nanosleep" in ours else "nanosleep"
    assert theirs[sleeps] == ours[sleeps] == SLOW
