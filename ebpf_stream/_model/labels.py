"""How a frame, an endpoint or a stall reads as text: one name, shared by every text output.

The folded, speedscope and SVG files, the OTLP stall records and the
command line all name frames through :func:`frame_label` and endpoints
through :func:`endpoint_label`, and the stall records and the command line
say where a loop stalled through :func:`stall_place`, so each reads the
same wherever it is shown.
"""

from __future__ import annotations

import functools
import re

from .batch import Stall
from .dictionary import valid_utf8
from .profile import Frame, FrameKind, RequestContext, StackSamples

KERNEL_SUFFIX = "_[k]"
"""Appended to kernel frame names, so kernel time stands out in any viewer."""

NO_ROUTE = "[no route]"
"""The endpoint of samples taken outside any request, or for one without a route."""

# ";" separates frames and a newline separates stacks; other control
# characters (and two non-characters) would corrupt the line-oriented file or
# the SVG's XML.
_UNSAFE = {ord(";"): ":"} | {c: " " for c in (*range(32), 127, 0xFFFE, 0xFFFF)}


# Where installed code lives: a file below one of these reads as its import path.
_LIBRARY_ROOT = re.compile(r".*/(?:site-packages|dist-packages|lib/python\d+\.\d+)/")


def short_file(path: str) -> str:
    """A Python source file as a reader knows it: ``asyncio/events.py`` for the
    standard library and installed packages, the base name for anything else."""
    library = _LIBRARY_ROOT.sub("", path, count=1)
    return library if library != path else path.rpartition("/")[2]


def clean_name(name: str) -> str:
    """Make ``name`` safe as one folded frame: no separators, never empty."""
    return valid_utf8(name).translate(_UNSAFE) or "[unknown]"


@functools.lru_cache(maxsize=1 << 16)
def frame_label(frame: Frame) -> str:
    """The display name of ``frame``: ``qualname (file.py:line)`` for a Python
    frame.  Cached: the same frames recur in many stacks."""
    name = clean_name(frame.name)
    if frame.kind is FrameKind.PYTHON and frame.line:
        return clean_name(f"{frame.name} ({short_file(frame.module)}:{frame.line})")
    return name + KERNEL_SUFFIX if frame.kind is FrameKind.KERNEL else name


def endpoint_label(context: RequestContext | None) -> str:
    """``GET /items/{id}``: the endpoint a sample was taken for, else ``[no route]``."""
    endpoint = "" if context is None else context.endpoint
    return valid_utf8(endpoint) if endpoint else NO_ROUTE


def shown_frames(stack: StackSamples, *, by_route: bool = False) -> tuple[Frame, ...]:
    """The frames a flame graph shows for ``stack``, root first.

    By route, a frame named after the stack's endpoint comes first, so the
    graph splits by endpoint before it splits by caller.  The endpoint is no
    code: its frame is native, of no binary.
    """
    if not by_route:
        return stack.frames
    return (_route_frame(endpoint_label(stack.context)), *stack.frames)


@functools.lru_cache(maxsize=1024)
def _route_frame(endpoint: str) -> Frame:
    return Frame(endpoint, "", FrameKind.NATIVE)


def stall_place(stall: Stall) -> str:
    """``in handler (app.py:3) during GET /items/{id}, trace 0af7...``: the culprit,
    and the request it served (its endpoint, and the trace to look it up by),
    those known; empty when none is."""
    parts = []
    culprit, context = stall.culprit, stall.context
    if culprit is not None:
        parts.append(f"in {frame_label(culprit)}")
    if context is not None:
        trace = f"trace {context.trace_id}" if context.trace_id else ""
        request = ", ".join(part for part in (valid_utf8(context.endpoint), trace) if part)
        if request:
            parts.append(f"during {request}")
    return " ".join(parts)
