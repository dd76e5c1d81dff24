"""The syscall family: exact per-process, per-syscall totals, and slow calls with stacks.

Counting happens in the kernel (``kernel/syscalls.bpf.c``) on the raw
``sys_enter``/``sys_exit`` tracepoints, the cheapest hooks there are on that
path, or on ``sys_exit`` alone when ``EbpfConfig.syscall_latency`` is off
(counts and errors only, durations left 0); user space reads the per-CPU
totals once per interval and names the numbers from the x86-64 table shipped
in the package (``_syscall_names``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from .._base.config import EbpfConfig
from .._base.stats import Stats
from .._bpf.environment import ensure_tracefs
from .._bpf.syscall_names import syscall_name, warn_of_unnamed_syscalls
from .._model.events import Event, SlowSyscall, SyscallTotals
from .pids import forget_pid_keys, process_name
from .tracing import TracingProbe

BUCKETS = 32
STACK_DEPTH = 64
TOTALS_ENTRIES = 16384  # (process, syscall) pairs: a busy machine uses a few thousand
COUNTER_TOTALS_FULL = 1

_KEY = np.dtype([("pid", "<u4"), ("nr", "<u4")])
_TOTALS = np.dtype([("count", "<u8"), ("errors", "<u8"), ("duration_ns", "<u8"),
                    ("buckets", "<u8", (BUCKETS,))])
_SLOW_CALL = np.dtype([
    ("timestamp_ns", "<u8"), ("duration_ns", "<u8"), ("ret", "<i8"),
    ("pid", "<u4"), ("tid", "<u4"), ("nr", "<u4"), ("reserved", "<u4"),
    ("comm", "S16"),
    ("user_stack", "<u8", (STACK_DEPTH,)), ("kernel_stack", "<u8", (STACK_DEPTH,)),
])


def _frames(stack: np.ndarray) -> list[int]:
    """A zero-padded stack's addresses, leaf first."""
    return [int(a) for a in stack[stack != 0]]


class SyscallProbe(TracingProbe):
    """Counts every syscall of the targets (or of every process) and streams slow ones."""

    source = "syscalls.bpf.c"
    record = _SLOW_CALL
    maps = ("totals",)
    losses: ClassVar[dict[int, str]] = {
        COUNTER_TOTALS_FULL: f"the map of {TOTALS_ENTRIES} (process, syscall) pairs is full; "
                             "calls of new pairs were not counted (trace fewer processes)"}

    def __init__(self, config: EbpfConfig, stats: Stats, *,
                 targets: Sequence[int] | None, follow_children: bool = False) -> None:
        super().__init__(config, stats, targets=targets, follow_children=follow_children)
        self._process_names: dict[int, str] = {}

    def cflags(self) -> list[str]:
        return [f"-DLATENCY={int(self.config.syscall_latency)}",
                f"-DSLOW_NS={round(self.config.slow_syscall_ms * 1e6)}",
                f"-DSTACK_DEPTH={STACK_DEPTH}", f"-DTOTALS_ENTRIES={TOTALS_ENTRIES}"]

    async def open(self) -> None:
        # Loaded first: the load checks the environment, and says in one line
        # what a user who may not read tracefs lacks.
        await super().open()
        warn_of_unnamed_syscalls(ensure_tracefs())

    def decode(self, records: np.ndarray) -> list[Event]:
        offset = self.wall_offset_ns
        return [SlowSyscall(int(r["timestamp_ns"]) + offset, int(r["pid"]), int(r["tid"]),
                            self.comm(r["comm"]), syscall_name(int(r["nr"])),
                            int(r["duration_ns"]), int(r["ret"]),
                            _frames(r["user_stack"]), _frames(r["kernel_stack"]))
                for r in records]

    def read_totals(self) -> list[Event]:
        keys, totals = self.read_table("totals", _KEY, _TOTALS)
        pairs = keys.tolist()
        names = {pid: self._process_name(pid) for pid, _ in pairs}  # one read per process
        events: list[Event] = []
        for (pid, nr), count, errors, duration_ns, buckets in zip(
                pairs, totals["count"].tolist(), totals["errors"].tolist(),
                totals["duration_ns"].tolist(), totals["buckets"].tolist(), strict=True):
            events.append(SyscallTotals(pid, names[pid], syscall_name(nr),
                                        count, errors, duration_ns, buckets))
        return events

    def _process_name(self, pid: int) -> str:
        """The process's current name (it changes at exec), or the last one seen."""
        name = process_name(pid)
        if name is not None:
            self._process_names[pid] = name
        return self._process_names.get(pid, "")

    @property
    def calls_not_counted(self) -> int:
        """Calls the kernel could not count: no room for a new (process, syscall) pair."""
        if self._program is None:  # closed: the last count read
            return self.losses_seen(COUNTER_TOTALS_FULL)
        return self.map("counters").lookup_u64_sum(COUNTER_TOTALS_FULL)

    def forget(self, pids: set[int]) -> None:
        forget_pid_keys(self.map("totals"), pids)
        for pid in pids:
            self._process_names.pop(pid, None)

