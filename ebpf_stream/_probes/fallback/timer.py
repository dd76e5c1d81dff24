"""Samples of the main thread, taken in the main thread at the moment its CPU clock says.

A sampling thread can only look at another thread when it holds the GIL,
that is, when the other thread has let go of it: at its next I/O call,
mostly.  A service's loop thread does I/O between every few milliseconds of
Python, so such samples pile up on socket calls and miss the handlers.
Instead a POSIX timer on the main thread's own CPU clock sends it SIGPROF
every sampling period of CPU it uses, and the handler, which Python runs in
the main thread at the next instruction boundary, reads the frame it
interrupted: the samples fall where the CPU went.

The handler is ours only if SIGPROF had none (another profiler may own it),
and it is installed with SA_RESTART semantics, so that system calls the
signal lands in are restarted rather than failing with EINTR.
"""

from __future__ import annotations

import collections
import ctypes
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from ..._context.publisher import REQUEST
from .stacks import Frames

Walked = tuple[Frames, bool]

_CLOCK_THREAD_CPUTIME_ID = 3
_SIGEV_THREAD_ID = 4


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Sigevent(ctypes.Structure):
    # glibc's struct sigevent on 64-bit Linux: 64 bytes, the thread id first in the union.
    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int),
                ("sigev_notify", ctypes.c_int), ("sigev_tid", ctypes.c_int),
                ("_pad", ctypes.c_int * 11)]


class MainThreadTimer:
    """SIGPROF to the main thread per ``period_ns`` of its CPU; each sample is
    (CLOCK_MONOTONIC ns, the interrupted frame's ``walk``, ``busy_since``, the
    request published in the interrupted task's context).

    ``start`` must run in the main thread; it returns False (and does
    nothing) where the timer cannot be had.  ``tid`` is the thread sampled.
    """

    def __init__(self, period_ns: int, walk: Callable[[FrameType | None], Walked],
                 busy_since: Callable[[], int]) -> None:
        self.samples: collections.deque[tuple[int, Walked, int, bytes]] = collections.deque()
        self.cpu_ns = 0  # spent in the handler
        self._period_ns = period_ns
        self._walk = walk
        self._busy_since = busy_since
        self._timer = ctypes.c_void_p()
        self._libc: ctypes.CDLL | None = None
        self.tid = threading.get_native_id()

    def start(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        if signal.getsignal(signal.SIGPROF) not in (signal.SIG_DFL, None):
            return False  # someone else's
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            event = _Sigevent(sigev_signo=signal.SIGPROF, sigev_notify=_SIGEV_THREAD_ID,
                              sigev_tid=self.tid)
            if libc.timer_create(_CLOCK_THREAD_CPUTIME_ID, ctypes.byref(event),
                                 ctypes.byref(self._timer)) != 0:
                return False
        except (OSError, AttributeError):  # no timer_create in this libc
            return False
        self._libc = libc
        signal.signal(signal.SIGPROF, self._on_signal)
        signal.siginterrupt(signal.SIGPROF, False)
        period = _Timespec(*divmod(self._period_ns, 1_000_000_000))
        if libc.timer_settime(self._timer, 0, ctypes.byref(_Itimerspec(period, period)),
                              None) != 0:
            self.stop()
            return False
        return True

    def stop(self) -> None:
        """Delete the timer: no signal follows.  From any thread."""
        if self._libc is not None:
            libc, self._libc = self._libc, None
            libc.timer_delete(self._timer)

    def close(self) -> None:
        """Stop, and give SIGPROF back its default action; from the main thread, once
        any signal sent before the stop has been handled (the main thread has run since)."""
        self.stop()
        if signal.getsignal(signal.SIGPROF) == self._on_signal:
            signal.signal(signal.SIGPROF, signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        start = time.thread_time_ns()
        # The handler runs in the interrupted task's context: its request is at hand.
        self.samples.append((time.monotonic_ns(), self._walk(frame), self._busy_since(),
                             REQUEST.get(b"")))
        self.cpu_ns += time.thread_time_ns() - start
