"""Events that cross the channels between stages, and their wire encoding.

Events travel msgpack-encoded, one message per ring-buffer drain, so a
channel's bound is a bound on bytes held, and the stages never share mutable
objects.  The structs are ``array_like`` (positional on the wire: smaller and
faster) and ``gc=False`` (they never hold cycles).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TypeVar

import msgspec


class StackTrace(msgspec.Struct, tag="stack", array_like=True, gc=False, frozen=True):
    """The addresses behind a native stack key.

    ``key`` hashes the addresses, so it means the same stack for the whole
    run.  ``addresses`` are leaf first, as the kernel records them.
    ``epoch`` is the probe's stack-map epoch when it was sent: the probe
    sends a key again once two epochs have passed, so the stack resolver
    keeps keys of the last two epochs it has seen.
    """

    key: int
    addresses: list[int]
    epoch: int


NO_STACK = -errno.EFAULT
"""A ``CpuSample`` stack key for "no such stack" (a kernel thread has no user stack)."""
LOST_STACK = -errno.ENOMEM
"""A ``CpuSample`` stack key for a stack that could not be stored."""


class CpuSample(msgspec.Struct, tag="cpu", array_like=True, gc=False, frozen=True):
    """One CPU sample.

    ``user_stack`` and ``kernel_stack`` are stack keys (see ``StackTrace``),
    or a negative errno when the kernel stored no stack: ``NO_STACK``
    (``-EFAULT``) or ``LOST_STACK`` (``-ENOMEM``).  ``request`` is the
    32-byte value the process published for the running task (trace id,
    span id, and the offsets of route and method names in its region; see
    ``_context.region``), or empty.
    """

    timestamp_ns: int
    pid: int
    tid: int
    cpu: int
    comm: str
    user_stack: int
    kernel_stack: int
    python_stack: int = 0  # a ``PythonStack`` key; 0 when none was walked
    busy_since: int = 0  # the busy loop period the thread was in (see ``LoopBlocked``)
    request: bytes = b""  # the request its task ran, as published; empty: none


class OffCpuSample(msgspec.Struct, tag="off_cpu", array_like=True, gc=False, frozen=True):
    """Time a thread spent switched out, waiting, with the stacks it waited in.

    ``duration_ns`` is the waiting time it stands for (a short wait is
    sampled and stands for the threshold; see ``EbpfConfig.with_off_cpu``);
    ``timestamp_ns`` is when the wait ended.  ``state`` is the task state it
    waited in, the kernel's: 1 (``TASK_INTERRUPTIBLE``, a sleep) or 2
    (``TASK_UNINTERRUPTIBLE``, typically disk I/O).  Stack keys and
    ``request`` are as in ``CpuSample``.
    """

    timestamp_ns: int
    pid: int
    tid: int
    comm: str
    user_stack: int
    kernel_stack: int
    python_stack: int
    duration_ns: int
    state: int
    request: bytes = b""


class PythonStack(msgspec.Struct, tag="python_stack", array_like=True, gc=False, frozen=True):
    """A Python stack as the kernel walked it, sent once per key.

    ``key`` hashes the contents, so it means the same stack for the whole
    run.  ``frames`` are leaf first, each ``(code object address, lasti,
    first line, flags)`` (flags: ``PYTHON_FRAME_ENTRY``,
    ``PYTHON_FRAME_GENERATOR``).  ``truncated`` means the outermost frames
    were beyond the walker's depth.  ``epoch``: as for ``StackTrace``.
    """

    key: int
    frames: list[tuple[int, int, int, int]]
    truncated: bool
    epoch: int


PYTHON_FRAME_ENTRY = 1  # the first frame an evaluation loop call ran
PYTHON_FRAME_GENERATOR = 2  # a generator's or coroutine's frame


class ProcessExec(msgspec.Struct, tag="exec", array_like=True, gc=False, frozen=True):
    """A sampled process ran exec: what was known of its old program is stale."""

    pid: int


class LoopThread(msgspec.Struct, tag="loop_thread", array_like=True, gc=False, frozen=True):
    """A thread of a Python process waited in epoll, first since its Python stack could be walked.

    ``python_stack`` is where it waited, which tells an asyncio loop from
    other pollers.
    """

    pid: int
    tid: int
    python_stack: int


class LoopBlocked(msgspec.Struct, tag="loop_blocked", array_like=True, gc=False, frozen=True):
    """A loop's thread slept while its loop was busy: where, and for how long.

    ``busy_since`` identifies the busy period (the monotonic time the loop
    last returned from epoll); samples and stalls of the period carry it.
    ``request`` is as in ``CpuSample``.
    """

    pid: int
    tid: int
    busy_since: int
    duration_ns: int
    python_stack: int
    request: bytes = b""  # the request it slept in, as published; empty: none


class LoopStall(msgspec.Struct, tag="loop_stall", array_like=True, gc=False, frozen=True):
    """An event loop ran callbacks for at least the stall threshold without waiting.

    ``python_stack`` is where the loop waited again (0: not walked), which
    tells by itself whether the stall is an asyncio loop's.
    """

    timestamp_ns: int  # wall clock, when the loop waited again
    pid: int
    tid: int
    comm: str
    busy_since: int
    duration_ns: int
    python_stack: int = 0


class LoopTotals(msgspec.Struct, tag="loop", array_like=True, gc=False, frozen=True):
    """One event loop's busy periods (callback runs) since tracing began (cumulative).

    ``buckets`` is a log2 histogram of the periods in nanoseconds, as in
    ``SyscallTotals``.
    """

    pid: int
    tid: int
    comm: str
    count: int
    duration_ns: int
    buckets: list[int]


class SyscallTotals(msgspec.Struct, tag="syscalls", array_like=True, gc=False, frozen=True):
    """One process's calls of one syscall since tracing began (cumulative).

    Totals are cumulative so that a snapshot lost on a full channel costs
    nothing: the next one carries everything.  ``buckets[i]`` counts calls
    that took ``[2**i, 2**(i+1))`` nanoseconds (bucket 0 also takes 0 ns).
    """

    pid: int
    comm: str
    syscall: str
    count: int
    errors: int
    duration_ns: int
    buckets: list[int]


class SlowSyscall(msgspec.Struct, tag="slow_syscall", array_like=True, gc=False, frozen=True):
    """A syscall that took at least the configured threshold, with its stacks.

    ``ret`` is the raw return value (a negative errno on failure); the
    stacks are addresses, leaf first.
    """

    timestamp_ns: int  # wall clock, when the call returned
    pid: int
    tid: int
    comm: str
    syscall: str
    duration_ns: int
    ret: int
    user_stack: list[int]
    kernel_stack: list[int]


class TcpConnection(msgspec.Struct, tag="tcp", array_like=True, gc=False, frozen=True):
    """One TCP connection, reported once it has closed (or failed to open).

    ``role`` is ``"client"`` for connect() and ``"server"`` for accept().
    ``outcome`` is ``"closed"``, ``"reset"`` (ended by a RST, either way) or
    ``"failed"`` (a connect that never established).  Byte counts are what
    the process passed through the socket.
    """

    start_ns: int  # wall clock
    end_ns: int
    pid: int
    comm: str
    role: str
    outcome: str
    family: int  # 4 or 6
    local_address: str
    local_port: int
    peer_address: str
    peer_port: int
    bytes_sent: int
    bytes_received: int
    retransmits: int


def endpoint(address: str, port: int) -> str:
    """``address:port``, with an IPv6 address in brackets as URLs write it."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class NetworkTotals(msgspec.Struct, tag="network", array_like=True, gc=False, frozen=True):
    """One process's TCP activity since tracing began (cumulative)."""

    pid: int
    comm: str
    bytes_sent: int
    bytes_received: int
    connects: int
    accepts: int
    failed_connects: int
    retransmits: int
    resets_sent: int
    resets_received: int


class MemoryTotals(msgspec.Struct, tag="memory", array_like=True, gc=False, frozen=True):
    """One process's memory activity since tracing began (cumulative).

    The ``rss_*`` fields are the latest resident sizes in bytes seen by
    ``kmem:rss_stat``, not sums; they are 0 until the first change is seen.
    """

    pid: int
    comm: str
    minor_faults: int
    major_faults: int
    rss_anon: int
    rss_file: int
    rss_shmem: int
    rss_swap: int
    mmap_calls: int
    mmap_bytes: int
    munmap_calls: int
    munmap_bytes: int
    brk_growth: int  # bytes the heap grew by (brk calls that shrank it subtract)


class OomKill(msgspec.Struct, tag="oom_kill", array_like=True, gc=False, frozen=True):
    """The kernel's OOM killer chose a victim."""

    timestamp_ns: int  # wall clock
    pid: int
    comm: str
    total_vm: int  # bytes
    anon_rss: int
    file_rss: int
    shmem_rss: int
    oom_score_adj: int


class Watermark(msgspec.Struct, tag="watermark", array_like=True, gc=False, frozen=True):
    """How far the CPU samples sent so far are complete, in their clock (wall-clock ns).

    No sample is older than ``started_ns``, when sampling began.  Every sample
    taken before ``complete_ns`` has been sent, in this message or an earlier
    one (0 claims nothing new).  ``stopped``: sampling has ended at
    ``complete_ns`` and no sample follows.  The CPU probe ends each message
    with one, so the batch stage can close a window once nothing can still
    fall in it, and learns the start even if the first message was dropped.
    """

    started_ns: int
    complete_ns: int
    stopped: bool = False


Totals = SyscallTotals | NetworkTotals | MemoryTotals | LoopTotals


def totals_key(totals: Totals) -> tuple[str, int, str]:
    """What a snapshot of ``totals`` supersedes: the same kind, process and syscall
    (or loop thread)."""
    if isinstance(totals, SyscallTotals):
        name = totals.syscall
    elif isinstance(totals, LoopTotals):
        name = str(totals.tid)
    else:
        name = ""
    return (type(totals).__name__, totals.pid, name)


T = TypeVar("T", bound=Totals)


class LatestTotals:
    """The latest cumulative totals per process (and per syscall), one entry each.

    Totals are cumulative, so a run's figures are the sums of the latest
    snapshot of each; a process that exited keeps its last one.  Replacing
    rather than appending keeps it as small as the set of processes, however
    long the run.
    """

    def __init__(self) -> None:
        self._latest: dict[tuple[str, int, str], Totals] = {}

    def update(self, totals: Iterable[Totals]) -> None:
        self._latest.update((totals_key(t), t) for t in totals)

    def __len__(self) -> int:
        return len(self._latest)

    def all(self) -> list[Totals]:
        return list(self._latest.values())

    def of_kind(self, kind: type[T]) -> list[T]:
        return [t for t in self._latest.values() if isinstance(t, kind)]


Event = (StackTrace | PythonStack | CpuSample | OffCpuSample | ProcessExec | LoopThread
         | LoopBlocked | SyscallTotals | NetworkTotals | MemoryTotals | LoopTotals
         | SlowSyscall | TcpConnection | OomKill | LoopStall | Watermark)


class EventMessage(msgspec.Struct, gc=False, frozen=True):
    """One encoded message and how many samples it carries (for loss accounting).

    CPU samples and records (slow syscalls, connections, OOM kills, loop
    stalls) count as samples; totals do not: a later snapshot supersedes a
    lost one.
    """

    samples: int
    payload: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Event])


def encode_events(events: list[Event], samples: int) -> EventMessage:
    return EventMessage(samples, _encoder.encode(events))


def decode_events(message: EventMessage) -> list[Event]:
    return _decoder.decode(message.payload)
