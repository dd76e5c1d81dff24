"""The offsets CPython 3.13 and later publish about themselves (``_Py_DebugOffsets``).

Each interpreter on the machine (pyenv's 3.13, and Debian forky's 3.14 and
3.15 in the forky root) publishes offsets equal to our hand-kept rows, and
those published are the ones used.  A version newer than any known layout
is read with the newest one: a unit feeds such tables to the reader, and a
real 3.15 process whose version words are rewritten to say 3.16 is then
found, checked and profiled, or refused in one line when its table no
longer fits that layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_new_pythons import ROOT, profile
from test_python_runtime import PYENV

from ebpf_stream import EbpfConfig, FrameKind
from ebpf_stream._probes.python_walker import MAX_LAYOUTS, OffsetRows, PythonProcesses
from ebpf_stream._python import offsets as offsets_module
from ebpf_stream._python.debug_offsets import (
    LAYOUTS,
    DebugOffsetsError,
    FreeThreaded,
    format_version,
    read_offsets,
)
from ebpf_stream._python.memory import MemoryReadError, ProcessMemory
from ebpf_stream._python.offsets import OFFSETS
from ebpf_stream._python.runtime import (
    PythonRuntime,
    UnsupportedPython,
    check_runtime,
    find_python,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' memory")

# A program that says where its version words are, then waits (or spins in
# ``leaf`` with "spin").
CHILD = r'''
import ctypes, json, sys

def address(kind, name):
    return ctypes.addressof(kind.in_dll(ctypes.pythonapi, name))

def leaf():
    total = 0
    for i in range(100000):
        total += i
    return total

print(json.dumps({"py_version": address(ctypes.c_ulong, "Py_Version"),
                  "runtime": address(ctypes.c_char, "_PyRuntime"),
                  "hexversion": sys.hexversion}), flush=True)
if sys.argv[1:] == ["spin"]:
    while True:
        leaf()
sys.stdin.readline()
'''
INSIDE = "/tmp/ebpf-stream-tests/debug_offsets_child.py"  # where the forky root's copy lives
NEWER = 0x031000A1  # 3.16.0a1


class Child:
    """A running :data:`CHILD` and what it said about itself."""

    def __init__(self, argv: list[str], *args: str) -> None:
        self.proc = subprocess.Popen([*argv, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"{argv} died"
        self.pid = self.proc.pid
        self.info: dict[str, int] = json.loads(line)

    def write_u64(self, address: int, value: int) -> None:
        """Rewrite a word of the child's memory, read-only pages too, as a debugger does."""
        with open(f"/proc/{self.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(address)
            mem.write(struct.pack("<Q", value))

    def claim_version(self, hex_version: int) -> None:
        """Make the child say ``hex_version``: in its Py_Version and its table."""
        self.write_u64(self.info["py_version"], hex_version)
        self.write_u64(self.info["runtime"] + 8, hex_version)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def interpreter(version: str, tmp_path: Path) -> list[str]:
    """How to run :data:`CHILD` under CPython ``version`` (pyenv's 3.13, forky's others)."""
    if version == "3.13":
        executable = PYENV / "3.13.0" / "bin" / "python3.13"
        if not os.access(executable, os.X_OK):
            pytest.skip(f"{executable} is not installed")
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        return [str(executable), str(script)]
    if not (ROOT / "usr" / "bin" / f"python{version}").exists():
        pytest.skip(f"no forky root with python{version} at {ROOT} (./run test builds it)")
    script = ROOT / INSIDE.lstrip("/")
    script.parent.mkdir(exist_ok=True)
    script.write_text(CHILD)
    return ["chroot", str(ROOT), f"python{version}", INSIDE]


@pytest.fixture
def forky_315(tmp_path: Path) -> list[str]:
    return interpreter("3.15", tmp_path)


# -- every interpreter here: what it publishes is our row, and is what is used --


@needs_root
@pytest.mark.parametrize("version", ["3.13", "3.14", "3.15"])
def test_published_offsets_equal_the_rows(version: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    child = Child(interpreter(version, tmp_path))
    try:
        key = tuple(map(int, version.split(".")))
        with ProcessMemory(child.pid) as memory:
            published = read_offsets(memory, child.info["runtime"], child.info["hexversion"])
        assert published == OFFSETS[key]
        # The row is not what find_python used: a wrong one changes nothing.
        wrong = OFFSETS[key]._replace(interp_threads_head=8, tstate_native_thread_id=8)
        monkeypatch.setitem(offsets_module.OFFSETS, key, wrong)
        found = find_python(child.pid)
        assert found is not None and found.offsets == published
        assert check_runtime(found) is None
    finally:
        child.stop()


@needs_root
def test_older_interpreters_publish_no_table(tmp_path: Path) -> None:
    executable = PYENV / "3.12.1" / "bin" / "python3.12"
    if not os.access(executable, os.X_OK):
        pytest.skip(f"{executable} is not installed")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = Child([str(executable), str(script)])
    try:
        with ProcessMemory(child.pid) as memory, pytest.raises(DebugOffsetsError, match="cookie"):
            read_offsets(memory, child.info["runtime"], child.info["hexversion"])
        found = find_python(child.pid)
        assert found is not None and found.offsets == OFFSETS[3, 12]
    finally:
        child.stop()


# -- a newer interpreter, as a unit: tables fed through a fake memory ---------

# CPython 3.15.0's table as Debian's build publishes it, from its version word
# to the end of unicode_object (the sections read with the 3.15 layout).
TABLE_315 = [
    0x030F00F0, 0, 346568, 912, 936, 226240, 7272, 7264, 7336, 7352, 7400, 7592, 7576, 7584,
    16, 7736, 0, 7752, 7744, 7944, 0, 888, 0, 8, 16, 72, 80, 88, 96, 176, 184, 256, 32, 36,
    40, 136, 288, 0, 88, 8, 0, 56, 80, 74, 64, 0, 216, 112, 120, 128, 136, 68, 52, 96, 104,
    208, 0, 16, 8, 424, 24, 88, 168, 32, 288, 944, 888, 40, 32, 16, 40, 24, 16, 200, 24, 40,
    32, 48, 32, 40, 24, 16, 32, 16, 24, 40, 16, 32, 64, 32, 16, 40, 56]
RUNTIME = 0x7F0000001000
SLOTS = LAYOUTS[3, 15]


class FakeMemory:
    """One region of memory at :data:`RUNTIME`; reads elsewhere fail as unmapped ones do."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, address: int, size: int) -> bytes:
        start = address - RUNTIME
        if start < 0 or start + size > len(self.data):
            raise MemoryReadError(f"cannot read {size} bytes at 0x{address:x}")
        return self.data[start:start + size]


def image(version: int = NEWER, cookie: bytes = b"xdebugpy", free_threaded: int = 0,
          **changes: int) -> FakeMemory:
    """The 3.15 table saying ``version``, with ``section__field=value`` changes."""
    words = [version, free_threaded, *TABLE_315[2:]]
    for name, value in changes.items():
        words[(SLOTS[name.replace("__", ".")] - 8) // 8] = value
    return FakeMemory(cookie + struct.pack(f"<{len(words)}Q", *words))


def refusal(memory: FakeMemory, version: int = NEWER) -> str:
    with pytest.raises(DebugOffsetsError) as raised:
        read_offsets(memory, RUNTIME, version)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_the_table_fills_the_315_layout() -> None:
    assert len(TABLE_315) == (max(SLOTS.values()) - 8) // 8 + 1
    assert read_offsets(image(TABLE_315[0]), RUNTIME, TABLE_315[0]) == OFFSETS[3, 15]


def test_a_newer_version_laid_out_as_the_newest_known_is_read_with_it() -> None:
    assert read_offsets(image(), RUNTIME, NEWER) == OFFSETS[3, 15]


def test_struct_sizes_that_contradict_the_layout_are_refused_in_one_line() -> None:
    message = refusal(image(interpreter_frame__size=64))
    assert message == ("its _Py_DebugOffsets (version 3.16.0a1) does not match the 3.15 "
                       "layout: interpreter_frame.owner 74 lies beyond interpreter_frame.size 64")


def test_a_field_inserted_before_the_frame_section_is_refused() -> None:
    # A newer thread_state with one more field: every later section shifts by a word.
    words = [NEWER, *TABLE_315[1:]]
    at = (SLOTS["thread_state.exc_state"] - 8) // 8 + 1
    words.insert(at, 512)
    message = refusal(FakeMemory(b"xdebugpy" + struct.pack(f"<{len(words)}Q", *words)))
    assert message.startswith("its _Py_DebugOffsets (version 3.16.0a1) does not match the "
                              "3.15 layout: interpreter_frame.")
    assert "more" in message


def test_offsets_the_kernel_cannot_reach_are_refused() -> None:
    message = refusal(image(interpreter_frame__size=120, interpreter_frame__instr_ptr=96))
    assert message.endswith("interpreter_frame.instr_ptr 96 lies beyond the first 80 bytes, "
                            "which the kernel reads")


def test_misaligned_offsets_are_refused() -> None:
    assert refusal(image(thread_state__native_thread_id=185)).endswith(
        "thread_state.native_thread_id 185 is not 8-byte aligned")


def test_cookie_version_and_free_threading_are_checked() -> None:
    assert "cookie" in refusal(image(cookie=b"notdebug"))
    assert refusal(image(), version=0x031000B1) == (
        "its _Py_DebugOffsets says version 3.16.0a1 where its Py_Version says 3.16.0b1")
    with pytest.raises(FreeThreaded):
        read_offsets(image(free_threaded=1), RUNTIME, NEWER)


def test_an_unreadable_table_is_a_memory_error() -> None:
    with pytest.raises(MemoryReadError):
        read_offsets(FakeMemory(b"xdebugpy"), RUNTIME, NEWER)


def test_versions_are_written_as_cpython_writes_them() -> None:
    assert [format_version(v) for v in (0x030E08F0, 0x031000A1, 0x030F00C2)] == [
        "3.14.8", "3.16.0a1", "3.15.0rc2"]


# -- a newer interpreter, for real: a 3.15 process that says it is 3.16 -------


@needs_root
def test_a_process_saying_316_is_found_with_the_315_layout(forky_315: list[str]) -> None:
    child = Child(forky_315)
    try:
        child.claim_version(NEWER)
        found = find_python(child.pid)
        assert found is not None and found.version == (3, 16, 0)
        assert found.offsets == OFFSETS[3, 15]
        assert check_runtime(found) is None
    finally:
        child.stop()


@needs_root
def test_a_process_saying_316_whose_table_does_not_fit_is_refused_in_one_line(
        forky_315: list[str]) -> None:
    child = Child(forky_315)
    try:
        child.claim_version(NEWER)
        child.write_u64(child.info["runtime"] + SLOTS["interpreter_frame.size"], 64)
        with pytest.raises(UnsupportedPython) as raised:
            find_python(child.pid)
        assert str(raised.value) == (
            f"process {child.pid} runs {ROOT}/usr/bin/python3.15: its _Py_DebugOffsets (version "
            "3.16.0a1) does not match the 3.15 layout: interpreter_frame.owner 74 lies beyond "
            "interpreter_frame.size 64")
    finally:
        child.stop()


@needs_root
def test_a_process_saying_316_whose_threads_do_not_check_is_refused_at_its_last_look(
        forky_315: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ebpf_stream")
    child = Child(forky_315)
    try:
        child.claim_version(NEWER)
        # Aligned and inside PyInterpreterState, so the table checks, but not its threads.
        child.write_u64(child.info["runtime"] + SLOTS["interpreter_state.threads_head"], 7400)
        processes = PythonProcesses(None, None, {}, lambda: None)  # type: ignore[arg-type]
        assert processes.look(child.pid) is None
        assert not caplog.records, "a young process may not have a thread yet"
        while (due := processes.next_look()) is not None:
            time.sleep(max(0.0, due - time.monotonic()))
            processes.look_waiting()
        (warning,) = [r.getMessage() for r in caplog.records]
        assert warning.startswith("Python frames off for some processes: ")
        assert f"process {child.pid}" in warning
        assert warning.endswith("(its _Py_DebugOffsets were read with the 3.15 layout, the "
                                "newest known)")
    finally:
        child.stop()


@needs_root
def test_a_free_threaded_table_is_refused_as_such(forky_315: list[str]) -> None:
    child = Child(forky_315)
    try:
        child.write_u64(child.info["runtime"] + 16, 1)
        with pytest.raises(UnsupportedPython, match="free-threaded CPython build"):
            find_python(child.pid)
    finally:
        child.stop()


# -- all at once, through the kernel: a row per layout -------------------------


class FakeTable:
    """The kernel's python_offsets map, as a unit sees it."""

    def __init__(self) -> None:
        self.rows: dict[int, bytes] = {}

    def map(self, name: str) -> FakeTable:
        assert name == "python_offsets"
        return self

    def update(self, key: bytes, value: bytes) -> None:
        self.rows[struct.unpack("<I", key)[0]] = value


def test_each_distinct_layout_takes_one_kernel_row_up_to_the_bound() -> None:
    table = FakeTable()
    rows = OffsetRows(table)  # type: ignore[arg-type]

    def runtime(pid: int, offsets: Any) -> PythonRuntime:
        return PythonRuntime(pid, (3, 16, 0), 0, 0, offsets, "python3.16", 0, 0)

    assert [rows.row(runtime(1, OFFSETS[3, 15])), rows.row(runtime(2, OFFSETS[3, 13])),
            rows.row(runtime(3, OFFSETS[3, 15]))] == [0, 1, 0]
    # Offsets only user space reads share the kernel's row.
    assert rows.row(runtime(4, OFFSETS[3, 15]._replace(compact_data=64))) == 0
    for pid in range(5, 5 + MAX_LAYOUTS - 2):
        rows.row(runtime(pid, OFFSETS[3, 15]._replace(code_adaptive=pid * 8)))
    assert sorted(table.rows) == list(range(MAX_LAYOUTS))
    with pytest.raises(UnsupportedPython) as raised:
        rows.row(runtime(99, OFFSETS[3, 14]))
    assert str(raised.value) == (
        f"process 99 (CPython 3.16.0) lays out its interpreter unlike the {MAX_LAYOUTS} "
        "layouts the kernel already holds, the most it can")
    assert rows.row(runtime(100, OFFSETS[3, 13])) == 1


@pytest.fixture
def spinning(tmp_path: Path) -> Iterator[dict[str, Child]]:
    """A child spinning in ``leaf`` under 3.13, 3.14 and a 3.15 saying 3.16, and a
    waiting 3.15 saying 3.16 whose table does not fit."""
    if not shutil.which("chroot"):
        pytest.skip("chroot is not installed")
    children: dict[str, Child] = {}
    try:
        for version in ("3.13", "3.14"):
            children[version] = Child(interpreter(version, tmp_path), "spin")
        children["3.16"] = Child(interpreter("3.15", tmp_path), "spin")
        children["3.16"].claim_version(NEWER)
        children["unfit"] = Child(interpreter("3.15", tmp_path))
        children["unfit"].claim_version(NEWER)
        children["unfit"].write_u64(
            children["unfit"].info["runtime"] + SLOTS["interpreter_frame.size"], 64)
        yield children
    finally:
        for child in children.values():
            child.stop()


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_every_layout_is_walked_at_once(spinning: dict[str, Child],
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ebpf_stream")
    pids = tuple(child.pid for child in spinning.values())
    result = anyio.run(profile, EbpfConfig(sample_rate_hz=199, pids=pids), 3.0)

    def python_leaves(pid: int) -> dict[str, Any]:
        leaves: dict[str, Any] = {}
        for s in result:
            python = [f for f in s.frames if f.kind is FrameKind.PYTHON]
            if s.pid == pid and python:
                leaves[python[-1].name] = leaves.get(python[-1].name, 0) + s.count
        return leaves

    for name in ("3.13", "3.14", "3.16"):
        leaves = python_leaves(spinning[name].pid)
        assert leaves.get("leaf", 0) > 0.8 * sum(leaves.values()) > 0, (name, leaves)
    unfit = spinning["unfit"].pid
    warnings = [r.getMessage() for r in caplog.records if f"process {unfit} " in r.getMessage()]
    assert warnings == [
        f"Python frames off for some processes: process {unfit} runs "
        f"{ROOT}/usr/bin/python3.15: its _Py_DebugOffsets (version 3.16.0a1) does not match the "
        "3.15 layout: "
        "interpreter_frame.owner 74 lies beyond interpreter_frame.size 64"]
