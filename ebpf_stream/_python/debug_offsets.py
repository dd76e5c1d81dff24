"""The offsets CPython 3.13 and later publish about themselves.

From 3.13, ``_PyRuntime`` begins with ``_Py_DebugOffsets``: the cookie
``xdebugpy``, the interpreter's ``PY_VERSION_HEX``, whether it is a
free-threaded build, then one section per struct an out-of-process reader
walks, each its ``sizeof`` and the ``offsetof`` of its fields, every value a
uint64 (``Include/internal/pycore_debug_offsets.h``; ``pycore_runtime.h`` in
3.13).  The interpreter's build fills it in, so it is right for that very
build, distro patches and all; but CPython keeps the table's own layout only
within a minor version, so each minor version's layout is listed here, as
data.

No table is believed unchecked: its cookie, its version (it must be the
process's ``Py_Version``), a build whose frames are read, and offsets that
are plausible: aligned, inside the size the table gives their struct, and,
for what the kernel takes from a frame or code object, inside the bytes it
reads of one.  A version newer than the newest layout here is read with
that layout, and these checks decide whether it is accepted: a layout that
moved under us fails them with near certainty, and the thread-list check
(``runtime.check_runtime``) comes after.

Free-threaded builds are read in 3.13: their longer object header (owner
thread, local and shared reference counts before ``ob_type``) moves every
object field, and the table gives each where it is; their thread states
are listed as a default build's are, and the kernel walks only the sampled
thread, which is stopped, so no lock is needed.  From 3.14 a free-threaded
thread may run its own copy of a code object's bytecode (``co_tlbc``,
chosen by the frame's ``tlbc_index``), which the kernel does not follow
when it computes an instruction's index: those builds are refused.

What the table does not carry (the frame-owner values, and before 3.15 the
size of a compact non-ASCII str's header, taken as the table's ASCII header
plus what the row adds to it) comes from the hand-kept row of the newest
version not newer than the process's (``offsets.OFFSETS``).
"""

from __future__ import annotations

import struct
from typing import Protocol

from .offsets import KERNEL_READS, OFFSETS, PythonOffsets

__all__ = ["FIRST_VERSION", "FREE_THREADED_VERSIONS", "LAYOUTS", "DebugOffsetsError",
           "FreeThreaded", "Memory", "format_version", "read_offsets"]

_COOKIE = b"xdebugpy"
_HEAD = struct.Struct("<8sQQ")  # cookie, version, free_threaded; the sections follow
_U64 = struct.Struct("<Q")

# Each version's sections in table order, each with its fields in order.
# Sections after ``unicode_object`` are left out: nothing read lies behind them.
_LAYOUT_TEXT = {
    (3, 13): """
        runtime_state: size finalizing interpreters_head
        interpreter_state: size id next threads_head gc imports_modules sysdict builtins
            ceval_gil gil_runtime_state gil_runtime_state_enabled gil_runtime_state_locked
            gil_runtime_state_holder
        thread_state: size prev next interp current_frame thread_id native_thread_id
            datastack_chunk status
        interpreter_frame: size previous executable instr_ptr localsplus owner
        code_object: size filename name qualname linetable firstlineno argcount
            localsplusnames localspluskinds co_code_adaptive
        pyobject: size ob_type
        type_object: size tp_name tp_repr tp_flags
        tuple_object: size ob_item ob_size
        list_object: size ob_item ob_size
        dict_object: size ma_keys ma_values
        float_object: size ob_fval
        long_object: size lv_tag ob_digit
        bytes_object: size ob_size ob_sval
        unicode_object: size state length asciiobject_size
    """,
    (3, 14): """
        runtime_state: size finalizing interpreters_head
        interpreter_state: size id next threads_head threads_main gc imports_modules sysdict
            builtins ceval_gil gil_runtime_state gil_runtime_state_enabled
            gil_runtime_state_locked gil_runtime_state_holder code_object_generation
            tlbc_generation
        thread_state: size prev next interp current_frame thread_id native_thread_id
            datastack_chunk status
        interpreter_frame: size previous executable instr_ptr localsplus owner stackpointer
            tlbc_index
        code_object: size filename name qualname linetable firstlineno argcount
            localsplusnames localspluskinds co_code_adaptive co_tlbc
        pyobject: size ob_type
        type_object: size tp_name tp_repr tp_flags
        tuple_object: size ob_item ob_size
        list_object: size ob_item ob_size
        set_object: size used table mask
        dict_object: size ma_keys ma_values
        float_object: size ob_fval
        long_object: size lv_tag ob_digit
        bytes_object: size ob_size ob_sval
        unicode_object: size state length asciiobject_size
    """,
    # As released: 3.15.0b4 added thread_state.last_profiled_frame_seq.
    (3, 15): """
        runtime_state: size finalizing interpreters_head
        interpreter_state: size id next threads_head threads_main gc imports_modules sysdict
            builtins ceval_gil gil_runtime_state gil_runtime_state_enabled
            gil_runtime_state_locked gil_runtime_state_holder code_object_generation
            tlbc_generation
        thread_state: size prev next interp current_frame base_frame last_profiled_frame
            last_profiled_frame_seq thread_id native_thread_id datastack_chunk status
            holds_gil gil_requested current_exception exc_state
        err_stackitem: exc_value
        interpreter_frame: size previous executable instr_ptr localsplus owner stackpointer
            tlbc_index
        code_object: size filename name qualname linetable firstlineno argcount
            localsplusnames localspluskinds co_code_adaptive co_tlbc
        pyobject: size ob_type
        type_object: size tp_name tp_repr tp_flags tp_basicsize tp_dictoffset
        heap_type_object: size ht_cached_keys
        tuple_object: size ob_item ob_size
        list_object: size ob_item ob_size
        set_object: size used table mask
        dict_object: size ma_keys ma_values
        float_object: size ob_fval
        long_object: size lv_tag ob_digit
        bytes_object: size ob_size ob_sval
        unicode_object: size state length asciiobject_size compactunicodeobject_size
    """,
}

# Each PythonOffsets field the table gives: (section, field, bytes read there).
# The width is also the alignment the field must have; 0 marks a size, not an offset.
_FROM_TABLE: dict[str, tuple[str, str, int]] = {
    "runtime_interpreters_head": ("runtime_state", "interpreters_head", 8),
    "interp_next": ("interpreter_state", "next", 8),
    "interp_threads_head": ("interpreter_state", "threads_head", 8),
    "tstate_next": ("thread_state", "next", 8),
    "tstate_native_thread_id": ("thread_state", "native_thread_id", 8),
    "tstate_frame": ("thread_state", "current_frame", 8),
    "frame_code": ("interpreter_frame", "executable", 8),
    "frame_previous": ("interpreter_frame", "previous", 8),
    "frame_instr": ("interpreter_frame", "instr_ptr", 8),
    "frame_owner": ("interpreter_frame", "owner", 1),
    "code_type": ("pyobject", "ob_type", 8),
    "code_first_line": ("code_object", "firstlineno", 4),
    "code_adaptive": ("code_object", "co_code_adaptive", 1),
    "code_filename": ("code_object", "filename", 8),
    "code_name": ("code_object", "name", 8),
    "code_qualname": ("code_object", "qualname", 8),
    "code_linetable": ("code_object", "linetable", 8),
    "bytes_size": ("bytes_object", "ob_size", 8),
    "bytes_data": ("bytes_object", "ob_sval", 1),
    "str_length": ("unicode_object", "length", 8),
    "str_state": ("unicode_object", "state", 4),
    "ascii_data": ("unicode_object", "asciiobject_size", 0),
    "compact_data": ("unicode_object", "compactunicodeobject_size", 0),
}

_LEVELS = {0xA: "a", 0xB: "b", 0xC: "rc", 0xF: ""}


def _parse(text: str) -> dict[str, int]:
    """``section.field`` -> where its value lies in the table."""
    slots: dict[str, int] = {}
    section = ""
    for word in text.split():
        if word.endswith(":"):
            section = word[:-1]
        else:
            slots[f"{section}.{word}"] = _HEAD.size + 8 * len(slots)
    return slots


# (major, minor) -> {"section.field": offset in the table}
LAYOUTS: dict[tuple[int, int], dict[str, int]] = {
    version: _parse(text) for version, text in _LAYOUT_TEXT.items()}
FIRST_VERSION = min(LAYOUTS)
# The (major, minor) versions whose free-threaded builds are read.
FREE_THREADED_VERSIONS = frozenset({(3, 13)})


class DebugOffsetsError(Exception):
    """The table cannot be trusted to describe the process: the message says why."""


class FreeThreaded(DebugOffsetsError):
    """The table says the interpreter is a free-threaded build of a version
    whose free-threaded builds are not read."""


class Memory(Protocol):
    """What reads the target's memory: ``ProcessMemory``, or a test's image."""

    def read(self, address: int, size: int) -> bytes: ...


def format_version(hex_version: int) -> str:
    """``PY_VERSION_HEX`` as CPython writes it: 3.16.0a1, 3.14.8."""
    level = _LEVELS.get(hex_version >> 4 & 0xF, "?")
    serial = str(hex_version & 0xF) if level else ""
    return (f"{hex_version >> 24 & 0xFF}.{hex_version >> 16 & 0xFF}."
            f"{hex_version >> 8 & 0xFF}{level}{serial}")


def read_offsets(memory: Memory, runtime_address: int, hex_version: int) -> PythonOffsets:
    """The offsets of the interpreter whose ``_PyRuntime`` is at ``runtime_address``
    and whose ``Py_Version`` is ``hex_version``.

    Raises DebugOffsetsError (FreeThreaded for a free-threaded build not
    read), whose message says in one line what did not match, and
    MemoryReadError when the table cannot be read.
    """
    cookie, table_version, free_threaded = _HEAD.unpack(memory.read(runtime_address, _HEAD.size))
    if cookie != _COOKIE:
        raise DebugOffsetsError(
            f"its _PyRuntime does not begin with the _Py_DebugOffsets cookie ({cookie!r})")
    if table_version != hex_version:
        raise DebugOffsetsError(
            f"its _Py_DebugOffsets says version {format_version(table_version)} where its "
            f"Py_Version says {format_version(hex_version)}")
    version = (hex_version >> 24 & 0xFF, hex_version >> 16 & 0xFF)
    if free_threaded and version not in FREE_THREADED_VERSIONS:
        raise FreeThreaded("a free-threaded build")
    layout = max(v for v in LAYOUTS if v <= version)  # from 3.13, as the cookie says
    slots = LAYOUTS[layout]
    table = memory.read(runtime_address, max(slots.values()) + 8)

    def value(name: str) -> int:
        found: int = _U64.unpack_from(table, slots[name])[0]
        return found

    found: dict[str, int] = {}
    problems: list[str] = []
    for field, (section, name, width) in _FROM_TABLE.items():
        if f"{section}.{name}" not in slots:
            continue  # not in this layout: the row has it
        offset, size = value(f"{section}.{name}"), value(f"{section}.size")
        if width > 1 and offset % width:
            problems.append(f"{section}.{name} {offset} is not {width}-byte aligned")
        elif offset + width > size:
            problems.append(f"{section}.{name} {offset} lies beyond {section}.size {size}")
        elif field in KERNEL_READS and offset + width > KERNEL_READS[field]:
            problems.append(f"{section}.{name} {offset} lies beyond the first "
                            f"{KERNEL_READS[field]} bytes, which the kernel reads")
        found[field] = offset
    if problems:
        more = f"; and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise DebugOffsetsError(
            f"its _Py_DebugOffsets (version {format_version(hex_version)}) does not match the "
            f"{layout[0]}.{layout[1]} layout: {'; '.join(problems[:2])}{more}")
    row = OFFSETS[max(v for v in OFFSETS if v <= version)]
    found.setdefault("compact_data", found["ascii_data"] + row.compact_data - row.ascii_data)
    return row._replace(**found)
