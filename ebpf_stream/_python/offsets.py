"""Where CPython keeps what a frame walker reads, per interpreter version.

CPython does not promise these layouts, so each supported minor version has
one row, taken from ``offsetof`` on its own headers (``Py_BUILD_CORE``).  The
rows are checked at run time, not trusted: the profiler's self-test walks
its own interpreter's frames from BPF and compares them with
``sys._getframe``, and each target's thread list is read and checked before
its frames are walked.

``KERNEL_FIELDS`` are the ones the BPF walker needs, packed in that order as
``struct python_offsets`` in ``kernel/python_frames.h``; the rest are for
reading code objects from user space.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

NONE = 0xFFFFFFFF  # a field this version does not have


class PythonOffsets(NamedTuple):
    # _PyRuntimeState -> PyInterpreterState -> PyThreadState
    runtime_interpreters_head: int
    interp_next: int
    interp_threads_head: int
    tstate_next: int
    tstate_native_thread_id: int
    tstate_frame: int  # 3.11, 3.12: the _PyCFrame pointer; 3.13: the current frame
    cframe_current_frame: int  # NONE from 3.13, where the thread state points at the frame
    # _PyInterpreterFrame
    frame_code: int  # f_code (f_executable from 3.13)
    frame_previous: int
    frame_instr: int  # prev_instr (3.11, 3.12) or instr_ptr (3.13)
    frame_owner: int
    frame_is_entry: int  # 3.11 only; later versions mark entries with C-stack frames
    owner_generator: int
    owner_cstack: int  # NONE in 3.11
    # PyCodeObject
    code_type: int  # ob_type
    code_first_line: int
    code_adaptive: int  # co_code_adaptive, where the bytecode starts
    code_filename: int
    code_name: int
    code_qualname: int
    code_linetable: int
    # PyBytesObject and the compact str layouts
    bytes_size: int
    bytes_data: int
    str_length: int
    str_state: int
    ascii_data: int  # sizeof(PyASCIIObject)
    compact_data: int  # sizeof(PyCompactUnicodeObject)


KERNEL_FIELDS = PythonOffsets._fields[:PythonOffsets._fields.index("code_adaptive") + 1]
_KERNEL = struct.Struct(f"<{len(KERNEL_FIELDS)}I")

OFFSETS: dict[tuple[int, int], PythonOffsets] = {
    (3, 11): PythonOffsets(
        runtime_interpreters_head=40, interp_next=0, interp_threads_head=16,
        tstate_next=8, tstate_native_thread_id=160, tstate_frame=56, cframe_current_frame=8,
        frame_code=32, frame_previous=48, frame_instr=56, frame_owner=69, frame_is_entry=68,
        owner_generator=1, owner_cstack=NONE,
        code_type=8, code_first_line=72, code_adaptive=184, code_filename=112, code_name=120,
        code_qualname=128, code_linetable=136,
        bytes_size=16, bytes_data=32, str_length=16, str_state=32, ascii_data=48,
        compact_data=72),
    (3, 12): PythonOffsets(
        runtime_interpreters_head=40, interp_next=0, interp_threads_head=72,
        tstate_next=8, tstate_native_thread_id=144, tstate_frame=56, cframe_current_frame=0,
        frame_code=0, frame_previous=8, frame_instr=56, frame_owner=70, frame_is_entry=NONE,
        owner_generator=1, owner_cstack=3,
        code_type=8, code_first_line=68, code_adaptive=192, code_filename=112, code_name=120,
        code_qualname=128, code_linetable=136,
        bytes_size=16, bytes_data=32, str_length=16, str_state=32, ascii_data=40,
        compact_data=56),
    (3, 13): PythonOffsets(
        runtime_interpreters_head=632, interp_next=7264, interp_threads_head=7344,
        tstate_next=8, tstate_native_thread_id=160, tstate_frame=72, cframe_current_frame=NONE,
        frame_code=0, frame_previous=8, frame_instr=56, frame_owner=70, frame_is_entry=NONE,
        owner_generator=1, owner_cstack=3,
        code_type=8, code_first_line=68, code_adaptive=200, code_filename=112, code_name=120,
        code_qualname=128, code_linetable=136,
        bytes_size=16, bytes_data=32, str_length=16, str_state=32, ascii_data=40,
        compact_data=56),
    # 3.14 and 3.15: read from the interpreters' own _Py_DebugOffsets (3.14.8 and
    # 3.15.0 as Debian builds them).  From 3.14 a frame's code is a tagged
    # reference, which the kernel masks.
    (3, 14): PythonOffsets(
        runtime_interpreters_head=808, interp_next=7272, interp_threads_head=7344,
        tstate_next=8, tstate_native_thread_id=160, tstate_frame=72, cframe_current_frame=NONE,
        frame_code=0, frame_previous=8, frame_instr=56, frame_owner=74, frame_is_entry=NONE,
        owner_generator=1, owner_cstack=3,
        code_type=8, code_first_line=68, code_adaptive=208, code_filename=112, code_name=120,
        code_qualname=128, code_linetable=136,
        bytes_size=16, bytes_data=32, str_length=16, str_state=32, ascii_data=40,
        compact_data=56),
    (3, 15): PythonOffsets(
        runtime_interpreters_head=936, interp_next=7264, interp_threads_head=7336,
        tstate_next=8, tstate_native_thread_id=184, tstate_frame=72, cframe_current_frame=NONE,
        frame_code=0, frame_previous=8, frame_instr=56, frame_owner=74, frame_is_entry=NONE,
        owner_generator=1, owner_cstack=3,
        code_type=8, code_first_line=68, code_adaptive=208, code_filename=112, code_name=120,
        code_qualname=128, code_linetable=136,
        bytes_size=16, bytes_data=32, str_length=16, str_state=32, ascii_data=40,
        compact_data=56),
}

# Index of each version's row in the kernel's `python_offsets` array.
VERSIONS: tuple[tuple[int, int], ...] = tuple(OFFSETS)


def kernel_row(offsets: PythonOffsets) -> bytes:
    """``offsets`` as the kernel's ``struct python_offsets``."""
    return _KERNEL.pack(*offsets[:len(KERNEL_FIELDS)])
