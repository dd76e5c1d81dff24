"""Reading, from another thread, the request a thread of this process is running.

The fallback sampler runs in a thread of its own and sees the others stand
still (it holds the GIL), but Python offers no way to ask another thread
which context it runs.  Its thread state knows: ``ThreadRequest`` keeps the
thread state of the thread that makes it, and reads the running context
there, as the kernel does.  That is safe for as long as that thread lives
and the reader holds the GIL: the thread state stays, and the thread can
neither leave its context nor let it go meanwhile.
"""

from __future__ import annotations

import ctypes
import threading

from . import layout
from .publisher import REQUEST


class ThreadRequest:
    """The request the thread that made this object runs; read under the GIL while
    that thread lives (the profiler's loop thread: the profiler runs on it)."""

    def __init__(self) -> None:
        current = ctypes.pythonapi.PyThreadState_Get
        current.restype = ctypes.c_void_p
        self.tid = threading.get_native_id()
        self._context_at = int(current()) + layout.thread_context_offset()

    def __call__(self) -> bytes:
        address = ctypes.c_void_p.from_address(self._context_at).value
        if not address:
            return b""
        context = ctypes.cast(address, ctypes.py_object).value
        return context.get(REQUEST, b"")  # type: ignore[no-any-return]


def this_thread() -> ThreadRequest | None:
    """A ``ThreadRequest`` of the calling thread; None where this interpreter's
    thread state cannot be read (``layout``)."""
    try:
        return ThreadRequest()
    except layout.LayoutError:
        return None
