"""Finding CPython in real processes of every interpreter on the machine, and
reading their memory and thread lists."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ebpf_stream._base.lru import Lru
from ebpf_stream._binaries.elf import object_symbols
from ebpf_stream._python import runtime
from ebpf_stream._python.memory import MemoryReadError, ProcessMemory
from ebpf_stream._python.offsets import OFFSETS
from ebpf_stream._python.runtime import (
    PythonRuntime,
    UnsupportedPython,
    check_runtime,
    find_python,
    thread_states,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' memory")

PYENV = Path("/root/.pyenv/versions")
# Each interpreter the user side must read, with the file it keeps _PyRuntime in.
INTERPRETERS = {
    "venv-3.11": (sys.executable, "libpython3.11.so.1.0"),
    "debian-3.11": ("/usr/bin/python3.11", "python3.11"),  # static: in the executable
    "pyenv-3.12": (str(PYENV / "3.12.1/bin/python3.12"), "libpython3.12.so.1.0"),
    "pyenv-3.13": (str(PYENV / "3.13.0/bin/python3.13"), "libpython3.13.so.1.0"),
}

# A program that tells what we must find in it, then waits: one JSON line
# about itself and its code objects, then a line per command read from stdin.
CHILD = r'''
import ctypes, gc, json, sys, threading, types

class Outer:
    class Inner:
        def method(self):
            def closure():
                return 1
            return closure

lam = lambda x: x + 1

def gen():
    yield 1
    yield 2

async def coro():
    return 1

def long_function(n):
    total = 0
    for i in range(n):
        if i % 3:
            total += i
        elif i % 5:
            total -= 1
        else:
            total *= 2
    try:
        total = total // (n - n)
    except ZeroDivisionError:
        total = -total
    finally:
        n += 1
    values = [
        x * 2
        for x in range(n)
        if x
    ]
    with open(__file__) as f:
        f.read(1)
    while n > 0:
        n -= 7
    return (total,
            values,
            lam(n))

def unicode_code():
    """Code objects whose names and files need each compact str kind."""
    found = []
    for name, filename in (("caf\xe9", "/tmp/caf\xe9.py"),
                           ("\u0444\u0443\u043d\u043a\u0446\u0438\u044f", "/tmp/\u0444.py"),
                           ("\U00020000", "/tmp/\U0001f600.py"),
                           ("plain", "/tmp/\udcff-\u0101.py")):
        module = compile("\n" * len(found) + f"def {name}():\n    return 1\n", filename, "exec")
        found.append(next(c for c in module.co_consts if isinstance(c, types.CodeType)))
    return found

def describe(code):
    return {"address": id(code), "first_line": code.co_firstlineno,
            "qualname": code.co_qualname, "filename": code.co_filename,
            "lines": [-1 if p[0] is None else p[0] for p in code.co_positions()]}

def reuse(source_lines):
    """Free a code object, then make another until one lands at its address."""
    global doomed, kept
    address, first_line = id(doomed), doomed.co_firstlineno
    doomed = None
    gc.collect()
    kept = []  # alive, so that each attempt takes another block
    for attempt in range(10000):
        source = "\n" * (source_lines + attempt % 50) + "def replacement():\n    return 2\n"
        module = compile(source, "/tmp/replacement.py", "exec")
        code = module.co_consts[0]
        kept.append(code)
        if id(code) == address:
            return {"old": [address, first_line], "new": describe(code)}
    return {"old": [address, first_line], "new": None}

doomed = compile("\n" * 5 + "def doomed():\n    return 1\n", "/tmp/doomed.py", "exec").co_consts[0]
extra = []
ready = threading.Event()
def idle():
    extra.append(threading.get_native_id())
    ready.set()
    threading.Event().wait()
threading.Thread(target=idle, daemon=True).start()
ready.wait()
codes = [Outer.Inner.method.__code__, Outer.Inner().method().__code__, lam.__code__,
         gen.__code__, coro.__code__, long_function.__code__, *unicode_code()]
print(json.dumps({
    "version": list(sys.version_info[:3]),
    "runtime": ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime")),
    "types": [id(types.CodeType), id(str), id(bytes)],
    "threads": [threading.get_native_id(), extra[0]],
    "doomed": describe(doomed),
    "codes": [describe(c) for c in codes]}), flush=True)
for command in sys.stdin:
    print(json.dumps(reuse(int(command))), flush=True)
'''


class Child:
    """A running interpreter of :data:`CHILD` and what it said about itself."""

    def __init__(self, name: str, directory: Path) -> None:
        if os.geteuid() != 0:
            pytest.skip("reads other processes' memory")
        self.name = name
        script = directory / "child.py"
        script.write_text(CHILD)
        self.proc = subprocess.Popen([available(name), str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.info: dict[str, Any] = self.read()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the child interpreter died"
        found: dict[str, Any] = json.loads(line)
        return found

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def available(name: str) -> str:
    executable = INTERPRETERS[name][0]
    if not os.access(executable, os.X_OK):
        pytest.skip(f"{executable} is not installed")
    return executable


@pytest.fixture(name="child", scope="module", params=list(INTERPRETERS))
def child_fixture(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    """One child per interpreter, shared by the tests of a module."""
    running = Child(request.param, tmp_path_factory.mktemp("python"))
    yield running
    running.stop()


def waiting(argv: list[str]) -> subprocess.Popen[bytes]:
    """A process blocked reading its stdin, past its startup."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    return proc


def python_waiting(executable: str) -> subprocess.Popen[bytes]:
    return waiting([executable, "-c", "import sys; print('ready', flush=True); "
                    "sys.stdin.readline()"])


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


@needs_root
def test_find_python(child: Child) -> None:
    found = find_python(child.pid)
    assert found is not None
    info = child.info
    assert found.pid == child.pid
    assert found.version == tuple(info["version"])
    assert found.runtime_address == info["runtime"]
    assert [found.code_type, found.str_type, found.bytes_type] == info["types"]
    assert found.offsets == OFFSETS[found.version[:2]]
    assert os.path.basename(found.path) == INTERPRETERS[child.name][1]


@needs_root
def test_thread_states(child: Child) -> None:
    found = find_python(child.pid)
    assert found is not None
    with ProcessMemory(child.pid) as memory:
        states = thread_states(found, memory)
    assert set(child.info["threads"]) <= set(states)
    assert len(set(states.values())) == len(states)
    assert check_runtime(found) is None


@needs_root
def test_wrong_offsets_fail_the_check(child: Child) -> None:
    found = find_python(child.pid)
    assert found is not None
    other = next(o for version, o in OFFSETS.items() if version != found.version[:2]
                 and o.interp_threads_head != found.offsets.interp_threads_head)
    reason = check_runtime(found._replace(offsets=other))
    assert reason is not None and str(child.pid) in reason


@needs_root
def test_one_parse_per_interpreter_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_files", Lru(16))
    parses = []
    real = object_symbols

    def counting(*args: Any) -> dict[str, int]:
        parses.append(args)
        return real(*args)

    monkeypatch.setattr(runtime, "object_symbols", counting)
    procs = [python_waiting(sys.executable) for _ in range(3)]
    try:
        found = [find_python(proc.pid) for proc in procs]
    finally:
        for proc in procs:
            stop(proc)
    assert all(f is not None and f.runtime_address for f in found)
    assert len({f.runtime_address for f in found if f}) == 3  # ASLR: one per process
    assert len(parses) == 1


@needs_root
def test_not_python() -> None:
    proc = waiting(["sh", "-c", "echo ready; exec sleep 60"])
    try:
        assert find_python(proc.pid) is None
    finally:
        stop(proc)


def test_gone_process() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert find_python(proc.pid) is None


@needs_root
def test_exited_python_fails_the_check() -> None:
    proc = python_waiting(sys.executable)
    found = find_python(proc.pid)
    stop(proc)
    assert found is not None
    reason = check_runtime(found)
    assert reason is not None and str(proc.pid) in reason


@needs_root
@pytest.mark.parametrize("version", ["3.10.13", "3.9.18", "3.6.15", "2.7.18"])
def test_unsupported_version(version: str) -> None:
    short = version.rpartition(".")[0]
    executable = PYENV / version / "bin" / f"python{short}"
    if not executable.exists():
        pytest.skip(f"{executable} is not installed")
    proc = waiting([str(executable), "-c", "import sys; sys.stdout.write('ready\\n'); "
                    "sys.stdout.flush(); sys.stdin.readline()"])
    try:
        with pytest.raises(UnsupportedPython, match=rf"CPython {short} is not supported.*3\.11"):
            find_python(proc.pid)
    finally:
        stop(proc)


@needs_root
def test_free_threaded_build_by_name(tmp_path: Path) -> None:
    static = "/usr/bin/python3.11"
    if not os.access(static, os.X_OK):
        pytest.skip(f"{static} is not installed")
    renamed = tmp_path / "python3.14t"  # 3.13t is read; later ones are not
    shutil.copy(static, renamed)
    proc = python_waiting(str(renamed))
    try:
        with pytest.raises(UnsupportedPython, match="free-threaded"):
            find_python(proc.pid)
    finally:
        stop(proc)


def test_runtime_fields() -> None:
    # The kernel's side gets offsets only; what user space adds stays at the end.
    assert PythonRuntime._fields[:6] == ("pid", "version", "runtime_address", "code_type",
                                          "offsets", "path")


# ProcessMemory, on our own process where the truth is at hand.

@needs_root
def test_memory_reads_objects() -> None:
    data = b"read me from outside"
    with ProcessMemory(os.getpid()) as memory:
        offsets = OFFSETS[sys.version_info[:2]]
        assert memory.u64(id(data) + offsets.code_type) == id(bytes)
        assert memory.read(id(data) + offsets.bytes_data, len(data)) == data
        assert memory.u64(id(data) + offsets.bytes_size) == len(data)
        number = ctypes.c_int32(-123456)
        assert memory.read(ctypes.addressof(number), 4) == bytes(number)


@needs_root
@pytest.mark.parametrize("address", [0, 4096, 2**63 - 8, 2**63, 2**64 - 8, -8])
def test_memory_unmapped_is_an_error(address: int) -> None:
    with ProcessMemory(os.getpid()) as memory, pytest.raises(MemoryReadError):
        memory.u64(address)


@needs_root
def test_memory_freed_is_an_error() -> None:
    region = mmap.mmap(-1, mmap.PAGESIZE)
    region[:5] = b"alive"
    view = ctypes.c_char.from_buffer(region)
    address = ctypes.addressof(view)
    del view
    with ProcessMemory(os.getpid()) as memory:
        assert memory.read(address, 5) == b"alive"
        region.close()  # unmapped
        with pytest.raises(MemoryReadError):
            memory.read(address, 5)


@needs_root
def test_memory_of_an_exited_process_is_an_error() -> None:
    proc = python_waiting(sys.executable)
    found = find_python(proc.pid)
    assert found is not None
    memory = ProcessMemory(proc.pid)
    try:
        assert memory.u64(found.code_type + 8)  # PyCode_Type's ob_type: &PyType_Type
        stop(proc)
        with pytest.raises(MemoryReadError):
            memory.u64(found.code_type + 8)
    finally:
        memory.close()
    with pytest.raises(MemoryReadError):
        memory.u64(found.code_type + 8)


def test_memory_of_a_gone_process() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(OSError):
        ProcessMemory(proc.pid)
