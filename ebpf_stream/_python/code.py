"""Naming Python frames: code objects read from a process's memory, and the
line of an instruction from its code object's location table.

The kernel reports a frame as (code object address, instruction index,
``co_firstlineno`` as it read it).  By the time user space reads the address
the code object may have been freed and the memory reused, so what is read
must prove itself: the object must be a code object (its type pointer is
``PyCode_Type``) with the first line the kernel saw, and its strings must be
``str`` objects.  Anything else names the frame unknown, never wrongly.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .._base.lru import Lru
from .._binaries.process import UNKNOWN
from .._model.profile import Frame, FrameKind
from .memory import ProcessMemory
from .runtime import PythonRuntime

__all__ = ["UNKNOWN_FRAME", "PythonSymbols", "line_of"]

UNKNOWN_FRAME = Frame("[unknown python]", UNKNOWN, FrameKind.PYTHON)

# Location table entry codes (CPython's Objects/locations.md, the same in 3.11-3.13).
_NO_LOCATION = 15
_LONG = 14
_NO_COLUMNS = 13
_ONE_LINE = 10  # 10, 11 and 12: the line moves by 0, 1 or 2

# Longer names and tables are not what a code object holds: the pointer is stale.
_MAX_CHARS = 4096
_MAX_LINETABLE = 1 << 20

_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
# Code points per compact str ``kind`` (bytes per character).
_CODECS = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}


def _signed_varint(table: bytes, at: int) -> tuple[int, int]:
    """The signed varint at ``at`` (6 bits a byte, 0x40 continues; the low bit
    of the result is the sign), and where it ends."""
    byte = table[at]
    value = byte & 63
    shift = 0
    while byte & 64:
        at += 1
        shift += 6
        byte = table[at]
        value |= (byte & 63) << shift
    return -(value >> 1) if value & 1 else value >> 1, at + 1


def line_of(linetable: bytes, first_line: int, lasti: int) -> int:
    """The line of instruction ``lasti`` (in code units) of a code object with
    ``co_linetable`` ``linetable`` and ``co_firstlineno`` ``first_line``.

    What ``PyCode_Addr2Line(code, lasti * 2)`` returns: ``first_line`` for a
    frame not started (lasti < 0), -1 for an instruction without a line (where
    ``co_positions()`` gives None), or past the table's end.
    """
    if lasti < 0:
        return first_line
    line = first_line
    end = 0  # of the current entry's instructions, in code units
    at = 0
    size = len(linetable)
    try:
        while at < size:
            head = linetable[at]
            code = head >> 3 & 15
            end += (head & 7) + 1
            at += 1
            if code in (_NO_COLUMNS, _LONG):
                delta, at = _signed_varint(linetable, at)
                line += delta
            elif _ONE_LINE <= code < _NO_COLUMNS:
                line += code - _ONE_LINE
            if lasti < end:
                return -1 if code == _NO_LOCATION else line
            # Skip the columns: the next entry starts with its high bit set.
            while at < size and not linetable[at] & 128:
                at += 1
    except IndexError:  # a table cut short
        pass
    return -1


class _Code(NamedTuple):
    """What a frame needs of one code object."""

    qualname: str
    filename: str
    linetable: bytes


class _Process:
    """A process whose frames are named: its interpreter, once opened its memory,
    and what was read of it, which goes with it."""

    __slots__ = ("code", "frames", "memory", "runtime")

    def __init__(self, runtime: PythonRuntime, max_code: int, max_frames: int) -> None:
        self.runtime = runtime
        self.memory: ProcessMemory | None = None
        self.code: Lru[tuple[int, int], _Code] = Lru(max_code)  # (address, first line)
        self.frames: Lru[tuple[int, int, int], Frame] = Lru(max_frames)  # + instruction


class PythonSymbols:
    """Turns the kernel's Python frames into :class:`Frame` objects, caching
    code objects and frames per process in bounded LRUs.

    Processes are added with the runtime :func:`find_python` found, and
    forgotten when they exit, with their caches: a machine starting Python
    processes all day holds the caches of those alive, not of every one seen.
    The bounds are per process: a frame costs about 350 bytes with its key, a
    code object its names and location table.
    Not thread-safe: one collector thread owns it.
    """

    def __init__(self, *, max_cached_code: int = 4096, max_cached_frames: int = 16384) -> None:
        self._processes: dict[int, _Process] = {}
        self._max_code = max_cached_code
        self._max_frames = max_cached_frames
        self.unreadable = 0  # frames that could not be named, for stats

    def add_process(self, runtime: PythonRuntime) -> None:
        """Name frames of ``runtime.pid`` through ``runtime`` from now on (a new
        runtime for a pid, after exec, drops what was cached for it)."""
        known = self._processes.get(runtime.pid)
        if known is not None and known.runtime == runtime:
            return
        self.forget(runtime.pid)
        self._processes[runtime.pid] = _Process(runtime, self._max_code, self._max_frames)

    def forget(self, pid: int) -> None:
        """Drop an exited process, closing its memory."""
        process = self._processes.pop(pid, None)
        if process is not None and process.memory is not None:
            process.memory.close()

    def frame(self, pid: int, code: int, lasti: int, first_line: int) -> Frame:
        """The frame running instruction ``lasti`` of the code object at ``code``
        in ``pid``, whose ``co_firstlineno`` the kernel read as ``first_line``;
        :data:`UNKNOWN_FRAME` if that is not what the address holds now."""
        process = self._processes.get(pid)
        if process is None:
            self.unreadable += 1
            return UNKNOWN_FRAME
        key = (code, first_line, lasti)
        frame = process.frames.get(key)
        if frame is None:
            found = process.code.get((code, first_line))
            if found is None:
                try:
                    found = _read_code(process, code, first_line)
                except (OSError, ValueError):  # unreadable, or not that code object
                    self.unreadable += 1
                    return UNKNOWN_FRAME
                process.code.put((code, first_line), found)
            # Frames use line 0 for "no line", as native frames do.
            line = max(line_of(found.linetable, first_line, lasti), 0)
            frame = Frame(found.qualname, found.filename, FrameKind.PYTHON, 0, line)
            process.frames.put(key, frame)
        return frame


def _read_code(process: _Process, code: int, first_line: int) -> _Code:
    """The code object at ``code``; ValueError unless it is one with ``first_line``."""
    if process.memory is None:
        process.memory = ProcessMemory(process.runtime.pid)
    memory, runtime = process.memory, process.runtime
    offsets = runtime.offsets
    fields = (offsets.code_first_line, offsets.code_filename, offsets.code_qualname,
              offsets.code_linetable)
    head = _read_object(memory, runtime, code, max(fields) + 8, runtime.code_type)
    if _I32.unpack_from(head, offsets.code_first_line)[0] != first_line:
        raise ValueError("another code object")
    return _Code(
        _read_str(memory, runtime, _U64.unpack_from(head, offsets.code_qualname)[0]),
        _read_str(memory, runtime, _U64.unpack_from(head, offsets.code_filename)[0]),
        _read_bytes(memory, runtime, _U64.unpack_from(head, offsets.code_linetable)[0]))


def _read_object(memory: ProcessMemory, runtime: PythonRuntime, address: int, size: int,
                 type_address: int) -> bytes:
    """The first ``size`` bytes of the object at ``address``; ValueError unless
    its type is the one at ``type_address``."""
    head = memory.read(address, size)
    # Every object's type pointer is where a code object's is.
    if _U64.unpack_from(head, runtime.offsets.code_type)[0] != type_address:
        raise ValueError("an object of another type")
    return head


def _read_str(memory: ProcessMemory, runtime: PythonRuntime, address: int) -> str:
    """The compact ``str`` at ``address`` (code objects hold no other kind)."""
    offsets = runtime.offsets
    head = _read_object(memory, runtime, address, offsets.ascii_data, runtime.str_type)
    length: int = _U64.unpack_from(head, offsets.str_length)[0]
    state: int = _U32.unpack_from(head, offsets.str_state)[0]
    # state: interned:2, kind:3, compact:1, ascii:1 from the low bit up.
    kind, compact, is_ascii = state >> 2 & 7, state >> 5 & 1, state >> 6 & 1
    if not compact or kind not in _CODECS or (is_ascii and kind != 1) or length > _MAX_CHARS:
        raise ValueError("not a compact str of a sane length")
    data = memory.read(address + (offsets.ascii_data if is_ascii else offsets.compact_data),
                       length * kind)
    # A str may hold lone surrogates (file names that were not UTF-8).
    return data.decode("ascii" if is_ascii else _CODECS[kind], "surrogatepass")


def _read_bytes(memory: ProcessMemory, runtime: PythonRuntime, address: int) -> bytes:
    offsets = runtime.offsets
    head = _read_object(memory, runtime, address, offsets.bytes_data, runtime.bytes_type)
    size: int = _U64.unpack_from(head, offsets.bytes_size)[0]
    if size > _MAX_LINETABLE:
        raise ValueError("not a location table")
    return memory.read(address + offsets.bytes_data, size)
