"""Syscall names from the table shipped in the package, checked against the running kernel.

On x86-64 a syscall number is ABI: once given, it keeps its call, and new
calls only get new numbers.  So the table in ``_syscall_table.py``, taken
from a recent kernel's uapi header, names every call of every kernel up to
that one, on the first run, in containers and on machines without headers.
Its names are the ABI names that strace, bcc's syscount and the man pages
print (``fstat``, ``uname``), not the names of the kernel functions behind
them (``newfstat``, ``newuname``), which the kernel's tracefs events carry.

A kernel newer than the table may have calls the table lacks; their numbers
read ``syscall_<nr>``.  ``unnamed_syscalls`` finds such calls among the
kernel's ``syscalls:sys_enter_*`` events, so that a run can say so at start.
Learning the missing numbers at run time from those events is not done: it
needs an ftrace instance recording every process's syscalls while the probe
compiles, which slows every syscall on the machine and, with a bounded
buffer, still misses calls.

The table is x86-64's; the syscall probe reads x86-64 registers too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .syscall_table import X86_64

log = logging.getLogger("ebpf_stream")

_ENTER = "sys_enter_"

#: Kernel functions whose name is not their call's ABI name (``syscall_64.tbl``).
_ABI_NAMES = {"newstat": "stat", "newfstat": "fstat", "newlstat": "lstat",
              "newuname": "uname", "umount": "umount2", "sendfile64": "sendfile"}


def syscall_name(nr: int) -> str:
    """The ABI name of x86-64 syscall ``nr``, or ``syscall_<nr>`` for a number
    the table does not have."""
    return X86_64.get(nr) or f"syscall_{nr}"


def unnamed_syscalls(tracefs: Path) -> list[str]:
    """The running kernel's syscalls (by their enter events) that the table does not name."""
    known = set(X86_64.values())
    events = (event.name.removeprefix(_ENTER)
              for event in (tracefs / "events" / "syscalls").glob(f"{_ENTER}*"))
    return sorted(name for name in events if _ABI_NAMES.get(name, name) not in known)


def warn_of_unnamed_syscalls(tracefs: Path) -> None:
    """Say once which of this kernel's syscalls will read ``syscall_<nr>``."""
    unnamed = unnamed_syscalls(tracefs)
    if unnamed:
        log.warning("syscall names: this kernel has %d syscalls newer than ebpf-stream's "
                    "table (%s); they are named syscall_<nr>", len(unnamed), ", ".join(unnamed))
