"""The host's threads as the fallback sampler sees them: their stacks and their CPU time.

A stack is read from the thread's frame objects, and encoded exactly as the
kernel's walker encodes it (code object address, instruction, first line,
flags, leaf first), so that the batcher names both the same way and the
profiles of the two modes read alike.

CPU time comes from each thread's own CPU clock, read with the clock id the
kernel derives from the thread id: a thread that has just exited makes the
read fail, where a stale ``pthread_t`` would be undefined behaviour.
"""

from __future__ import annotations

import inspect
import threading
import time
from types import FrameType
from typing import Final

from ..._model.events import PYTHON_FRAME_GENERATOR, Event, PythonStack

# Frames kept, as PYTHON_MAX_DEPTH in kernel/python_frames.h.
MAX_DEPTH: Final = 128
_GENERATOR_FLAGS: Final = (inspect.CO_GENERATOR | inspect.CO_COROUTINE
                           | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE)
_KEY_MASK: Final = (1 << 62) - 1

Frames = tuple[tuple[int, int, int, int], ...]


def walk(frame: FrameType | None) -> tuple[Frames, bool]:
    """A thread's stack from its current frame, leaf first, and whether it was cut."""
    frames: list[tuple[int, int, int, int]] = []
    while frame is not None and len(frames) < MAX_DEPTH:
        code = frame.f_code
        flags = PYTHON_FRAME_GENERATOR if code.co_flags & _GENERATOR_FLAGS else 0
        # f_lasti counts bytes; the kernel's walker, code units.
        frames.append((id(code), frame.f_lasti // 2, code.co_firstlineno, flags))
        frame = frame.f_back
    return tuple(frames), frame is not None


def stack_key(frames: Frames) -> int:
    """A key for a stack, odd and non-negative like the kernel's."""
    return (hash(frames) & _KEY_MASK) << 1 | 1


class StackKeys:
    """Keys of the stacks sampled, each sent once per epoch (see ``StackTrace``)."""

    def __init__(self) -> None:
        self.epoch = 0
        self._sent: dict[int, int] = {}  # key -> the epoch it was last sent in

    def key(self, frame: FrameType | None, out: list[Event]) -> int:
        """The key of the stack at ``frame``; its ``PythonStack`` goes to ``out`` if due."""
        return self.key_of(walk(frame), out)

    def key_of(self, walked: tuple[Frames, bool], out: list[Event]) -> int:
        """The key of a stack ``walk`` read; its ``PythonStack`` goes to ``out`` if due."""
        frames, truncated = walked
        key = stack_key(frames)
        if self._sent.get(key, -2) < self.epoch - 1:
            out.append(PythonStack(key, list(frames), truncated, self.epoch))
            self._sent[key] = self.epoch
        return key

    def next_epoch(self) -> None:
        self.epoch += 1
        self._sent = {k: e for k, e in self._sent.items() if e >= self.epoch - 1}


def cpu_clock(tid: int) -> int:
    """The clock id of thread ``tid``'s CPU time (MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED))."""
    return (~tid << 3) | 4 | 2


def native_ids() -> dict[int, int]:
    """The native thread id of each thread ``threading`` knows, by its ident.

    Read afresh each time: idents are reused as soon as a thread ends, and a
    pool that churns threads gets the same few over and over.
    """
    return {t.ident: t.native_id for t in threading.enumerate()
            if t.ident is not None and t.native_id is not None}


def cpu_ns(tid: int) -> int | None:
    """Thread ``tid``'s CPU time so far; None once it has exited."""
    try:
        return time.clock_gettime_ns(cpu_clock(tid))
    except OSError:
        return None
