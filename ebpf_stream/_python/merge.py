"""Splicing Python frames into native stacks.

Each call of ``_PyEval_EvalFrameDefault`` runs a run of Python frames (from
3.11, Python-to-Python calls stay in one call of the loop); the kernel
marks the first frame of each run.  In a merged stack each native
evaluation-loop frame is replaced by its run, as ``py-spy --native`` does.

Interpreters built without frame pointers (the common case) unwind
natively only as far as the first interpreter frame, and what follows is
noise.  When the native stack holds fewer evaluation-loop frames than there
are runs, the runs are paired from the leaf, the native frames beyond the
last pair are dropped and the remaining runs go at the root.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._events import PYTHON_FRAME_ENTRY
from .._profile import Frame

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
    if paired == len(python):
        merged += native[start:]  # the native callers of the outermost run
        return tuple(merged)
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
