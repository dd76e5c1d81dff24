"""Splicing Python frames into native stacks.

Each call of ``_PyEval_EvalFrameDefault`` runs a run of Python frames (from
3.11, Python-to-Python calls stay in one call of the loop); the kernel
marks the first frame of each run.  In a merged stack each native
evaluation-loop frame is replaced by its run, as ``py-spy --native`` does.

Native frames are kept only where the frame-pointer walk can be trusted.
Interpreters built without frame pointers (the common case) unwind
natively only as far as the first interpreter frame: what the walk reads
past it are words of whatever the frame pointer register last held, mostly
data addresses.  So the runs are paired with loop frames from the leaf and
no native frame past the last pair is kept; runs left unpaired go at the
root.  Past the outermost run the native frames would only be the ones that
started the interpreter or the thread (``main``, ``Py_RunMain``,
``start_thread``...) when they are right, and noise when they are not, so a
thread's stack always begins at its outermost Python frame: every sample of
a thread has the same root, whichever way the interpreter was built.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._model.events import PYTHON_FRAME_ENTRY
from .._model.profile import Frame

EVAL_LOOP = "_PyEval_EvalFrameDefault"
_UNKNOWN = "[unknown]"


def runs(frames: Sequence[Frame], flags: Sequence[int]) -> list[list[Frame]]:
    """Leaf-first Python frames cut into evaluation-loop runs, leaf run first."""
    found: list[list[Frame]] = []
    current: list[Frame] = []
    for frame, flag in zip(frames, flags, strict=True):
        current.append(frame)
        if flag & PYTHON_FRAME_ENTRY:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return found


def merge(native: Sequence[Frame], python: list[list[Frame]]) -> tuple[Frame, ...]:
    """Leaf-first native user frames and leaf-first Python runs, as one leaf-first stack."""
    if not python:
        return tuple(native)
    loops = [i for i, frame in enumerate(native) if frame.name == EVAL_LOOP]
    paired = min(len(loops), len(python))
    merged: list[Frame] = []
    start = 0
    for loop, run in zip(loops[:paired], python[:paired], strict=True):
        merged += native[start:loop]
        merged += run
        start = loop + 1
    if not paired:
        # No loop frame to anchor on: keep the native frames the unwinder
        # was sure of, those above the first it could not name.
        merged += _until_unknown(native)
    for run in python[paired:]:
        merged += run
    return tuple(merged)


def _until_unknown(native: Sequence[Frame]) -> Sequence[Frame]:
    for i, frame in enumerate(native):
        if frame.module == _UNKNOWN or frame.name.startswith(_UNKNOWN):
            return native[:i]
    return native
