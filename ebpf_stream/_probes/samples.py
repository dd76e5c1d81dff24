"""The CPU ring's records: ``struct sample`` and ``enum kind`` of kernel/cpu_sample.h.

Decoded with ``struct`` rather than numpy: a profile at production rates
carries tens of records a second, and numpy would add some 12 MiB to the
host for them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .._bpf.ringbuf import Records

# `enum kind`
SAMPLE, LOOP_THREAD, LOOP_BLOCKED, LOOP_STALL, PROCESS_EXEC, OFF_CPU_WAIT = range(6)
# Stack fields that hold no key (stack keys are odd).
NO_STACK, STACK_LOST = 0, 2

_LAYOUT = struct.Struct("<QIIIIQQ16sQQQII32s")


class Sample(NamedTuple):
    """One ``struct sample``; ``kind`` says which of the record kinds it is."""

    timestamp_ns: int  # CLOCK_MONOTONIC
    pid: int
    tid: int
    cpu: int
    generation: int  # which stack maps the stack keys refer to
    user_stack: int
    kernel_stack: int
    comm: bytes
    python_stack: int  # 0: none
    busy_since: int  # the loop's busy period this belongs to; 0: none
    duration_ns: int  # LOOP_BLOCKED: time asleep; LOOP_STALL: time busy; OFF_CPU_WAIT: its weight
    kind: int
    state: int  # OFF_CPU_WAIT: the task state it waited in
    request: bytes  # SAMPLE, LOOP_BLOCKED: the published request; zeros: none


SIZE = _LAYOUT.size


def decode(records: Records) -> list[Sample]:
    """The records of one read of the CPU ring, in ring order."""
    return [Sample._make(fields) for fields in records.unpack(_LAYOUT)]
