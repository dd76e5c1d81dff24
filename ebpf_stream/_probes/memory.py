"""Memory tracing: page faults, resident sizes, mmap/munmap/brk and OOM kills per process.

Page faults are counted by the kernel's own software perf events, raised
exactly where it adds to a task's ``min_flt``/``maj_flt``, so the counts are
the ones ``getrusage`` reports (faults taken on behalf of another process
through get_user_pages, such as exec copying its arguments, add to those
counters without raising the event).  Everything is aggregated per process
in the kernel; only OOM kills travel through the ring.
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np

from .._base.errors import ProbeError
from .._bpf.environment import ensure_tracefs
from .._bpf.loader import LoadedProgram
from .._bpf.syscalls import (
    PERF_COUNT_SW_PAGE_FAULTS_MAJ,
    PERF_COUNT_SW_PAGE_FAULTS_MIN,
    PERF_TYPE_SOFTWARE,
)
from .._model.events import Event, MemoryTotals, OomKill
from .records import PID
from .tracing import TracingProbe

# Mirrors `struct oom_kill` in kernel/memory.bpf.c.
OOM_KILL = np.dtype([
    ("timestamp_ns", "<u8"), ("total_vm_kb", "<u8"), ("anon_rss_kb", "<u8"),
    ("file_rss_kb", "<u8"), ("shmem_rss_kb", "<u8"), ("pid", "<u4"),
    ("oom_score_adj", "<i4"), ("comm", "S16"),
])
_N_RSS = 4
# Mirrors `struct totals`.
_TOTALS = np.dtype([
    ("minor_faults", "<u8"), ("major_faults", "<u8"), ("rss", "<i8", (_N_RSS,)),
    ("mmap_calls", "<u8"), ("mmap_bytes", "<u8"), ("munmap_calls", "<u8"),
    ("munmap_bytes", "<u8"), ("brk_growth", "<i8"), ("brk", "<u8"), ("comm", "S16"),
])
_COUNTS = ("mmap_calls", "mmap_bytes", "munmap_calls", "munmap_bytes", "brk_growth")
_COUNTER_TOTALS_FULL = 1
_MAX_PROCESSES = 8192
_FAULT_PROGRAMS = {"on_minor_fault": PERF_COUNT_SW_PAGE_FAULTS_MIN,
                   "on_major_fault": PERF_COUNT_SW_PAGE_FAULTS_MAJ}
_RSS_MEMBER = re.compile(r'\{\s*(\d+),\s*"MM_(\w+)"\s*\}')
_RSS_NAMES = {"FILEPAGES": "file", "ANONPAGES": "anon", "SWAPENTS": "swap", "SHMEMPAGES": "shmem"}


def rss_members(format_text: str) -> list[str]:
    """``kmem:rss_stat``'s member indices as names (``anon``, ``file``, ``shmem``, ``swap``).

    Read from the tracepoint's format, where the kernel spells out its
    ``MM_*`` counter enum, rather than assumed.
    """
    names = {int(m[1]): _RSS_NAMES.get(m[2]) for m in _RSS_MEMBER.finditer(format_text)}
    if sorted(names) != list(range(_N_RSS)) or None in names.values():
        raise ProbeError("kmem:rss_stat's format does not list the 4 RSS counters "
                         "this version knows; memory tracing needs updating for this kernel")
    return [str(names[i]) for i in range(_N_RSS)]


class MemoryProbe(TracingProbe):
    """Emits cumulative ``MemoryTotals`` per process and an ``OomKill`` per OOM victim."""

    source = "memory.bpf.c"
    record = OOM_KILL
    maps = ("totals",)
    _rss_names: tuple[str, ...] = ()  # read from the tracepoint's format when attaching
    losses: ClassVar[dict[int, str]] = {
        _COUNTER_TOTALS_FULL: f"the table of {_MAX_PROCESSES} processes is full; "
                              "events of processes beyond it were not counted"}

    def cflags(self) -> list[str]:
        return [f"-DMAX_PROCESSES={_MAX_PROCESSES}"]

    def programs(self) -> dict[str, str]:
        return dict.fromkeys(_FAULT_PROGRAMS, "PERF_EVENT")

    async def prepare(self, program: LoadedProgram) -> None:
        fmt = ensure_tracefs() / "events/kmem/rss_stat/format"
        self._rss_names = tuple(rss_members(fmt.read_text()))

    def attach(self, program: LoadedProgram) -> None:
        super().attach(program)
        for name, event in _FAULT_PROGRAMS.items():
            program.attach_perf_event(name, PERF_TYPE_SOFTWARE, event, 1)

    def decode(self, records: np.ndarray) -> list[Event]:
        ts = (records["timestamp_ns"].astype(np.int64) + self.wall_offset_ns).tolist()
        kib = [(records[f] * 1024).tolist()
               for f in ("total_vm_kb", "anon_rss_kb", "file_rss_kb", "shmem_rss_kb")]
        comms = [self.comm(c) for c in records["comm"].tolist()]
        return [OomKill(t, pid, comm, vm, anon, file, shmem, adj)
                for t, pid, comm, vm, anon, file, shmem, adj in zip(
                    ts, records["pid"].tolist(), comms, *kib,
                    records["oom_score_adj"].tolist(), strict=True)]

    def read_totals(self) -> list[Event]:
        keys, totals = self.read_table("totals", PID, _TOTALS)
        comms = [self.comm(c) for c in totals["comm"].tolist()]
        events: list[Event] = []
        for pid, comm, minor, major, rss_values, *counts in zip(
                keys["pid"].tolist(), comms, totals["minor_faults"].tolist(),
                totals["major_faults"].tolist(), totals["rss"].tolist(),
                *(totals[f].tolist() for f in _COUNTS), strict=True):
            rss = dict(zip(self._rss_names, rss_values, strict=True))
            events.append(MemoryTotals(pid, comm, minor, major, rss["anon"], rss["file"],
                                       rss["shmem"], rss["swap"], *counts))
        return events
