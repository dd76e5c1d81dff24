"""What each of the host's threads is doing at the instant the sampler looks.

The kernel tells, per thread, whether it is on a CPU or in which system call
it waits (``/proc/self/task/TID/syscall``).  The file is read through libc
functions called *with* the GIL held (``ctypes.PyDLL``): a read through
Python's own I/O would let the GIL go, and the thread the sampler just
stopped would run on before it is looked at.  So what the sampler reads is
the state of every thread at the moment its stack is walked.

A thread waiting for the GIL is in a futex on the GIL's condition variable.
Which address that is is learnt once, from a thread of ours made to wait for
the GIL, so no interpreter's struct layout is assumed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
import time
from typing import Final

RUNNING: Final = -1  # the call number of a thread on a CPU
# The system call numbers read here: futex, and the calls an event loop waits
# in (epoll_wait, epoll_pwait, epoll_pwait2), per machine.
_NUMBERS: Final = {"x86_64": (202, frozenset({232, 281, 441})),
                   "aarch64": (98, frozenset({22, 441}))}
FUTEX, LOOP_WAITS = _NUMBERS.get(platform.machine(), (None, frozenset()))
# The GIL's condition variable, its mutex and the switch condition and mutex
# follow each other (CPython's struct _gil_runtime_state): a futex this far
# before or after the learnt one is the GIL's.
_GIL_SPAN: Final = (-64, 160)
_LEARN_S: Final = 0.05

_libc = ctypes.PyDLL(None, use_errno=True)
_open = _libc.open
_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
_open.restype = ctypes.c_int
_pread = _libc.pread
_pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
_pread.restype = ctypes.c_ssize_t
_close = _libc.close
_close.argtypes = [ctypes.c_int]
_close.restype = ctypes.c_int


class Calls:
    """Reads the system call each thread is in, without letting the GIL go.

    Not thread-safe: one sampler thread uses it.
    """

    def __init__(self) -> None:
        self._buffer = ctypes.create_string_buffer(128)
        self._gil: int | None = None

    def now(self, tid: int) -> tuple[int, int] | None:
        """(call number, first argument) of thread ``tid``; ``RUNNING`` as the
        number of a thread on a CPU; None once the thread is gone, or on a
        machine whose call numbers are not known here."""
        if FUTEX is None:
            return None
        fd = _open(f"/proc/self/task/{tid}/syscall".encode(), os.O_RDONLY | os.O_CLOEXEC)
        if fd < 0:
            return None
        try:
            n = _pread(fd, self._buffer, len(self._buffer), 0)
        finally:
            _close(fd)
        if n <= 0:
            return None
        fields = self._buffer.raw[:n].split(None, 2)
        if fields[0] == b"running":
            return RUNNING, 0
        try:
            return int(fields[0]), int(fields[1], 16) if len(fields) > 1 else 0
        except ValueError:
            return None

    def wants_gil(self, call: tuple[int, int]) -> bool:
        """Whether ``call`` is a wait for the GIL.  Until the GIL's futex is
        known, every futex is taken for it."""
        if call[0] != FUTEX:
            return False
        if self._gil is None:
            return True
        return _GIL_SPAN[0] <= call[1] - self._gil <= _GIL_SPAN[1]

    def learn_gil(self) -> bool:
        """Find the GIL's futex: a thread of ours sleeps in a loop, and each
        time it wakes it must wait for the GIL this thread holds.  Holds the
        GIL for a few milliseconds, once; False if it could not be seen."""
        stop = False

        def nap() -> None:
            while not stop:
                time.sleep(0.0005)

        helper = threading.Thread(target=nap, name="ebpf-stream-gil", daemon=True)
        helper.start()
        tid = helper.native_id
        try:
            deadline = time.monotonic() + _LEARN_S
            while tid is not None and self._gil is None and time.monotonic() < deadline:
                call = self.now(tid)
                # Past its start (whose own locks are futexes too), in the nap's call.
                frame = sys._current_frames().get(helper.ident or 0)
                if (call is not None and call[0] == FUTEX and frame is not None
                        and frame.f_code is nap.__code__):
                    self._gil = call[1]
                del frame
        finally:
            stop = True
            helper.join()
        return self._gil is not None
