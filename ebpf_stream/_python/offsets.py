"""Where CPython keeps what a frame walker reads, per interpreter version.

CPython does not promise these layouts.  From 3.13 each interpreter
publishes its own offsets (``_Py_DebugOffsets``, read by
``debug_offsets``), and those are the ones used; 3.11 and 3.12 publish
none, so the rows here, taken from ``offsetof`` on their own headers
(``Py_BUILD_CORE``), are their only source.  The rows of 3.13 to 3.15 stay:
they give what the published table does not carry (the frame-owner values,
and before 3.15 the size of a compact str's header), and the tests check
them against what each interpreter publishes.

Whatever their source, offsets are checked at run time, not trusted: the
profiler's self-test walks its own interpreter's frames from BPF and
compares them with ``sys._getframe``, and each target's thread list is read
and checked before its frames are walked.

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
# The kernel reads the first FRAME_BYTES of each frame and CODE_BYTES of each
# code object (as kernel/python_frames.h names them), and these fields from
# them: field -> bytes read of its struct.  A free-threaded build's longer
# object header puts co_firstlineno at 84.
FRAME_BYTES = 80
CODE_BYTES = 96
KERNEL_READS = {
    **dict.fromkeys(("frame_code", "frame_previous", "frame_instr", "frame_owner",
                     "frame_is_entry"), FRAME_BYTES),
    **dict.fromkeys(("code_type", "code_first_line"), CODE_BYTES),
}

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
    # 3.14 and 3.15: as their own _Py_DebugOffsets give them (3.14.8 and 3.15.0
    # as Debian builds them).  From 3.14 a frame's code is a tagged reference,
    # which the kernel masks; entry frames are owned by the interpreter (3).
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


def kernel_row(offsets: PythonOffsets) -> bytes:
    """``offsets`` as the kernel's ``struct python_offsets``."""
    return _KERNEL.pack(*offsets[:len(KERNEL_FIELDS)])
