"""The profile model: symbolized stacks aggregated over an interval.

Every output format (folded, pprof, speedscope, SVG, and later OTLP) is
rendered from this one model, so the formats can never disagree about what
was sampled.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator

import msgspec


class FrameKind(enum.IntEnum):
    KERNEL = 0
    NATIVE = 1
    PYTHON = 2


class ProfileKind(enum.StrEnum):
    """Which time a profile of one kind holds (``Profile.of_kind``)."""

    ON_CPU = "on-cpu"
    OFF_CPU = "off-cpu"
    WALL = "wall"


class Frame(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One symbolized frame.

    ``name`` is the function name, or ``module+0xoffset`` when the module has
    no symbol for the address: a frame is never dropped.  ``address`` is the
    address relative to ``module``'s load base (the ELF virtual address for
    native frames, the kernel address for kernel frames), which is what pprof
    and addr2line want.

    A Python frame's ``name`` is the code object's qualified name, its
    ``module`` the source file and ``line`` the line being run; its
    ``address`` is 0.
    """

    name: str
    module: str
    kind: FrameKind
    address: int = 0
    line: int = 0


class RequestContext(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """The request a sample was taken for, as the sampled process published it.

    ``trace_id`` and ``span_id`` are lowercase hex, the span active in the
    running task (or thread); both are empty when the process's middleware
    named the route without any tracing.  ``route`` is the local root
    span's ``http.route`` (a template such as ``/items/{id}``) and
    ``method`` its HTTP method; either is empty when unknown.
    """

    trace_id: str = ""
    span_id: str = ""
    route: str = ""
    method: str = ""

    @property
    def endpoint(self) -> str:
        """``GET /items/{id}``, as a reader names an endpoint; empty without a route."""
        if not self.route:
            return ""
        return f"{self.method} {self.route}" if self.method else self.route


class StackSamples(msgspec.Struct, gc=False):
    """Samples that share one process, one stack and one request.

    ``frames`` is root first: the outermost caller comes first and the
    sampled instruction last.  Kernel frames follow the user frames they
    interrupted.  ``context`` is the request they were taken for, None
    outside any.  Off the CPU, ``count`` is the waits recorded and
    ``off_cpu_ns`` the waiting time they stand for; ``waits_ns`` has each
    wait's share of it, beside its timestamp.  ``thread`` names the thread
    (``name [tid]``) in a run that records waits, whose wall-clock view is
    per thread; it is empty otherwise.
    """

    pid: int
    process: str
    frames: tuple[Frame, ...]
    count: int = 0
    timestamps_ns: list[int] = msgspec.field(default_factory=list)
    context: RequestContext | None = None
    off_cpu_ns: int = 0
    waits_ns: list[int] = msgspec.field(default_factory=list)
    thread: str = ""

    @property
    def key(self) -> StackKey:
        """What samples it aggregates share."""
        return (self.pid, self.process, self.frames, self.context, self.thread)


class ProcessInfo(msgspec.Struct, frozen=True, gc=False):
    """What identifies a sampled process to a backend, read while it was alive.

    ``executable`` is the file name of ``/proc/PID/exe`` and ``command_line``
    its arguments joined by spaces; both are empty when they could not be
    read (a kernel thread, or a process gone before its first sample).
    ``pid`` is as the host numbers it; a process in a container also has
    its ``container_id`` (and ``pod_uid`` in Kubernetes) and, in a pid
    namespace of its own, ``namespace_pid`` as the container numbers it
    (0 otherwise).
    """

    pid: int
    name: str
    executable: str = ""
    command_line: str = ""
    container_id: str = ""
    pod_uid: str = ""
    namespace_pid: int = 0


StackKey = tuple[int, str, tuple[Frame, ...], RequestContext | None, str]
_MICROSECOND_NS = 1000


class Profile(msgspec.Struct, gc=False):
    """CPU samples of one or more intervals, aggregated by (pid, process, stack),
    and, apart, the waits recorded off the CPU (``off_cpu``).

    ``processes`` describes the pids sampled, for the resource attributes of
    formats that carry them (OTLP).

    ``period_ns`` is the sampling period (1e9 / rate); every sample stands for
    that much CPU time.  Times are wall-clock nanoseconds since the epoch.
    Iterating gives the CPU samples' stacks.
    """

    period_ns: int
    start_ns: int
    end_ns: int
    stacks: dict[StackKey, StackSamples] = msgspec.field(default_factory=dict)
    off_cpu: dict[StackKey, StackSamples] = msgspec.field(default_factory=dict)
    processes: dict[int, ProcessInfo] = msgspec.field(default_factory=dict)
    # pid -> where its own window begins, for a process whose window reaches
    # back before ``start_ns`` over the batches in which it was not sampled.
    process_start_ns: dict[int, int] = msgspec.field(default_factory=dict)

    @property
    def sample_count(self) -> int:
        """CPU samples and recorded waits."""
        return (sum(s.count for s in self.stacks.values())
                + sum(s.count for s in self.off_cpu.values()))

    def add(
        self,
        pid: int,
        process: str,
        frames: tuple[Frame, ...],
        count: int = 1,
        timestamps_ns: Iterable[int] = (),
        context: RequestContext | None = None,
        thread: str = "",
    ) -> None:
        key = (pid, process, frames, context, thread)
        entry = self.stacks.get(key)
        if entry is None:
            entry = self.stacks[key] = StackSamples(pid, process, frames, context=context,
                                                    thread=thread)
        entry.count += count
        entry.timestamps_ns.extend(timestamps_ns)

    def add_off_cpu(
        self,
        pid: int,
        process: str,
        frames: tuple[Frame, ...],
        waited_ns: int,
        count: int = 1,
        timestamps_ns: Iterable[int] = (),
        context: RequestContext | None = None,
        waits_ns: Iterable[int] = (),
        thread: str = "",
    ) -> None:
        """``count`` waits in ``frames``, standing for ``waited_ns`` nanoseconds;
        ``waits_ns`` splits that among them, as ``timestamps_ns`` says when each ended."""
        key = (pid, process, frames, context, thread)
        entry = self.off_cpu.get(key)
        if entry is None:
            entry = self.off_cpu[key] = StackSamples(pid, process, frames, context=context,
                                                     thread=thread)
        entry.count += count
        entry.off_cpu_ns += waited_ns
        entry.timestamps_ns.extend(timestamps_ns)
        entry.waits_ns.extend(waits_ns)

    def merge(self, other: Profile, *, keep_timestamps: bool = True) -> None:
        """Fold ``other`` into this profile.

        Long-running file exporters merge without timestamps, so their memory
        is bounded by the number of distinct stacks, not by the run's length.
        """
        starts = {pid: min(self.start_of(pid), other.start_of(pid))
                  for pid in self.process_start_ns.keys() | other.process_start_ns.keys()}
        self.start_ns = min(self.start_ns, other.start_ns)
        self.end_ns = max(self.end_ns, other.end_ns)
        self.process_start_ns = {pid: t for pid, t in starts.items() if t < self.start_ns}
        for s in other.stacks.values():
            self.add(s.pid, s.process, s.frames, s.count,
                     s.timestamps_ns if keep_timestamps else (), s.context, s.thread)
        for s in other.off_cpu.values():
            self.add_off_cpu(s.pid, s.process, s.frames, s.off_cpu_ns, s.count,
                             s.timestamps_ns if keep_timestamps else (), s.context,
                             s.waits_ns if keep_timestamps else (), s.thread)
        self.processes.update(other.processes)

    def of_kind(self, kind: ProfileKind) -> Profile:
        """The CPU samples (``ON_CPU``: this profile), the waits, or both, as one
        profile of one kind of time.

        Off the CPU, and for both, a stack's count is microseconds, the period
        1,000 ns, and the timestamps are left out: a count no longer says how
        many events there were.  Both together stand on their thread (a root
        frame ``name [tid]``), so that each thread's time is its wall-clock
        time.
        """
        if kind is ProfileKind.ON_CPU:
            return self if not self.off_cpu else msgspec.structs.replace(self, off_cpu={})
        out = Profile(_MICROSECOND_NS, self.start_ns, self.end_ns,
                      processes=dict(self.processes),
                      process_start_ns=dict(self.process_start_ns))
        weights = [(s, s.off_cpu_ns) for s in self.off_cpu.values()]
        if kind is ProfileKind.WALL:
            weights += [(s, s.count * self.period_ns) for s in self.stacks.values()]
        for s, ns in weights:
            if (microseconds := round(ns / _MICROSECOND_NS)) > 0:
                frames = s.frames
                if kind is ProfileKind.WALL and s.thread:
                    frames = (Frame(s.thread, "[thread]", FrameKind.NATIVE), *frames)
                out.add(s.pid, s.process, frames, microseconds, context=s.context)
        return out

    def start_of(self, pid: int) -> int:
        """Where the window of ``pid``'s samples begins: ``start_ns``, or earlier
        for a process not sampled in the batches before this one."""
        return self.process_start_ns.get(pid, self.start_ns)

    def process_of(self, stack: StackSamples) -> ProcessInfo:
        """The process ``stack`` was sampled in: as read while alive, else its pid and name."""
        return self.process(stack.pid, stack.process)

    def process(self, pid: int, name: str) -> ProcessInfo:
        """``pid`` as read while alive (the batcher describes every pid it puts in a
        batch), else its pid and ``name``."""
        return self.processes.get(pid) or ProcessInfo(pid, name)

    def __iter__(self) -> Iterator[StackSamples]:
        return iter(self.stacks.values())
