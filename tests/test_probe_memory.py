"""Memory tracing on real BPF, against the workload's own getrusage() and /proc.

The workload stops at each step, blocked on stdin, and prints its fault
counters; tracing is attached while it is blocked, so the faults traced
between two steps are exactly the difference of the two lines.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from _support import bpf_fds, build, loaded_programs, program_ids

from ebpf_stream import EbpfConfig, Profiler, Stats
from ebpf_stream._model.events import MemoryTotals, OomKill
from ebpf_stream._probes.memory import MemoryProbe, rss_members
from ebpf_stream.exporters import MemoryExporter

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]

PAGE = os.sysconf("SC_PAGESIZE")
CONFIG = EbpfConfig.for_environment("development").with_export_interval(0.5)


@pytest.fixture(scope="module")
def touch_pages(workload_dir: Path) -> Path:
    return build("touch_pages", workload_dir)


class Steps:
    """A touch_pages run, moved on one step at a time."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.pid = self.proc.pid
        self.faults: dict[str, tuple[int, int]] = {}
        self._read()

    def _read(self) -> str:
        assert self.proc.stdout is not None
        name, minor, major = self.proc.stdout.readline().split()
        self.faults[name] = (int(minor), int(major))
        return name

    def next(self) -> str:
        """Let the workload run to its next step; returns the step's name."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        return self._read()

    def between(self, first: str, last: str) -> tuple[int, int]:
        """Minor and major faults the workload counted between two steps."""
        (min0, maj0), (min1, maj1) = self.faults[first], self.faults[last]
        return min1 - min0, maj1 - maj0

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def steps(argv: list[str]) -> Iterator[Steps]:
    run = Steps(argv)
    try:
        yield run
    finally:
        run.close()


@contextlib.asynccontextmanager
async def tracing(targets: list[int] | None) -> AsyncIterator[MemoryProbe]:
    """An attached memory probe; on exit, checks it left nothing loaded."""
    probe = MemoryProbe(CONFIG, Stats(), targets=targets)
    await probe.open()
    probe.start()
    ours = program_ids()
    try:
        yield probe
    finally:
        probe.close()
    assert ours and not ours & loaded_programs()
    assert bpf_fds() == []


def memory_totals(probe: MemoryProbe) -> list[MemoryTotals]:
    return [t for t in probe.read_totals() if isinstance(t, MemoryTotals)]


def totals_of(probe: MemoryProbe, pid: int) -> MemoryTotals:
    found = [t for t in memory_totals(probe) if t.pid == pid]
    assert len(found) == 1, f"no totals for pid {pid}"
    return found[0]


def rss_anon(pid: int) -> int:
    """The kernel's own count of the process's resident anonymous memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon line")


@pytest.mark.parametrize("targeted", [True, False], ids=["targeted", "system-wide"])
@pytest.mark.anyio
async def test_faults_rss_mappings_and_heap_growth_are_exact(touch_pages: Path,
                                                            targeted: bool) -> None:
    pages, heap_growth = 1000, 3 * 1024 * 1024
    with steps([str(touch_pages), "anon", str(pages), str(heap_growth)]) as run:
        anon_before = rss_anon(run.pid)
        async with tracing([run.pid] if targeted else None) as probe:
            assert run.next() == "touched"
            touched = totals_of(probe, run.pid)
            assert (touched.minor_faults, touched.major_faults) == run.between("ready", "touched")
            assert touched.minor_faults >= pages
            assert touched.rss_anon == rss_anon(run.pid)
            assert pages * PAGE <= touched.rss_anon - anon_before <= (pages + 4) * PAGE
            assert (touched.mmap_calls, touched.mmap_bytes) == (1, pages * PAGE)

            assert run.next() == "done"
            done = totals_of(probe, run.pid)
            assert (done.minor_faults, done.major_faults) == run.between("ready", "done")
            assert (done.munmap_calls, done.munmap_bytes) == (1, pages * PAGE)
            assert (done.mmap_calls, done.mmap_bytes) == (1, pages * PAGE)
            assert done.brk_growth == heap_growth
            assert done.rss_anon == rss_anon(run.pid)
            assert done.comm == "touch_pages"
            if targeted:
                assert {t.pid for t in memory_totals(probe)} == {run.pid}

            probe.forget({run.pid})
            assert all(t.pid != run.pid for t in memory_totals(probe))


@pytest.mark.anyio
async def test_major_faults_match_getrusage(touch_pages: Path, tmp_path: Path) -> None:
    pages = 64
    with steps([str(touch_pages), "file", str(pages), str(tmp_path / "data")]) as run:
        assert run.next() == "dropped"  # written, synced and dropped from the page cache
        async with tracing([run.pid]) as probe:
            assert run.next() == "done"
            totals = totals_of(probe, run.pid)
    minor, major = run.between("dropped", "done")
    assert major > 0
    assert (totals.minor_faults, totals.major_faults) == (minor, major)
    assert (totals.mmap_calls, totals.mmap_bytes) == (1, pages * PAGE)


@pytest.mark.anyio
async def test_children_of_targets_are_followed(touch_pages: Path) -> None:
    pages = 500
    parent = subprocess.Popen(["sh", "-c", f"read go; {touch_pages} time {pages}; true"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        probe = MemoryProbe(CONFIG, Stats(), targets=[parent.pid], follow_children=True)
        await probe.open()
        probe.start()
        try:
            parent.communicate("\n", timeout=30)
            totals = memory_totals(probe)
        finally:
            probe.close()
    finally:
        parent.kill()
        parent.wait()
    child = [t for t in totals if t.comm == "touch_pages"]
    assert len(child) == 1 and child[0].pid != parent.pid
    assert child[0].minor_faults >= pages
    assert child[0].mmap_bytes >= pages * PAGE


def rss_names_from(member_lines: str) -> list[str]:
    return rss_members(f"print fmt: __print_symbolic(REC->member, {member_lines})")


def test_rss_members_are_read_from_the_format() -> None:
    assert rss_names_from('{ 0, "MM_FILEPAGES" }, { 1, "MM_ANONPAGES" }, '
                          '{ 2, "MM_SWAPENTS" }, { 3, "MM_SHMEMPAGES" }') == [
        "file", "anon", "swap", "shmem"]
    with pytest.raises(Exception, match="rss_stat's format"):
        rss_names_from('{ 0, "MM_FILEPAGES" }')


# -- OOM kills ------------------------------------------------------------------

def memory_cgroup_root() -> tuple[Path, str] | None:
    """A memory cgroup hierarchy to create a test group in, and its limit file."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    for _, where, kind, options, *_ in mounts:
        root = Path(where)
        if kind == "cgroup2" and "memory" in (root / "cgroup.subtree_control").read_text().split():
            return root, "memory.max"
        if kind == "cgroup" and "memory" in options.split(","):
            return root, "memory.limit_in_bytes"
    return None


@contextlib.contextmanager
def memory_limited_group(limit: int) -> Iterator[Path]:
    found = memory_cgroup_root()
    if found is None:
        pytest.skip("no memory cgroup controller (cgroup v2 with memory enabled, or v1 memory)")
    root, limit_file = found
    group = root / f"ebpf-stream-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / limit_file).write_text(str(limit))
        yield group
    finally:
        group.rmdir()  # its processes have been waited for: it is empty


@pytest.mark.anyio
async def test_oom_kill_is_a_record(touch_pages: Path) -> None:
    memory = MemoryExporter()
    with memory_limited_group(32 * 1024 * 1024) as group, steps([str(touch_pages), "hog"]) as run:
        (group / "cgroup.procs").write_text(str(run.pid))
        config = (CONFIG.with_pids([run.pid]).with_memory_tracing(True)
                  .with_cpu_profiling(False))
        async with Profiler(config, [memory]):
            assert run.proc.stdin is not None
            run.proc.stdin.write("\n")
            with anyio.fail_after(30):
                status = await anyio.to_thread.run_sync(run.proc.wait)
        assert status == -9  # killed by the OOM killer
    kills = [r for r in memory.records if isinstance(r, OomKill)]
    assert len(kills) == 1
    kill = kills[0]
    assert (kill.pid, kill.comm) == (run.pid, "touch_pages")
    assert 16 * 1024 * 1024 <= kill.anon_rss <= 40 * 1024 * 1024
    assert kill.total_vm >= kill.anon_rss
    hog = [t for t in memory.totals if isinstance(t, MemoryTotals) and t.pid == run.pid]
    assert hog and hog[0].minor_faults >= 16 * 1024 * 1024 // PAGE
