"""Stack resolution: a sample's stack keys to root-first frames.

The probes send each stack once per key (``StackTrace`` for native
addresses, ``PythonStack`` for a Python stack as the kernel walked it) and
then only the key with each sample.  ``StackResolver`` keeps the stacks of
the last two stack-map epochs, names them through the ``Symbolizer`` (native
and kernel frames) and ``PythonSymbols`` (Python frames, read from the
process's memory), splices Python frames into native ones (``merge``), and
caches the result per (pid, stack keys), so a stack is named once and then
only looked up.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence

from .._base.config import PythonFrames
from .._model.events import (
    NO_STACK,
    CpuSample,
    OffCpuSample,
    PythonStack,
    SlowSyscall,
    StackTrace,
)
from .._model.profile import Frame, FrameKind
from .._python.code import UNKNOWN_FRAME, PythonSymbols
from .._python.runtime import UnsupportedPython, find_python
from .merge import merge, runs
from .symbolizer import Symbolizer

log = logging.getLogger("ebpf_stream")

_LOST = Frame("[stack lost]", "[unknown]", FrameKind.NATIVE)
_PYTHON_LOST = Frame("[python stack lost]", "[unknown]", FrameKind.PYTHON)
_TRUNCATED = Frame("[truncated]", "[unknown]", FrameKind.PYTHON)


def _raw(address: int) -> Frame:
    return Frame(f"[unknown]+0x{address:x}", "[unknown]", FrameKind.NATIVE, address)


class StackResolver:
    """Turns a sample's stack keys into root-first frames, caching per stack.

    A sample with a Python stack gets its Python frames spliced into its
    native ones (``PythonFrames.MERGED``) or in their place
    (``PythonFrames.PYTHON``).
    """

    def __init__(self, symbolizer: Symbolizer,
                 python_frames: PythonFrames = PythonFrames.MERGED) -> None:
        self._symbolizer = symbolizer
        self._stacks: dict[int, StackTrace | PythonStack] = {}
        self._epoch = 0
        self._frames: dict[tuple[int, int, int, int], tuple[tuple[Frame, ...], bool]] = {}
        # A Python stack recurs under ever new native stacks (the words past
        # the interpreter's frames differ sample to sample): named once per key.
        self._named: dict[tuple[int, int], list[list[Frame]]] = {}
        self._python_only = python_frames is PythonFrames.PYTHON
        self._python_symbols = PythonSymbols()
        self._interpreters: dict[int, bool] = {}  # pid -> whether its Python frames can be named
        # Pids that may have entries in ``_frames`` or ``_named``: most programs a
        # machine execs are never sampled, and need not cost a pass over the caches.
        self._cached: set[int] = set()
        self._exited: set[int] = set()  # interpreters found gone when the epoch last turned

    def add_stack(self, stack: StackTrace | PythonStack) -> None:
        if stack.epoch > self._epoch:
            # The probe sends again any key it last sent two epochs ago.
            self._epoch = stack.epoch
            self._stacks = {k: v for k, v in self._stacks.items() if v.epoch >= stack.epoch - 1}
            self._frames = {k: v for k, v in self._frames.items()
                            if all(key <= 0 or key in self._stacks for key in k[1:])}
            self._named = {k: v for k, v in self._named.items() if k[1] in self._stacks}
            self._cached = {k[0] for k in self._frames} | {k[0] for k in self._named}
            # An exited interpreter is forgotten (its /proc/PID/mem closed) one
            # epoch after it was found gone: the samples it took last may be
            # read after its exit, and still need the code objects named.
            exited = {p for p in self._interpreters if not os.path.exists(f"/proc/{p}")}
            for pid in exited & self._exited:
                self.forget(pid)
            self._exited = exited - self._exited
            self._symbolizer.forget_exited()
        self._stacks[stack.key] = stack

    def process_exec(self, pid: int) -> None:
        """``pid`` runs a new program: nothing named for it before still holds."""
        self._forget(pid, frames=True)

    def forget(self, pid: int) -> None:
        self._forget(pid, frames=False)

    def _forget(self, pid: int, frames: bool) -> None:
        self._interpreters.pop(pid, None)
        self._python_symbols.forget(pid)
        if pid not in self._cached:
            return
        if frames:
            self._frames = {k: v for k, v in self._frames.items() if k[0] != pid}
            self._cached.discard(pid)
        self._named = {k: v for k, v in self._named.items() if k[0] != pid}

    def python_frames(self, pid: int, key: int) -> tuple[Frame, ...] | None:
        """Root-first Python frames of one stack key; None if the key is unknown."""
        found = self._python_runs(pid, key)
        if found is None:
            return None
        return tuple(frame for run in found for frame in run)[::-1]

    def _python_runs(self, pid: int, key: int) -> list[list[Frame]] | None:
        """The runs of named frames of one Python stack, leaf first (shared: not to
        be changed)."""
        found = self._named.get((pid, key))
        if found is not None:
            return found
        stack = self._stacks.get(key)
        if not isinstance(stack, PythonStack):
            return None
        if not self._interpreter(pid):
            return [[_PYTHON_LOST]]
        named = [self._python_symbols.frame(pid, code, lasti, first_line)
                 for code, lasti, first_line, _ in stack.frames]
        found = runs(named, [flags for *_, flags in stack.frames])
        if stack.truncated:
            found.append([_TRUNCATED])
        if UNKNOWN_FRAME not in named:  # a code object unreadable now may be read later
            self._named[pid, key] = found
            self._cached.add(pid)
        return found

    def _interpreter(self, pid: int) -> bool:
        known = self._interpreters.get(pid)
        if known is None:
            try:
                runtime = find_python(pid)
            except (UnsupportedPython, OSError):
                runtime = None
            if runtime is not None:
                self._python_symbols.add_process(runtime)
            known = self._interpreters[pid] = runtime is not None
        return known

    def slow_call_frames(self, call: SlowSyscall) -> tuple[Frame, ...]:
        """Root-first frames of a slow syscall, whose stacks travel with it."""
        user, _ = self._symbolized(call.user_stack,
                                   functools.partial(self._symbolizer.user_frames, call.pid))
        kernel, _ = self._symbolized(call.kernel_stack, self._symbolizer.kernel_frames)
        return user[::-1] + kernel[::-1]

    def frames(self, s: CpuSample | OffCpuSample) -> tuple[tuple[Frame, ...], bool]:
        """(root-first frames, whether a stack was lost) for one sample or wait."""
        key = (s.pid, s.user_stack, s.kernel_stack, s.python_stack)
        cached = self._frames.get(key)
        if cached is None:
            user, user_lost = self._resolve(
                s.user_stack, functools.partial(self._symbolizer.user_frames, s.pid))
            kernel, kernel_lost = self._resolve(s.kernel_stack, self._symbolizer.kernel_frames)
            if s.python_stack:
                python = self._python_runs(s.pid, s.python_stack)
                if python is None:
                    python, user_lost = [[_PYTHON_LOST]], True
                if self._python_only:
                    user, kernel = tuple(f for run in python for f in run), ()
                else:
                    user = merge(user, python)
            cached = self._frames[key] = (user[::-1] + kernel[::-1], user_lost or kernel_lost)
            self._cached.add(s.pid)
        return cached

    def _resolve(
        self, key: int, symbolize: Callable[[Sequence[int]], tuple[Frame, ...]]
    ) -> tuple[tuple[Frame, ...], bool]:
        """Leaf-first frames for one stack key, and whether the stack was lost."""
        if key >= 0:
            stack = self._stacks.get(key)
            if not isinstance(stack, StackTrace):
                return (_LOST,), True
            return self._symbolized(stack.addresses, symbolize)
        if key == NO_STACK:
            return (), False  # no such stack, e.g. no kernel stack while in user mode
        return (_LOST,), True

    @staticmethod
    def _symbolized(
        addresses: Sequence[int], symbolize: Callable[[Sequence[int]], tuple[Frame, ...]]
    ) -> tuple[tuple[Frame, ...], bool]:
        try:
            return symbolize(addresses), False
        except Exception:  # a symbolizer bug must not cost the samples
            log.exception("symbolizing a stack failed; keeping raw addresses")
            return tuple(_raw(a) for a in addresses), False
