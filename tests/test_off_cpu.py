"""Off-CPU profiles: where threads wait, against the workloads' own timing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import anyio
import pytest
from _support import WORKLOADS, bpf_fds, build, start_ready
from test_new_pythons import check_shares

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



def perf_chains(script: str, tid: int) -> list[tuple[list[str], list[tuple[str, int]]]]:
    """``perf script``'s callchains of ``tid``'s switches out, each leaf first: the
    kernel's function names, and the user frames as (file name, address in it)."""
    chains: list[tuple[list[str], list[tuple[str, int]]]] = []
    for event in script.split("\n\n"):
        lines = event.strip().splitlines()
        if not lines or f"prev_pid={tid} " not in lines[0]:
            continue
        kernel: list[str] = []
        user: list[tuple[str, int]] = []
        for line in lines[1:]:
            ip, name, dso = line.split(maxsplit=2)
            if "kernel.kallsyms" in dso:
                kernel.append(name.partition("+")[0])
            else:
                user.append((os.path.basename(dso.strip("()")), int(ip, 16)))
        chains.append((kernel, user))
    return chains


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("perf") is None, reason="needs perf (Debian's linux-perf)")
async def test_native_stacks_agree_with_perfs_view_of_the_same_run(
        waits: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([str(waits), "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    data = tmp_path / "perf.data"
    perf = subprocess.Popen(["perf", "record", "-q", "-e", "sched:sched_switch", "-g",
                             "-p", str(proc.pid), "-o", str(data)],
                            stderr=subprocess.DEVNULL)
    memory = MemoryExporter()
    try:
        # Without stall detection: its sched_switch program is a perf tracepoint
        # program, whose return of 0 keeps the switches from perf's events too.
        async with Profiler(config_for(proc.pid).with_stall_threshold(0), [memory]):
            await anyio.sleep(0.5)  # perf's events are open by now
            await anyio.to_thread.run_sync(proc.communicate, "go\n")
    finally:
        proc.kill()
        proc.wait()
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=30)
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "event,trace,ip,sym,dso"],
                            capture_output=True, text=True, check=True).stdout
    theirs = perf_chains(script, proc.pid)
    assert memory.profile is not None
    for name in WAITS:
        # The stack that waited longest in each function, in our profile and in
        # perf's count of switches (each wait is one switch, and waits through
        # one function take one path).
        # Frames are compared by address: the two name some functions by other
        # aliases (__lll_lock_wait, __GI___lll_lock_wait).
        ours = max((s for s in memory.profile.off_cpu.values()
                    if name in [f.name for f in s.frames]), key=lambda s: s.off_cpu_ns)
        our_user = [(os.path.basename(f.module), f.address) for f in ours.frames
                    if f.kind is FrameKind.NATIVE][::-1]
        our_kernel = [f.name for f in ours.frames if f.kind is FrameKind.KERNEL][::-1]
        function = next(f for f in ours.frames if f.name == name)
        mine = (os.path.basename(function.module), function.address)
        paths = Counter((tuple(k), tuple(u)) for k, u in theirs if mine in u)
        assert paths, (name, mine, theirs[:3])
        (kernel, user), _ = paths.most_common(1)[0]
        assert our_user == list(user), (name, our_user, user)
        # Ours start where the thread slept; perf's, in the scheduler that put it to sleep.
        assert list(kernel[-len(our_kernel):]) == our_kernel, (name, our_kernel, kernel)


@pytest.mark.anyio
async def test_cpu_samples_are_as_without_waits() -> None:
    """A CPU-bound Python process: its CPU shares as ever, and preemption is not waiting."""
    proc = start_ready([sys.executable, str(WORKLOADS / "python" / "shares.py"), "60"])
    memory = MemoryExporter()
    try:
        config = EbpfConfig(sample_rate_hz=499, pids=(proc.pid,)).with_off_cpu()
        async with Profiler(config, [memory]):
            await anyio.sleep(4)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert memory.profile is not None
    check_shares(memory.profile, proc.pid, json.loads(out.strip().splitlines()[-1]))
    waited = sum(s.off_cpu_ns for s in memory.profile.off_cpu.values() if s.pid == proc.pid)
    assert waited < 0.1e9, waited


def test_record_writes_each_kind_of_time(waits: Path, tmp_path: Path) -> None:
    """``record --off-cpu``: the folded files of each kind, and pprof with both; in the
    wall-clock view each thread's time is about the time it lived."""
    files = {kind: tmp_path / f"{kind}.folded" for kind in ("on-cpu", "off-cpu", "wall")}
    for kind, path in files.items():
        result = subprocess.run(
            [sys.executable, "-m", "ebpf_stream._cli", "record", "--off-cpu", "--profile", kind,
             "-o", str(path), "--", "sh", "-c", f"echo go | {waits} 2"],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    off = folded(files["off-cpu"])
    assert {name for stack in off for name in stack.split(";")} >= set(WAITS)
    # On the CPU the process is seldom there: at 19 Hz, a few samples at most.
    on_cpu = sum(n for stack, n in folded(files["on-cpu"]).items()
                 if any(name in stack for name in WAITS))
    assert on_cpu <= 5, folded(files["on-cpu"])
    by_thread = Counter[str]()
    for stack, microseconds in folded(files["wall"]).items():
        process, thread, *_ = stack.split(";")
        if process == "waits":
            by_thread[thread] += microseconds
    main = max(by_thread.values())
    assert 1.8e6 <= main <= 2.2e6, by_thread  # the main thread's 2 s, running or waiting


def folded(path: Path) -> dict[str, int]:
    return {stack: int(n) for stack, _, n in
            (line.rpartition(" ") for line in path.read_text().splitlines())}


@pytest.mark.anyio
async def test_an_idle_loop_is_counted_only_when_asked() -> None:
    argv = [sys.executable, str(WORKLOADS / "python" / "waits.py")]
    profile, _ = await record(argv, 2, configure=lambda c: c.with_off_cpu(idle_loops=True))
    idle = [s for s in profile.off_cpu.values() if "BaseEventLoop._run_once" in
            [f.name for f in s.frames] and any("epoll" in f.name for f in s.frames)]
    assert idle, "the loop's waits in epoll, with their Python frames"
