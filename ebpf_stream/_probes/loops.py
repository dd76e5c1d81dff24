"""The CPU probe's event-loop hooks, and the totals they keep.

In: the loaded CPU program, and word of a loop to watch (an interpreter
found, or a chosen target); out: the hooks of ``kernel/event_loop.h``
attached, once, and each loop thread's cumulative busy-period totals.

The hooks stay detached until there is a loop to watch: they are syscall
tracepoints, and enabling any of those sends every syscall of every process
on the machine down the kernel's slow path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .._bpf.loader import LoadedProgram
from .._bpf.syscalls import BpfMap
from .._model.events import LoopTotals

# One program for the entry to every epoll wait call, one for the return,
# and one on context switches.
_LOOP_WAIT, _LOOP_RETURN = "on_loop_wait", "on_loop_return"
_SWITCH_HOOK = "tracepoint__sched__sched_switch"
_LOOP_CALLS = ("epoll_wait", "epoll_pwait", "epoll_pwait2")
HOOKS = frozenset({_LOOP_WAIT, _LOOP_RETURN, _SWITCH_HOOK})
"""Every hook's program: loaded after the sampling program, attached when wanted."""
PROGRAMS = {_LOOP_WAIT: "TRACEPOINT", _LOOP_RETURN: "TRACEPOINT"}
"""The hooks' programs the loader cannot find by name, by bcc program type."""

_KEY = struct.Struct("<II")  # struct loop_key: pid, tid
_VALUE = 2 + 32  # struct loop_histogram: count, total_ns, LOG2_BUCKETS buckets (u64 each)


class LoopHooks:
    """Attaches the hooks once they are loaded and there is a loop to watch.

    A loop found while the hooks are still being loaded is watched as soon
    as they are.  With ``enabled`` false (loop stalls off) nothing is ever
    attached.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._loaded = False
        self._wanted = False
        self._attached = False

    def watch(self, program: LoadedProgram | None) -> None:
        """There is a loop to watch; ``program`` is None once the probe is closed."""
        self._wanted = True
        self._attach(program)

    def loaded(self, program: LoadedProgram) -> None:
        """The hooks' programs are loaded (``LoadedProgram.load_rest``)."""
        self._loaded = True
        self._attach(program)

    def _attach(self, program: LoadedProgram | None) -> None:
        if (not self.enabled or self._attached or not self._loaded or not self._wanted
                or program is None):
            return
        self._attached = True
        for call in _LOOP_CALLS:
            program.attach_tracepoint(_LOOP_WAIT, "syscalls", f"sys_enter_{call}")
            program.attach_tracepoint(_LOOP_RETURN, "syscalls", f"sys_exit_{call}")
        program.attach_tracepoints(only=[_SWITCH_HOOK])


def read_loop_totals(busy: BpfMap, comm: Callable[[int], str]) -> list[LoopTotals]:
    """Each loop thread's cumulative busy-period histogram, summed over CPUs."""
    totals = []
    for key, raw in busy.items():
        pid, tid = _KEY.unpack(key)
        values = struct.unpack(f"<{len(raw) // 8}Q", raw)
        per_cpu = [sum(values[i::_VALUE]) for i in range(_VALUE)]
        totals.append(LoopTotals(pid, tid, comm(pid), per_cpu[0], per_cpu[1], per_cpu[2:]))
    return totals
