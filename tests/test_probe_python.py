"""Python frames walked from BPF, on real interpreters, through the whole pipeline.

Every interpreter on the machine runs the same workloads; the profile must
name their functions with the right file and lines, splice them into the
native stacks, and reach processes given by pid, commands launched through a
version manager's shim, and the profiler's own process.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from _support import bpf_fds, loaded_programs, program_ids, start_ready
from test_profiler import config_for
from test_python_accuracy import ECLI, PYTHON_FRAME, SHARES, read_stacks, shares
from test_python_runtime import INTERPRETERS, PYENV, available

from ebpf_stream import EbpfConfig, Frame, FrameKind, Profile, Profiler, StackSamples
from ebpf_stream._probes import python_walker as python_probe
from ebpf_stream._probes.python_walker import PythonProcesses, self_test
from ebpf_stream.exporters import MemoryExporter

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]

STALLS = SHARES.with_name("stalls.py")
SHIM = Path("/root/.pyenv/shims/python3")


@cache
def function_lines(path: Path) -> dict[str, range]:
    """The lines of each function of a source file, by qualname."""
    found: dict[str, range] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qualname = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    assert child.end_lineno is not None
                    found[qualname] = range(child.lineno, child.end_lineno + 1)
                    visit(child, qualname + ".<locals>.")
                else:
                    visit(child, qualname + ".")

    visit(ast.parse(path.read_text()), "")
    return found


def python_names(frames: tuple[Frame, ...]) -> list[str]:
    return [f.name for f in frames if f.kind is FrameKind.PYTHON]


def containing(profile: Profile, pid: int, name: str) -> list[StackSamples]:
    return [s for s in profile if s.pid == pid and name in python_names(s.frames)]


def check_named(stacks: list[StackSamples], name: str, path: Path) -> None:
    """Every frame of ``name`` in ``stacks`` names ``path`` and a line of the function."""
    lines = function_lines(path)[name]
    for s in stacks:
        for frame in s.frames:
            if frame.name == name:
                assert frame.module == str(path), frame
                assert frame.line in lines, f"{frame} outside lines {lines}"


def unnamed_share(profile: Profile, pid: int) -> float:
    """The share of ``pid``'s samples with a frame standing for one that could
    not be named: ``[unknown]+0x...``, ``[unknown python]``, ``[python stack lost]``..."""
    samples = [s for s in profile if s.pid == pid]
    unnamed = sum(s.count for s in samples if any(f.name.startswith("[") for f in s.frames))
    return unnamed / sum(s.count for s in samples)


def check_one_tower(profile: Profile, pid: int) -> None:
    """Every sample of ``pid``, a program running Python code on its main
    thread alone, starts at its ``<module>`` frame: a flame graph of it is
    one tower, whatever the native unwinder read past the interpreter."""
    roots = {s.frames[0] if s.frames else None for s in profile if s.pid == pid}
    assert len(roots) == 1, roots
    root = roots.pop()
    assert root and (root.name, root.module) == ("<module>", str(SHARES)), root


@pytest.fixture
def self_tests(monkeypatch: pytest.MonkeyPatch,
               caplog: pytest.LogCaptureFixture) -> Iterator[list[str | None]]:
    """What each self-test of the offsets on this process found (None: passed);
    checks afterwards that no failure was logged.  Every start tests: a pass
    kept from an earlier start is not looked at."""
    found: list[str | None] = []

    def recorded(*args: Any, **kwargs: Any) -> str | None:
        found.append(self_test(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(python_probe, "self_test", recorded)
    monkeypatch.setattr(python_probe, "_proof", lambda *args: None)
    caplog.set_level(logging.WARNING, logger="ebpf_stream")
    yield found
    assert not [r for r in caplog.records if "self-test" in r.getMessage()]


@pytest.fixture(params=list(INTERPRETERS))
def interpreter(request: pytest.FixtureRequest) -> str:
    return available(request.param)


@pytest.fixture
def shares_running(interpreter: str) -> Iterator[subprocess.Popen[str]]:
    proc = start_ready([interpreter, str(SHARES), "60"])
    yield proc
    proc.kill()
    proc.wait()


async def profile_while(config: EbpfConfig, work: Callable[[], Awaitable[object]]) -> Profile:
    """Profile while ``work`` runs; checks that nothing stays loaded afterwards."""
    memory = MemoryExporter()
    async with Profiler(config, [memory]):
        ours = program_ids()
        await work()
    assert ours and not ours & loaded_programs()
    assert bpf_fds() == []
    assert memory.profile is not None
    return memory.profile


@pytest.mark.anyio
async def test_functions_are_spliced_into_native_stacks(
        shares_running: subprocess.Popen[str], self_tests: list[str | None]) -> None:
    pid = shares_running.pid
    profile = await profile_while(config_for(pid), lambda: anyio.sleep(2))
    assert self_tests == [None]
    spliced = 0
    for name in ("alpha", "beta", "gamma", "delta"):
        stacks = containing(profile, pid, name)
        assert stacks, f"{name} was never sampled"
        check_named(stacks, name, SHARES)
        for s in stacks:
            kinds = [f.kind for f in s.frames]
            first = kinds.index(FrameKind.PYTHON)
            last = len(kinds) - 1 - kinds[::-1].index(FrameKind.PYTHON)
            # Root first: the Python frames in one piece, then the native
            # frames the leaf function called, kernel frames last.
            assert set(kinds[first:last + 1]) == {FrameKind.PYTHON}, s.frames
            assert FrameKind.PYTHON not in kinds[last + 1:], s.frames
            names = python_names(s.frames)
            assert names[-1] in {name, "gamma"} and names[:2] == ["<module>", "run"], names
            spliced += s.count if last + 1 < len(kinds) else 0
    assert spliced > 0.3 * profile.sample_count, "native frames under the Python leaf"
    check_one_tower(profile, pid)
    assert unnamed_share(profile, pid) < 0.01


@pytest.mark.anyio
async def test_python_mode_keeps_python_frames_alone(
        shares_running: subprocess.Popen[str], self_tests: list[str | None]) -> None:
    pid = shares_running.pid
    config = config_for(pid).with_python_frames("python")
    profile = await profile_while(config, lambda: anyio.sleep(1.5))
    assert self_tests == [None]
    stacks = containing(profile, pid, "alpha")
    assert sum(s.count for s in stacks) > 0.25 * profile.sample_count
    check_named(stacks, "alpha", SHARES)
    python_alone = sum(s.count for s in profile if {f.kind for f in s.frames} == {FrameKind.PYTHON}
                       and python_names(s.frames)[:2] == ["<module>", "run"])
    assert python_alone > 0.98 * profile.sample_count
    check_one_tower(profile, pid)
    assert unnamed_share(profile, pid) < 0.01


@pytest.mark.skipif(not (SHIM.exists() and (PYENV / "3.12.1").exists()),
                    reason="needs pyenv with CPython 3.12.1")
def test_command_launched_through_a_shim(tmp_path: Path) -> None:
    """``record -- SHIM script.py``: the shim (bash) execs pyenv, which execs
    the interpreter; its frames are found after the last exec."""
    folded = tmp_path / "out.folded"
    result = subprocess.run(
        [str(ECLI), "record", "--rate", "99", "-o", str(folded), "--", str(SHIM), str(SHARES),
         "3"],
        env=os.environ | {"PYENV_VERSION": "3.12.1"}, capture_output=True, text=True,
        timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    truth = json.loads(result.stdout.splitlines()[-1])
    leaf, _ = shares(read_stacks(folded, has_process=True))
    expected = truth["alpha"] / (truth["alpha"] + truth["beta"] + truth["delta"])
    assert abs(leaf["alpha"] - expected) < 0.1, (leaf, truth)
    alpha_lines = function_lines(SHARES)["alpha"]
    labels = {label for line in folded.read_text().splitlines()
              for label in line.rpartition(" ")[0].split(";")}
    found = [PYTHON_FRAME.match(label) for label in labels if label.startswith("alpha (")]
    assert found and all(m and m["file"] == SHARES.name and int(m["line"]) in alpha_lines
                         for m in found), found


def test_processes_without_an_interpreter_are_looked_at_again_on_schedule() -> None:
    """Each look falls due by the clock, whether or not samples arrive, so that
    the CPU probe can take it in time (its reader may sleep for a second)."""
    sleeper = subprocess.Popen(["sleep", "30"])  # never has an interpreter
    try:
        processes = PythonProcesses(None, None, {}, lambda: None)  # type: ignore[arg-type]
        started = time.monotonic()
        assert processes.look(sleeper.pid) is None
        dues = []
        while (due := processes.next_look()) is not None:
            dues.append(round(due - started, 2))
            time.sleep(max(0.0, due - time.monotonic()))
            processes.look_waiting()
        assert dues == [0.01, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]

        processes.exec_seen(sleeper.pid)  # a new program: looked at afresh, on schedule
        due = processes.next_look()
        assert due is not None and due - time.monotonic() > 0.005
    finally:
        sleeper.kill()
        sleeper.wait()


class HostWork:
    """Busy Python code in the profiler's own process."""

    def __init__(self) -> None:
        # A plain flag, not an Event: Event.is_set is Python code, and a
        # sample landing in it would be a leaf other than spin.
        self.stopped = False
        self.cpu_s = 0.0  # the thread's CPU time, once stopped

    def spin(self) -> int:
        total = 0
        while not self.stopped:
            for i in range(10_000):
                total += i * i
            # Let the event loop run: each GIL handover it asks for could
            # otherwise wait a whole switch interval (5 ms).
            time.sleep(0)
        self.cpu_s = time.thread_time()
        return total


@pytest.mark.anyio
async def test_host_process_frames(self_tests: list[str | None]) -> None:
    """``Profiler`` with no pid profiles every process, its own included."""
    config = (EbpfConfig.for_environment("development").with_sample_rate(99)
              .with_export_interval(0.5))
    work = HostWork()

    async def spin_a_while() -> None:
        worker = threading.Thread(target=work.spin)
        worker.start()
        await anyio.sleep(1.5)
        work.stopped = True
        await anyio.to_thread.run_sync(worker.join)

    profile = await profile_while(config, spin_a_while)
    assert self_tests == [None]
    stacks = containing(profile, os.getpid(), "HostWork.spin")
    assert sum(s.count for s in stacks) > 0.8 * work.cpu_s * 99 > 50
    check_named(stacks, "HostWork.spin", Path(__file__))
    for s in stacks:
        names = python_names(s.frames)
        assert names[-1] == "HostWork.spin" and "Thread.run" in names, names


async def run_stalls(interpreter: str, *options: str,
                     **changes: object) -> tuple[MemoryExporter, dict[str, Any]]:
    """Run stalls.py with ``options``, profiled (``config_for`` with ``changes``)
    from before its loop starts to after it has ended.

    Returns what was exported and what the workload says it did, with its pid.
    """
    proc = subprocess.Popen([interpreter, str(STALLS), "--go", *options],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    memory = MemoryExporter()
    try:
        assert proc.stdout.readline().strip() == "ready"
        async with Profiler(config_for(proc.pid, **changes), [memory]):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            told = await anyio.to_thread.run_sync(proc.stdout.readline)
    finally:
        proc.kill()
        proc.wait()
    return memory, json.loads(told) | {"pid": proc.pid}


@pytest.mark.anyio
async def test_coroutines_appear_under_their_task(interpreter: str) -> None:
    memory, told = await run_stalls(interpreter, "--mode", "cpu", "--blocks", "2")
    assert memory.profile is not None
    stacks = containing(memory.profile, told["pid"], "culprit")
    assert sum(s.count for s in stacks) > 20
    check_named(stacks, "culprit", STALLS)
    for s in stacks:
        names = python_names(s.frames)
        # The task's coroutine chain, outermost first, under the loop's handle.
        run = names.index("Handle._run")
        assert names[run + 1:run + 4] == ["main", "app", "culprit"], names


@pytest.mark.anyio
async def test_a_pass_of_the_self_test_is_kept_and_only_trusted_when_safe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBPF_STREAM_CACHE", str(tmp_path / "cache"))
    found: list[str | None] = []

    def recorded(*args: Any, **kwargs: Any) -> str | None:
        found.append(self_test(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(python_probe, "self_test", recorded)
    config = EbpfConfig.for_environment("development").with_export_interval(0.5)

    async def start() -> None:
        async with Profiler(config, [MemoryExporter()]):
            pass

    await start()
    assert found == [None], "the first start tests"
    (proof,) = (tmp_path / "cache" / "self-tests").iterdir()
    await start()
    assert found == [None], "the same program on the same interpreter: not again"
    proof.chmod(0o666)
    await start()
    assert found == [None, None], "a proof others may write is no proof"
    await start()
    assert found == [None, None], "the new pass is kept as a proof this user alone writes"
