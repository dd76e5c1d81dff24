"""Free-threaded CPython, as ``./run test`` builds it from Debian's source (real BPF).

``./run test`` builds a free-threaded interpreter once per machine
(``--disable-gil``, under ``/var/cache/ebpf-stream``): forky's 3.14 where
the mirror serves its source, else trixie's 3.13.  A build whose frames are
read (3.13's) is checked against its own truth: function shares against
the CPU time the workload measured around each function, in one thread
and in two running at the same moment without a GIL, with the lines each
sample names, and the asyncio stalls it causes.  A build whose frames are
not read, real or as a real 3.13t process made to say 3.14, is refused in
one line, by its file name and by its table's ``free_threaded`` word, and
profiled with its native frames.

Without the build these tests fail; ``EBPF_STREAM_SKIP_FREE_THREADED=1``
skips them instead.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from _support import start_ready
from test_debug_offsets import CHILD, Child
from test_new_pythons import check_shares, check_stalls, leaf_shares, profile

from ebpf_stream import EbpfConfig, FrameKind, Profile
from ebpf_stream._python.debug_offsets import FREE_THREADED_VERSIONS
from ebpf_stream._python.runtime import UnsupportedPython, find_python

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]

BUILD = Path(os.environ.get("EBPF_STREAM_FREE_THREADED_PYTHON",
                            "/var/cache/ebpf-stream/python-free-threaded"))
WORKLOADS = Path(__file__).parent / "workloads" / "python"
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def built() -> tuple[Path, tuple[int, int]]:
    """The free-threaded interpreter ``./run test`` built, and its version."""
    found = sorted(BUILD.glob("bin/python3.*t"))
    if not found:
        reason = (f"no free-threaded CPython in {BUILD}/bin: ./run test builds it "
                  "(EBPF_STREAM_SKIP_FREE_THREADED=1 skips these tests)")
        if os.environ.get("EBPF_STREAM_SKIP_FREE_THREADED") == "1":
            pytest.skip(reason)
        pytest.fail(reason)
    executable = found[-1]
    version = tuple(map(int, executable.name.removeprefix("python").removesuffix("t")
                        .split(".")))
    return executable, (version[0], version[1])


@pytest.fixture
def python(built: tuple[Path, tuple[int, int]]) -> Path:
    """The build, where its frames are read."""
    executable, version = built
    if version not in FREE_THREADED_VERSIONS:
        pytest.skip(f"{executable} is a build whose frames are not read: "
                    "the tests of its refusal check it")
    return executable


def ran(workload: subprocess.Popen[str]) -> dict[str, Any]:
    """Stop ``workload`` and return its JSON line."""
    workload.send_signal(signal.SIGINT)
    out, _ = workload.communicate(timeout=30)
    truth: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return truth


def loop_lines(workload: str) -> dict[str, range]:
    """Each function's lines in ``workload``, its def line excluded: where its samples are."""
    tree = ast.parse((WORKLOADS / workload).read_text())
    return {node.name: range(node.lineno + 1, (node.end_lineno or node.lineno) + 1)
            for node in tree.body if isinstance(node, ast.FunctionDef)}


def leaf_lines(result: Profile, pid: int) -> dict[str, Counter[int]]:
    lines: dict[str, Counter[int]] = {}
    for s in result:
        python = [f for f in s.frames if f.kind is FrameKind.PYTHON]
        if s.pid == pid and python:
            lines.setdefault(python[-1].name, Counter())[python[-1].line] += s.count
    return lines


@pytest.mark.parametrize("frames", ["merged", "python"])
def test_function_shares_match_the_workloads_own_timing(python: Path, frames: str) -> None:
    workload = start_ready([str(python), str(WORKLOADS / "shares.py"), "60"])
    try:
        config = EbpfConfig(sample_rate_hz=499, pids=(workload.pid,)).with_python_frames(
            frames)  # type: ignore[arg-type]
        result = anyio.run(profile, config, 4.0)
    finally:
        truth = ran(workload)
    names = {f.name for s in result for f in s.frames if f.kind is FrameKind.PYTHON}
    assert {"<module>", "run", "alpha", "beta", "gamma", "delta"} <= names, names
    check_shares(result, workload.pid, truth)
    lines = loop_lines("shares.py")
    for name, seen in leaf_lines(result, workload.pid).items():
        if name in lines:
            assert set(seen) <= set(lines[name]), (name, seen)
    if frames == "python":
        assert all({f.kind for f in s.frames} == {FrameKind.PYTHON} for s in result
                   if s.pid == workload.pid and s.count), "native frames in python mode"


def test_threads_running_at_once_have_their_shares_and_lines(python: Path) -> None:
    workload = start_ready([str(python), str(WORKLOADS / "threads.py"), "60"])
    try:
        result = anyio.run(profile, EbpfConfig(sample_rate_hz=499, pids=(workload.pid,)), 4.0)
    finally:
        truth = ran(workload)
    assert truth["gil"] is False, "the GIL came back: the threads took turns"
    clock: dict[str, int] = truth["clock"]
    total = sum(clock.values())
    shares = leaf_shares(result, workload.pid)
    for name, spent in clock.items():
        assert abs(shares.get(name, 0) - spent / total) <= TOLERANCE, (name, shares, clock)
    # Each thread's stack, from its own entry: no frame of one in the other's.
    stacks = {tuple(f.name for f in s.frames if f.kind is FrameKind.PYTHON)[-3:]
              for s in result if s.pid == workload.pid and s.count}
    for leaf, other in (("port", "starboard"), ("étrave", "stern"), ("starboard", "port"),
                        ("stern", "étrave")):
        assert any(stack[-1:] == (leaf,) for stack in stacks), (leaf, stacks)
        assert not any(leaf in stack and other in stack for stack in stacks), stacks
    assert ("worker", "port") in {stack[-2:] for stack in stacks}, stacks
    lines = loop_lines("threads.py")
    for name, seen in leaf_lines(result, workload.pid).items():
        if name in clock:
            assert set(seen) <= set(lines[name]), (name, seen)


def test_coroutine_stacks_and_stalls(python: Path) -> None:
    check_stalls([str(python), str(WORKLOADS / "stalls.py")])


# -- builds whose frames are not read: one line, and their native frames ------

LATER = 0x030E00F0  # 3.14.0


def not_read(built: tuple[Path, tuple[int, int]], name: str, tmp_path: Path) -> Child:
    """A real free-threaded process whose frames are not read, spinning in
    :data:`CHILD`'s ``leaf``: the build itself if it is one, else the 3.13t build
    made to say 3.14 (in its ``Py_Version`` and its table).  It runs its own
    interpreter file under ``name`` (a copy) in ``tmp_path``."""
    executable, version = built
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    shutil.copy(executable, tmp_path / name)
    child = Child([str(tmp_path / name), str(script)], "spin")
    if version in FREE_THREADED_VERSIONS:
        child.claim_version(LATER)
    return child


def said(version: tuple[int, int]) -> str:
    return "3.14" if version in FREE_THREADED_VERSIONS else f"{version[0]}.{version[1]}"


def test_a_build_not_read_is_refused_in_one_line_by_its_table(
        built: tuple[Path, tuple[int, int]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ebpf_stream")
    version = said(built[1])
    child = not_read(built, f"python{version}", tmp_path)  # no "t": only the table tells
    try:
        result = anyio.run(profile, EbpfConfig(sample_rate_hz=199, pids=(child.pid,)), 2.0)
    finally:
        child.stop()
    mine = [r.getMessage() for r in caplog.records if f"process {child.pid} " in r.getMessage()]
    assert mine == [
        f"Python frames off for some processes: process {child.pid} runs "
        f"{tmp_path}/python{version}, a free-threaded CPython build of {version}, whose Python "
        "frames are not read (a thread may run its own copy of the bytecode; free-threaded "
        f"builds read: 3.13); profile it under a default (GIL) build of {version} for them"]
    samples = [s for s in result if s.pid == child.pid and s.count]
    assert samples, "its native frames are profiled all the same"
    assert all(f.kind is not FrameKind.PYTHON for s in samples for f in s.frames)


def test_a_build_not_read_is_refused_by_its_file_name(
        built: tuple[Path, tuple[int, int]], tmp_path: Path) -> None:
    version = said(built[1])
    child = not_read(built, f"python{version}t", tmp_path)
    try:
        with pytest.raises(UnsupportedPython) as raised:
            find_python(child.pid)
    finally:
        child.stop()
    message = str(raised.value)
    assert message.startswith(f"process {child.pid} runs {tmp_path}/python{version}t, a "
                              f"free-threaded CPython build of {version}, whose Python "), message
    assert "\n" not in message
