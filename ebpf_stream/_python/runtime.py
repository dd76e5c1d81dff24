"""Finding the CPython interpreter in a process, and checking it before its
frames are walked.

An interpreter is found by the ELF file that exports ``_PyRuntime``: the
shared ``libpython3.X.so`` most builds map, or the executable itself when
CPython is linked statically (Debian's ``/usr/bin/python3.X``).  The version
comes from the process's ``Py_Version``, so a file name proves nothing;
names only pick which files are worth parsing first, and reveal builds we
cannot read (free-threaded ones from 3.14).

From 3.13 the offsets are the ones the interpreter publishes in its
``_PyRuntime`` (``debug_offsets``), which also lets a version newer than
any known here be read; 3.11 and 3.12 have their hand-kept rows.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from .._base.lru import Lru
from .._binaries.containers import namespace_pid
from .._binaries.elf import ElfHeaders, Reader, object_symbols
from .._binaries.process import Mapping, open_mapped_file
from .debug_offsets import (
    FIRST_VERSION,
    FREE_THREADED_VERSIONS,
    DebugOffsetsError,
    FreeThreaded,
    read_offsets,
)
from .memory import ProcessMemory
from .offsets import OFFSETS, PythonOffsets

__all__ = ["PythonRuntime", "UnsupportedPython", "check_runtime", "find_python",
           "thread_states"]

# libpython3.11.so.1.0, python3.11, libpython3.13t.so, python3.6m: version and ABI flags.
_NAME = re.compile(r"(lib)?python(\d+)\.(\d+)([a-z]*)(\.so.*)?")
_SYMBOLS = ("_PyRuntime", "Py_Version", "PyCode_Type", "PyUnicode_Type", "PyBytes_Type")
# Parsed interpreter files, by (path, device, inode, mtime): every process of one
# interpreter shares an entry, and so does every other executable looked at.
_MAX_FILES = 256
# Bounds on the walk of interpreters and their thread lists, which a wrong
# offset or a torn read could send round a cycle.
_MAX_INTERPRETERS = 8
_MAX_THREADS = 1024


class UnsupportedPython(Exception):
    """The process runs a CPython whose frames we cannot read."""


class PythonRuntime(NamedTuple):
    """Where the interpreter of one process lives in its address space."""

    pid: int
    version: tuple[int, int, int]  # (major, minor, micro)
    runtime_address: int  # of _PyRuntime
    code_type: int  # address of PyCode_Type
    offsets: PythonOffsets
    path: str  # the ELF file holding the interpreter, as the process's maps name it
    str_type: int  # address of PyUnicode_Type
    bytes_type: int  # address of PyBytes_Type


class _FileName(NamedTuple):
    """What an interpreter file's name says: (major, minor) and ABI flags."""

    version: tuple[int, int]
    flags: str


def _parse_name(path: str, shared: bool) -> _FileName | None:
    match = _NAME.fullmatch(os.path.basename(path.removesuffix(" (deleted)")))
    if match is None or bool(match[1]) != shared or bool(match[5]) != shared:
        return None
    return _FileName((int(match[2]), int(match[3])), match[4])


_files: Lru[tuple[str, int, int, int], tuple[dict[str, int], ElfHeaders | None]] = Lru(
    _MAX_FILES)


def _file_symbols(pid: int, mapping: Mapping) -> tuple[dict[str, int], ElfHeaders | None]:
    """The interpreter symbols a mapped file exports, and its headers (None if unreadable)."""
    fd = open_mapped_file(pid, mapping)
    if fd is None:
        return {}, None
    try:
        st = os.fstat(fd)
        key = (mapping.module, st.st_dev, st.st_ino, st.st_mtime_ns)
        found = _files.get(key)
        if found is None:
            try:
                reader = Reader.of_file(fd, st.st_size)
                headers = ElfHeaders(reader)
                found = object_symbols(reader, headers, _SYMBOLS), headers
            except ValueError:  # not ELF64, or corrupt: not an interpreter we can read
                found = {}, None
            _files.put(key, found)
        return found
    finally:
        os.close(fd)


def _candidates(pid: int) -> list[tuple[Mapping, _FileName | None]]:
    """The first mapping of each file that may hold the interpreter, likeliest
    first: libpython, then the executable; with what each one's name says."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    try:
        executable: str | None = os.readlink(f"/proc/{pid}/exe")
    except OSError:  # a kernel thread, or gone
        executable = None
    first: dict[str, list[str]] = {}
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/"):
            first.setdefault(fields[5], fields)
    found: list[tuple[Mapping, _FileName | None]] = [
        (Mapping(fields), name) for path, fields in first.items()
        if (name := _parse_name(path, shared=True))]
    if executable in first:
        found.append((Mapping(first[executable]), _parse_name(executable, shared=False)))
    return found


def find_python(pid: int) -> PythonRuntime | None:
    """The CPython interpreter of ``pid``, or None if it runs none or is gone.

    Raises UnsupportedPython for a CPython we cannot read: one older than
    3.11, a free-threaded build other than 3.13's, or one whose published
    offsets do not check.
    """
    try:
        candidates = _candidates(pid)
    except OSError:
        return None
    for mapping, name in candidates:
        where = f"process {pid} runs {mapping.module}"
        if (name and "t" in name.flags and name.version >= FIRST_VERSION
                and name.version not in FREE_THREADED_VERSIONS):
            raise UnsupportedPython(_free_threaded(where, name.version))
        symbols, headers = _file_symbols(pid, mapping)
        if headers is None:
            continue
        if "_PyRuntime" not in symbols:
            if name and not _supported(name.version):  # 3.6 and older have no _PyRuntime
                raise UnsupportedPython(f"{where}: {_unsupported(name.version)}")
            continue
        bias = mapping.start - mapping.offset - headers.vaddr_delta(mapping.offset)
        runtime_address = bias + symbols["_PyRuntime"]
        py_version = bias + symbols["Py_Version"] if "Py_Version" in symbols else None
        try:
            with ProcessMemory(pid) as memory:
                version, offsets = _layout(memory, where, name, py_version, runtime_address)
        except OSError:  # exited
            return None
        missing = [s for s in _SYMBOLS[2:] if s not in symbols]
        if missing:
            raise UnsupportedPython(f"{where}, a CPython that does not export "
                                    f"{', '.join(missing)}; its frames cannot be named")
        return PythonRuntime(
            pid, version, runtime_address, bias + symbols["PyCode_Type"],
            offsets, mapping.module, bias + symbols["PyUnicode_Type"],
            bias + symbols["PyBytes_Type"])
    return None


def _layout(memory: ProcessMemory, where: str, name: _FileName | None, py_version: int | None,
            runtime_address: int) -> tuple[tuple[int, int, int], PythonOffsets]:
    """The interpreter's version and offsets: those it publishes from 3.13, else its row."""
    if py_version is None:  # before 3.11, Py_Version did not exist
        if name and not _supported(name.version):
            raise UnsupportedPython(f"{where}: {_unsupported(name.version)}")
        raise UnsupportedPython(f"{where}, a CPython that does not say its version: "
                                f"{_unsupported(None)}")
    hex_version = memory.u64(py_version)
    version = (hex_version >> 24 & 0xFF, hex_version >> 16 & 0xFF, hex_version >> 8 & 0xFF)
    if not _supported(version[:2]):
        raise UnsupportedPython(f"{where}: {_unsupported(version[:2])}")
    if version[:2] < FIRST_VERSION:
        return version, OFFSETS[version[:2]]
    try:
        return version, read_offsets(memory, runtime_address, hex_version)
    except FreeThreaded:
        raise UnsupportedPython(_free_threaded(where, version[:2])) from None
    except DebugOffsetsError as e:
        raise UnsupportedPython(f"{where}: {e}") from None


def _supported(version: tuple[int, int]) -> bool:
    return version in OFFSETS or version >= FIRST_VERSION


def _unsupported(version: tuple[int, int] | None) -> str:
    running = f"CPython {version[0]}.{version[1]}" if version else "this CPython"
    first = min(OFFSETS)
    return (f"{running} is not supported for Python frames (supported: "
            f"{first[0]}.{first[1]} and later)")


def _free_threaded(where: str, version: tuple[int, int]) -> str:
    running = f"{version[0]}.{version[1]}"
    read = ", ".join(f"{v[0]}.{v[1]}" for v in sorted(FREE_THREADED_VERSIONS))
    return (f"{where}, a free-threaded CPython build of {running}, whose Python frames are "
            f"not read (a thread may run its own copy of the bytecode; free-threaded builds "
            f"read: {read}); profile it under a default (GIL) build of {running} for them")


def thread_states(runtime: PythonRuntime, memory: ProcessMemory) -> dict[int, int]:
    """Native thread id -> PyThreadState address, over every interpreter.

    Threads not yet bound to an OS thread (id 0) are left out.  Raises
    MemoryReadError when a pointer leads to unreadable memory.
    """
    offsets = runtime.offsets
    states: dict[int, int] = {}
    interpreter = memory.u64(runtime.runtime_address + offsets.runtime_interpreters_head)
    for _ in range(_MAX_INTERPRETERS):
        if not interpreter:
            break
        state = memory.u64(interpreter + offsets.interp_threads_head)
        for _ in range(_MAX_THREADS):
            if not state:
                break
            native_id = memory.u64(state + offsets.tstate_native_thread_id)
            if native_id:
                states.setdefault(native_id, state)
            state = memory.u64(state + offsets.tstate_next)
        interpreter = memory.u64(interpreter + offsets.interp_next)
    return states


def check_runtime(runtime: PythonRuntime) -> str | None:
    """None if the thread list read through ``runtime`` names a live thread of
    its process, else why not, in one line: the offsets are then not to be
    trusted with this process (or it has not started its interpreter yet)."""
    version = ".".join(map(str, runtime.version))
    try:
        with ProcessMemory(runtime.pid) as memory:
            states = thread_states(runtime, memory)
        threads = {int(task) for task in os.listdir(f"/proc/{runtime.pid}/task")}
        if namespace_pid(runtime.pid) not in (0, runtime.pid):  # its threads' ids in there
            threads = {namespace_pid(tid) for tid in threads}
    except OSError as e:
        return f"cannot read the Python threads of process {runtime.pid}: {e}"
    if not states:
        return (f"process {runtime.pid} (CPython {version}) has no Python thread states yet, "
                "or its interpreter is not laid out as expected")
    if threads.isdisjoint(states):
        return (f"none of the {len(states)} Python thread states of process {runtime.pid} "
                f"(CPython {version}) belongs to one of its threads: its layout does not "
                "match our offsets")
    return None
