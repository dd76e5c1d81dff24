"""The CPU probe's Python side: which processes the kernel walks, and proof that it walks right.

The kernel walks the frames of the processes in its ``python_processes``
map.  ``PythonProcesses`` decides which those are: it looks for an
interpreter in each process the probe samples (again after an exec, and a
few times while a young process may still be loading its interpreter),
reads the thread list back through ``/proc/PID/mem`` before trusting its
offsets, and reports each interpreter it cannot support once.

Offsets differ between versions, and may between builds of one version
(they are the ones each interpreter publishes, from 3.13), so the kernel's
``python_offsets`` rows are filled as distinct ones are found
(``OffsetRows``), and each registered process points at its row.

``self_test`` checks the walker and one row against the one interpreter
whose truth is at hand: it samples a known call chain in this very process
and compares what the kernel walked with ``sys._getframe``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from .._base.cache_dir import cache_dir, trusted
from .._binaries.containers import pid_namespace
from .._bpf.loader import LoadedProgram
from .._bpf.ringbuf import RingBuffer
from .._bpf.syscalls import PERF_COUNT_SW_CPU_CLOCK, PERF_TYPE_SOFTWARE, BpfMap, attach_perf_event
from .._context.reader import Published, find_published
from .._model.events import PythonStack
from .._python.code import PythonSymbols
from .._python.debug_offsets import LAYOUTS
from .._python.offsets import PythonOffsets, kernel_row
from .._python.runtime import PythonRuntime, UnsupportedPython, check_runtime, find_python
from . import samples

log = logging.getLogger("ebpf_stream")

_U32 = struct.Struct("<I")
_PROCESS = struct.Struct("<QQIIQQQQIIQQ")  # struct python_process
_MAX_DEPTH = 128  # PYTHON_MAX_DEPTH in kernel/python_frames.h
# struct python_stack: depth, truncated, then PYTHON_MAX_DEPTH struct python_frame.
_FRAME = struct.Struct("<QiiI4x")  # code, lasti, first_line, flags
_STACK_HEADER = struct.Struct("<II")
# A process with no interpreter yet may be a launcher about to exec one, or a
# program whose loader has not mapped libpython yet: look again at these
# ages (seconds since it was first seen or last exec'ed), then stop.  Early
# and often at first: until then its samples and loop records carry no
# Python stack.
_LOOK_AGAIN_AT = (0.01, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


MAX_LAYOUTS = 16  # rows of the kernel's python_offsets (PYTHON_LAYOUTS)
_REPUBLISH_S = 1.0  # how often a walked process that publishes no requests is looked at again


class OffsetRows:
    """The kernel's ``python_offsets`` rows: each distinct one is written the
    first time a process needs it, and kept (there are few: one per version
    and build in use)."""

    def __init__(self, program: LoadedProgram) -> None:
        self._table = program.map("python_offsets")
        self._rows: dict[bytes, int] = {}
        self._lock = threading.Lock()  # looks run on the reader's thread and the loop's

    def row(self, runtime: PythonRuntime) -> int:
        """The row of ``runtime``'s offsets, written now if it is new.

        Raises UnsupportedPython when the kernel holds ``MAX_LAYOUTS`` others.
        """
        packed = kernel_row(runtime.offsets)
        with self._lock:
            row = self._rows.get(packed)
            if row is None:
                if len(self._rows) >= MAX_LAYOUTS:
                    raise UnsupportedPython(
                        f"process {runtime.pid} (CPython {'.'.join(map(str, runtime.version))}) "
                        f"lays out its interpreter unlike the {MAX_LAYOUTS} layouts the kernel "
                        "already holds, the most it can")
                row = len(self._rows)
                self._table.update(_U32.pack(row), packed)
                self._rows[packed] = row
            return row


def register(program: LoadedProgram, rows: OffsetRows, runtime: PythonRuntime,
             published: Published | None = None) -> None:
    """Let the kernel walk ``runtime``'s process, and read its requests if it publishes them.

    Raises UnsupportedPython when the kernel has no row left for its offsets.
    """
    row = rows.row(runtime)
    h = published.header if published is not None else None
    context = (0, 0, 0, 0, 0, 0) if h is None else (
        h.thread_context, h.var, h.bitmap_type, h.array_type, h.bytes_type, h.var_hash)
    program.map("python_processes").update(_U32.pack(runtime.pid), _PROCESS.pack(
        runtime.runtime_address, runtime.code_type, row, *context, 0,
        *pid_namespace(runtime.pid)))


def unregister(program: LoadedProgram, pid: int) -> None:
    program.map("python_processes").delete(_U32.pack(pid))


class PythonProcesses:
    """Finds the interpreters of sampled processes and registers them with the kernel."""

    def __init__(self, program: LoadedProgram, rows: OffsetRows,
                 failed: dict[PythonOffsets, str], on_found: Callable[[], None]) -> None:
        self._program = program
        self._rows = rows
        self._on_found = on_found  # called as each interpreter is registered
        self._failed = failed  # offsets that failed the self-test, and how
        self._found: dict[int, PythonRuntime | None] = {}
        self._first_seen: dict[int, float] = {}
        self._looks: dict[int, int] = {}  # looks taken since first seen
        self._reported: set[str] = set()
        # Walked processes not publishing requests (yet): when each was last looked at.
        self._unpublished: dict[int, float] = {}
        # The next look at each process without an interpreter, and a heap of them by
        # time: a machine starting hundreds of processes a second (a build) must not cost
        # a scan of them all per look.  Entries no longer in ``_next_due`` are stale.
        self._next_due: dict[int, float] = {}
        self._due_heap: list[tuple[float, int]] = []

    def look(self, pid: int) -> PythonRuntime | None:
        """The interpreter of ``pid``, registering it the first time it is found.

        A process registered before it published its requests (its app
        starts publishing once its framework is up) is looked at again
        every ``_REPUBLISH_S``.
        """
        found = self._found.get(pid)
        if found is not None:
            checked = self._unpublished.get(pid)
            if checked is not None and time.monotonic() - checked >= _REPUBLISH_S:
                self._publish(found, registered=True)
            return found
        if pid in self._found and not self._due(pid):
            self._schedule(pid)  # kept on the heap, whoever asked
            return None
        runtime = None
        problem = None  # a lasting reason not to walk this process
        try:
            runtime = find_python(pid)
            if runtime is not None:
                problem = self._failed.get(runtime.offsets)
                if problem is None:
                    problem, runtime = self._checked(runtime)
        except UnsupportedPython as exc:
            problem = str(exc)
        except OSError:
            pass  # gone
        if runtime is not None and not problem:
            try:
                self._publish(runtime, registered=False)
            except UnsupportedPython as exc:  # no kernel row left for its offsets
                problem = str(exc)
        if problem:
            self._report(problem)
            runtime = None
            self._looks[pid] = len(_LOOK_AGAIN_AT)  # an answer, not a race: stop looking
        self._found[pid] = runtime
        if runtime is not None:
            self._on_found()
        else:
            self._first_seen.setdefault(pid, time.monotonic())
            self._schedule(pid)
        return runtime

    def _checked(self, runtime: PythonRuntime) -> tuple[str | None, PythonRuntime | None]:
        """``runtime`` if its thread list checks, else None and, if that is final, why.

        Right after exec the interpreter may have no thread yet: not a
        reason to give up, only to look again later.  A version newer than
        any known layout is refused once the last look fails too.
        """
        reason = check_runtime(runtime)
        if reason is None:
            return None, runtime
        newest = max(LAYOUTS)
        if (runtime.version[:2] > newest
                and self._looks.get(runtime.pid, 0) >= len(_LOOK_AGAIN_AT)):
            return (f"{reason} (its _Py_DebugOffsets were read with the "
                    f"{newest[0]}.{newest[1]} layout, the newest known)"), None
        return None, None

    def _publish(self, runtime: PythonRuntime, registered: bool) -> None:
        """Register ``runtime`` with what it publishes of its requests, if anything."""
        published = find_published(runtime.pid)
        if published is None:
            self._unpublished[runtime.pid] = time.monotonic()
        else:
            self._unpublished.pop(runtime.pid, None)
        if published is not None or not registered:
            register(self._program, self._rows, runtime, published)

    def next_look(self) -> float | None:
        """When (``time.monotonic()``) the next look at a process is due, if one is."""
        heap = self._due_heap
        while heap and self._next_due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # stale: looked at since, found, or forgotten
        return heap[0][0] if heap else None

    def look_waiting(self) -> None:
        """Look again at each process without an interpreter whose look is due."""
        now = time.monotonic()
        while (due := self.next_look()) is not None and due <= now:
            _, pid = heapq.heappop(self._due_heap)
            del self._next_due[pid]
            if os.path.exists(f"/proc/{pid}"):
                self.look(pid)
            else:  # exited unfound, as most short-lived programs do: nothing to look for
                self.forget(pid)

    def _schedule(self, pid: int) -> None:
        """Put ``pid``'s next look on the heap, if it has looks left."""
        looks = self._looks.get(pid, 0)
        if looks >= len(_LOOK_AGAIN_AT):
            self._next_due.pop(pid, None)
            return
        due = self._first_seen[pid] + _LOOK_AGAIN_AT[looks]
        if self._next_due.get(pid) != due:
            self._next_due[pid] = due
            heapq.heappush(self._due_heap, (due, pid))

    def _due(self, pid: int) -> bool:
        """Whether a process without an interpreter should be looked at again now."""
        looks = self._looks.get(pid, 0)
        if looks >= len(_LOOK_AGAIN_AT):
            return False
        if time.monotonic() - self._first_seen[pid] < _LOOK_AGAIN_AT[looks]:
            return False
        self._looks[pid] = looks + 1
        return True

    def exec_seen(self, pid: int) -> None:
        """``pid`` runs a new program: look for an interpreter afresh, on schedule.

        Not at once: the new program has only just started loading.
        """
        self._found[pid] = None
        self._looks.pop(pid, None)
        self._unpublished.pop(pid, None)
        self._first_seen[pid] = time.monotonic()
        self._schedule(pid)

    def forget(self, pid: int) -> None:
        for table in (self._found, self._first_seen, self._looks, self._unpublished,
                      self._next_due):
            table.pop(pid, None)

    def forget_exited(self) -> None:
        """Drop what is known of processes that have exited (the kernel drops
        their entries itself)."""
        for pid in [p for p in self._found if not os.path.exists(f"/proc/{p}")]:
            self.forget(pid)

    def _report(self, problem: str) -> None:
        if problem not in self._reported:
            self._reported.add(problem)
            log.warning("Python frames off for some processes: %s", problem)


def read_python_stack(stacks: BpfMap, key: int, epoch: int) -> PythonStack | None:
    raw = stacks.lookup(struct.pack("<Q", key))
    if raw is None:
        return None
    depth, truncated = _STACK_HEADER.unpack_from(raw)
    end = _STACK_HEADER.size + _FRAME.size * min(depth, _MAX_DEPTH)
    frames = list(_FRAME.iter_unpack(raw[_STACK_HEADER.size:end]))
    return PythonStack(key, frames, bool(truncated), epoch)


# -- the self-test ------------------------------------------------------------


class _KnownChain:
    """A thread spinning at the end of a known call chain, which it records."""

    def __init__(self) -> None:
        self.stopped = False
        self.ready = threading.Event()
        # (code address, line, first line), leaf first
        self.expected: list[tuple[int, int, int]] = []
        self.spin_lines: set[int] = set()
        self.tid = 0
        self._thread = threading.Thread(target=self._outer, name="ebpf-stream-self-test",
                                        daemon=True)

    def __enter__(self) -> _KnownChain:
        self._thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped = True
        self._thread.join(5)

    def _outer(self) -> None:
        self._middle()

    def _middle(self) -> None:
        self._spin()

    def _spin(self) -> None:
        self.tid = threading.get_native_id()
        here = sys._getframe()
        chain: list[FrameType] = []
        frame: FrameType | None = here.f_back
        while frame is not None:
            chain.append(frame)
            frame = frame.f_back
        code = here.f_code
        self.expected = [(id(code), 0, code.co_firstlineno)] + [
            (id(f.f_code), f.f_lineno, f.f_code.co_firstlineno) for f in chain]
        self.spin_lines = {line for _, _, line in code.co_lines() if line is not None}
        self.ready.set()
        while not self.stopped:  # no call: the leaf frame must stay this one
            pass


def _proof(program: LoadedProgram, runtime: PythonRuntime) -> Path | None:
    """Where a pass of this very program's self-test on this very interpreter is kept.

    The outcome depends on nothing else: the walker's code (the object's
    cache key covers it, and the kernel), the offsets table's row, and the
    interpreter's file.  A later start then skips a test of tens of
    milliseconds that could only pass again.
    """
    base = cache_dir()
    if base is None or not program.key:
        return None
    try:
        st = os.stat(runtime.path)
    except OSError:
        return None
    what = [program.key, runtime.path, st.st_size, st.st_mtime_ns, st.st_ino,
            list(runtime.version), list(runtime.offsets)]
    return base / "self-tests" / hashlib.sha256(json.dumps(what).encode()).hexdigest()


def checked_self_test(program: LoadedProgram, ring: RingBuffer, rows: OffsetRows,
                      runtime: PythonRuntime, filtered: bool) -> str | None:
    """``self_test``, unless the same program passed it on the same interpreter before."""
    proof = _proof(program, runtime)
    if proof is not None and trusted(proof):
        return None
    problem = self_test(program, ring, rows, runtime, filtered)
    if problem is None and proof is not None:
        try:
            proof.parent.mkdir(mode=0o755, exist_ok=True)
            proof.unlink(missing_ok=True)  # one that was not trusted: made anew
            proof.touch(mode=0o644)
        except OSError:
            pass  # the test runs again next time
    return problem


def self_test(program: LoadedProgram, ring: RingBuffer, rows: OffsetRows,
              runtime: PythonRuntime, filtered: bool) -> str | None:
    """Sample a known call chain of this process from BPF; None if it walked right,
    else what went wrong.

    Runs before the probe's real events are attached, so the ring holds only
    the test's samples, which are dropped; the program is left as found.
    """
    me = _U32.pack(os.getpid())
    register(program, rows, runtime)
    added = filtered and program.map("targets").lookup(me) is None
    if added:
        program.map("targets").update(me, b"\x01")
    symbols = PythonSymbols()
    symbols.add_process(runtime)
    try:
        with _KnownChain() as chain:
            fds = attach_perf_event(program.program_fd("on_cpu_sample"), PERF_TYPE_SOFTWARE,
                                    PERF_COUNT_SW_CPU_CLOCK, 1_000_000, -1, thread=chain.tid)
            try:
                walked = _first_walk(program, ring, chain.tid)
            finally:
                for fd in fds:
                    os.close(fd)
        if walked is None:
            return "no Python stack was walked from a sample of a spinning thread"
        return _compare(walked, chain, symbols, os.getpid())
    finally:
        symbols.forget(os.getpid())
        unregister(program, os.getpid())
        if added:
            program.map("targets").delete(me)
        while len(ring.read_batch()):
            pass
        # The test's stacks would crowd the maps the real samples start in.
        for name in ("stacks_0", "stacks_1", "python_stacks_0", "python_stacks_1", "known"):
            program.map(name).clear()


def _first_walk(program: LoadedProgram, ring: RingBuffer, tid: int) -> PythonStack | None:
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        for r in samples.decode(ring.read_batch()):
            if r.tid == tid and r.python_stack:
                stack = read_python_stack(
                    program.map(f"python_stacks_{r.generation & 1}"), r.python_stack, 0)
                if stack is not None:
                    return stack
        time.sleep(0.01)
    return None


def _compare(walked: PythonStack, chain: _KnownChain, symbols: PythonSymbols,
             pid: int) -> str | None:
    if len(walked.frames) != len(chain.expected):
        return (f"walked {len(walked.frames)} frames where sys._getframe sees "
                f"{len(chain.expected)}")
    for depth, ((code, lasti, first_line, _), (want_code, want_line, want_first)) in enumerate(
            zip(walked.frames, chain.expected, strict=True)):
        if code != want_code or first_line != want_first:
            return f"frame {depth}: walked code object 0x{code:x}, expected 0x{want_code:x}"
        line = symbols.frame(pid, code, lasti, first_line).line
        if line != want_line and not (depth == 0 and line in chain.spin_lines):
            return f"frame {depth}: walked line {line}, expected {want_line or chain.spin_lines}"
    return None
