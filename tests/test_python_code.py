"""Naming Python frames from real interpreters' memory, and line numbers from
location tables, against what each interpreter says itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from test_python_runtime import (
    INTERPRETERS,
    Child,
    available,
    child_fixture,  # noqa: F401  (the "child" fixture)
    needs_root,
)

from ebpf_stream._model.profile import Frame, FrameKind
from ebpf_stream._python.code import UNKNOWN_FRAME, PythonSymbols, line_of
from ebpf_stream._python.runtime import PythonRuntime, find_python

# Prints, for every code object compiled from some stdlib modules, its
# location table, first line and the line of each code unit by co_positions()
# and by co_lines().
LINES = r'''
import importlib, json, sys, types

def walk(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from walk(const)

found = []
for name in ("typing", "asyncio.base_events", "dataclasses", "json.decoder", "argparse"):
    path = importlib.import_module(name).__file__
    with open(path) as f:
        module = compile(f.read(), path, "exec")
    for code in walk(module):
        units = len(code.co_code) // 2
        by_lines = [None] * units
        for start, end, line in code.co_lines():
            for unit in range(start // 2, end // 2):
                by_lines[unit] = -1 if line is None else line
        found.append([code.co_linetable.hex(), code.co_firstlineno,
                      [-1 if p[0] is None else p[0] for p in code.co_positions()], by_lines])
json.dump(found, sys.stdout)
'''


def symbols_for(child: Child, **limits: int) -> tuple[PythonSymbols, PythonRuntime]:
    found = find_python(child.pid)
    assert found is not None
    symbols = PythonSymbols(**limits)
    symbols.add_process(found)
    return symbols, found


def expected(code: dict[str, Any], lasti: int) -> Frame:
    line = code["first_line"] if lasti < 0 else max(code["lines"][lasti], 0)
    return Frame(code["qualname"], code["filename"], FrameKind.PYTHON, 0, line)


@needs_root
@pytest.mark.parametrize("limit", [65536, 2])
def test_frames(child: Child, limit: int) -> None:
    """Every instruction of every code object names its function, file and
    line, with roomy caches and with caches that keep almost nothing."""
    symbols, _ = symbols_for(child, max_cached_code=limit, max_cached_frames=limit)
    codes = child.info["codes"]
    assert {c["qualname"] for c in codes} >= {
        "Outer.Inner.method", "Outer.Inner.method.<locals>.closure", "<lambda>", "gen",
        "coro", "long_function", "caf\xe9", "\u0444\u0443\u043d\u043a\u0446\u0438\u044f",
        "\U00020000"}
    assert {c["filename"] for c in codes} >= {
        "/tmp/caf\xe9.py", "/tmp/\u0444.py", "/tmp/\U0001f600.py", "/tmp/\udcff-\u0101.py"}
    long_function = next(c for c in codes if c["qualname"] == "long_function")
    assert len(set(long_function["lines"])) > 20
    for _ in range(2):  # the second time from the caches
        for code in codes:
            for lasti in range(-1, len(code["lines"])):
                frame = symbols.frame(child.pid, code["address"], lasti, code["first_line"])
                assert frame == expected(code, lasti), (code["qualname"], lasti)
    assert symbols.unreadable == 0


@needs_root
def test_cached_frames_are_shared(child: Child) -> None:
    symbols, _ = symbols_for(child)
    code = child.info["codes"][0]
    first = symbols.frame(child.pid, code["address"], 0, code["first_line"])
    assert symbols.frame(child.pid, code["address"], 0, code["first_line"]) is first


@needs_root
def test_wrong_first_line_is_unknown(child: Child) -> None:
    symbols, _ = symbols_for(child)
    code = child.info["codes"][0]
    assert symbols.frame(child.pid, code["address"], 0, code["first_line"]) == expected(code, 0)
    assert symbols.frame(child.pid, code["address"], 0, code["first_line"] + 1) == UNKNOWN_FRAME
    assert symbols.frame(child.pid, code["address"], 1, code["first_line"] - 1) == UNKNOWN_FRAME
    assert symbols.unreadable == 2
    assert symbols.frame(child.pid, code["address"], 1, code["first_line"]) == expected(code, 1)


@needs_root
def test_not_a_code_object_is_unknown(child: Child) -> None:
    symbols, found = symbols_for(child)
    code = child.info["codes"][0]
    not_code = [
        found.str_type,  # a type object, not a code object
        found.runtime_address,
        code["address"] + 8,  # inside a code object
        0,
        4096,  # unmapped
        2**63 + 4096,  # no user address
    ]
    for address in not_code:
        assert symbols.frame(child.pid, address, 0, code["first_line"]) == UNKNOWN_FRAME
    assert symbols.unreadable == len(not_code)


@needs_root
def test_reused_address(child: Child) -> None:
    """A freed code object's address, taken by another code object, names the
    new one when the kernel read the new one's first line, and never the old."""
    symbols, _ = symbols_for(child)
    doomed = child.info["doomed"]
    assert symbols.frame(child.pid, doomed["address"], 0, doomed["first_line"]) == expected(
        doomed, 0)
    reused = child.ask("10")
    new = reused["new"]
    assert new is not None, "no code object was allocated where the freed one was"
    assert new["address"] == doomed["address"] and new["first_line"] != doomed["first_line"]
    assert symbols.frame(child.pid, new["address"], 0, new["first_line"]) == expected(new, 0)
    assert expected(new, 0).name == "replacement"
    fresh, _ = symbols_for(child)  # uncached: the old first line no longer matches
    assert fresh.frame(child.pid, doomed["address"], 0, doomed["first_line"]) == UNKNOWN_FRAME


@needs_root
def test_unknown_and_forgotten_processes(child: Child) -> None:
    symbols, found = symbols_for(child)
    code = child.info["codes"][0]
    assert symbols.frame(child.pid, code["address"], 0, code["first_line"]) == expected(code, 0)
    symbols.forget(child.pid)
    assert symbols.frame(child.pid, code["address"], 0, code["first_line"]) == UNKNOWN_FRAME
    symbols.add_process(found)
    assert symbols.frame(child.pid, code["address"], 0, code["first_line"]) == expected(code, 0)
    assert symbols.frame(os.getpid(), code["address"], 0, code["first_line"]) == UNKNOWN_FRAME
    assert symbols.unreadable == 2


@needs_root
def test_exited_process_is_unknown() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print(id(sys._getframe().f_code),"
                             " sys._getframe().f_code.co_firstlineno, flush=True);"
                             " sys.stdin.readline()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address, first_line = map(int, proc.stdout.readline().split())
    symbols = PythonSymbols()
    found = find_python(proc.pid)
    assert found is not None
    symbols.add_process(found)
    assert symbols.frame(proc.pid, address, 0, first_line).name == "<module>"
    proc.kill()
    proc.wait()
    # Samples taken before the exit still resolve from the cache, until forget().
    assert symbols.frame(proc.pid, address, 1, first_line).name == "<module>"
    uncached = PythonSymbols()
    uncached.add_process(found)
    assert uncached.frame(proc.pid, address, 1, first_line) == UNKNOWN_FRAME
    assert uncached.unreadable == 1


# line_of: the location table format, against each interpreter's own answers.

@pytest.mark.parametrize("name", list(INTERPRETERS))
def test_line_of_stdlib(name: str) -> None:
    out = subprocess.run([available(name), "-c", LINES], capture_output=True, text=True,
                         check=True).stdout
    codes = json.loads(out)
    units = 0
    for table, first_line, by_positions, by_lines in codes:
        linetable = bytes.fromhex(table)
        assert by_positions == by_lines
        got = [line_of(linetable, first_line, lasti) for lasti in range(len(by_positions))]
        assert got == by_positions
        assert line_of(linetable, first_line, -1) == first_line
        assert line_of(linetable, first_line, len(by_positions)) == -1
        units += len(by_positions)
    assert len(codes) > 500 and units > 40000


def test_line_of_cut_table() -> None:
    code = test_line_of_cut_table.__code__
    table = code.co_linetable
    lines = [-1 if p[0] is None else p[0] for p in code.co_positions()]
    for size in range(len(table)):
        for lasti in range(len(lines)):
            line = line_of(table[:size], code.co_firstlineno, lasti)
            assert line in (lines[lasti], -1)
