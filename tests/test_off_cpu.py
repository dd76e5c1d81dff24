"""Off-CPU profiles: where threads wait, against the workloads' own timing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import anyio
import pytest
from _support import WORKLOADS, bpf_fds, build

from ebpf_stream import EbpfConfig, Profiler
from ebpf_stream._model.batch import Stall
from ebpf_stream._model.profile import FrameKind, Profile, StackSamples
from ebpf_stream._outputs.memory import MemoryExporter

WAITS = ("in_nanosleep", "in_futex", "in_pipe_read", "in_socket_read")
PYTHON_WAITS = ("in_sleep", "in_lock", "in_pipe_read", "in_socket_read", "in_worker")


@pytest.fixture(scope="session")
def waits(workload_dir: Path) -> Path:
    return build("waits", workload_dir)


def config_for(pid: int) -> EbpfConfig:
    return (EbpfConfig.for_environment("development").with_pids([pid])
            .with_export_interval(0.5).with_sample_rate(99).with_off_cpu())


async def record(argv: list[str], seconds: float, memory: MemoryExporter | None = None,
                 configure: Callable[[EbpfConfig], EbpfConfig] = lambda c: c,
                 ) -> tuple[Profile, dict[str, float]]:
    """Profile the workload ``argv`` (run for ``seconds`` once the profiler has
    started), and its own timing by function."""
    proc = subprocess.Popen([*argv, str(seconds)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    memory = memory or MemoryExporter()
    try:
        async with Profiler(configure(config_for(proc.pid)), [memory]):
            out, _ = await anyio.to_thread.run_sync(proc.communicate, "go\n")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    timing = {name: float(ns) for name, ns in (line.split() for line in out.splitlines())}
    profile = memory.profile
    assert profile is not None
    return profile, timing


def shares(stacks: Iterable[StackSamples], names: Iterable[str]) -> dict[str, float]:
    """Each name's share of the waiting time of the stacks that pass through one of them."""
    weights = dict.fromkeys(names, 0)
    for s in stacks:
        found = [f.name for f in s.frames if f.name in weights]
        if found:
            weights[found[-1]] += s.off_cpu_ns
    total = sum(weights.values())
    assert total, "no wait passed through the workload's functions"
    return {name: w / total for name, w in weights.items()}


@pytest.mark.anyio
async def test_waits_in_c_match_the_workloads_own_timing(waits: Path) -> None:
    profile, timing = await record([str(waits)], 4)
    expected = {name: t / sum(timing.values()) for name, t in timing.items()}
    got = shares(profile.off_cpu.values(), WAITS)
    for name in WAITS:
        assert abs(got[name] - expected[name]) <= 0.03, (name, got, expected)
    # Each wait carries the kernel frames it slept in, under its user frames.
    for s in profile.off_cpu.values():
        names = [f.name for f in s.frames]
        if "in_nanosleep" in names:
            kernel = [f.name for f in s.frames if f.kind is FrameKind.KERNEL]
            assert kernel[-1] in ("hrtimer_nanosleep", "do_nanosleep"), names
    # Waits are not CPU samples: the process was on the CPU a few percent of the time.
    assert sum(s.count for s in profile) < 0.1 * 4 * 99
    assert bpf_fds() == []


@pytest.mark.anyio
async def test_off_cpu_time_adds_up_to_the_time_waited(waits: Path) -> None:
    # The main thread waits nearly all the time: its waits, sampled and
    # measured, add up to the run's length.
    profile, timing = await record([str(waits)], 3)
    main = sum(s.off_cpu_ns for s in profile.off_cpu.values()
               if any(f.name in WAITS for f in s.frames))
    assert main == pytest.approx(sum(timing.values()), rel=0.05)



@pytest.mark.anyio
async def test_waits_in_python_threads_and_to_thread_workers() -> None:
    """Blocking calls inside a coroutine, and a to_thread worker's, by Python function;
    the loop's own wait in epoll is idle and left out; the stall report agrees."""
    memory = MemoryExporter()
    argv = [sys.executable, str(WORKLOADS / "python" / "waits.py")]
    profile, timing = await record(argv, 4, memory, lambda c: c.with_stall_threshold(10))
    expected = {name: timing[name] / sum(timing.values()) for name in PYTHON_WAITS}
    got = shares(profile.off_cpu.values(), PYTHON_WAITS)
    for name in PYTHON_WAITS:
        assert abs(got[name] - expected[name]) <= 0.03, (name, got, expected)
    assert not [s for s in profile.off_cpu.values()
                if any("epoll_wait" in f.name for f in s.frames)], "an idle loop's wait"
    # Every stall's sleeps are the loop thread's waits in the same functions.
    slept = dict.fromkeys(PYTHON_WAITS[:4], 0)
    for stall in (r for r in memory.records if isinstance(r, Stall)):
        for stack in stall.stacks:
            found = [f.name for f in stack.frames if f.name in slept]
            if found:
                slept[found[-1]] += stack.slept_ns
    waited = {name: sum(s.off_cpu_ns for s in profile.off_cpu.values()
                        if name in [f.name for f in s.frames]) for name in slept}
    for name in slept:
        assert slept[name] == pytest.approx(waited[name], rel=0.1), (name, slept, waited)

