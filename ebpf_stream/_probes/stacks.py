"""The CPU probe's stack maps: which stacks to read, and when to switch maps.

In: the (stack key, generation) pairs of a batch of samples; out: the
``StackTrace`` and ``PythonStack`` events of the keys not sent lately.  Keys
hash a stack's contents, and the batcher keeps the keys of the last two
epochs it has seen (see ``StackTrace``), so each stack is read from the
kernel at most once in two epochs, however many samples carry it.

The kernel stores stacks in one of two generations of maps and says in each
sample which.  Once the current generation has aged an export interval or
filled half its map, the kernel is switched to the other one, cleared
first: it held the generation before last, whose samples have all been
read by then.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable

from .._base.config import EbpfConfig
from .._bpf.syscalls import BpfMap
from .._model.events import Event, PythonStack, StackTrace
from .python_walker import read_python_stack

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Generations:
    """Which stack keys were sent in which epoch, and when an epoch is over.

    Bookkeeping alone: reading and switching the maps is ``StackMaps``'s.
    """

    def __init__(self, rotate_after_keys: int, rotate_after_ns: int) -> None:
        self.epoch = 0
        self._epoch_start_ns = 0  # CLOCK_MONOTONIC
        self._rotate_after_keys = rotate_after_keys
        self._rotate_after_ns = rotate_after_ns
        # Stack keys (native and Python) -> the epoch each was last sent in.
        self._sent: dict[int, int] = {}
        # Keys seen in the current generation's maps: how full they are.
        self._stored: set[int] = set()

    def start(self, now_ns: int) -> None:
        """The first epoch begins at ``now_ns`` (CLOCK_MONOTONIC)."""
        self._epoch_start_ns = now_ns

    def new_stacks(self, keys: Iterable[tuple[int, int]],
                   read: Callable[[int, int], Event | None]) -> list[Event]:
        """What ``read`` returns for each key of (key, generation) pairs not sent
        this epoch or the last; a key ``read`` finds no stack for is not sent."""
        first: dict[int, int] = {}
        for key, generation in keys:
            if key & 1:  # not NO_STACK, STACK_LOST or "no Python stack"
                first.setdefault(key, generation & 1)
        current = self.epoch & 1
        self._stored.update(key for key, generation in first.items() if generation == current)
        events: list[Event] = []
        for key, generation in first.items():
            if self._sent.get(key, -2) < self.epoch - 1:
                stack = read(key, generation)
                if stack is not None:
                    events.append(stack)
                    self._sent[key] = self.epoch
        return events

    def due(self, now_ns: int) -> bool:
        """Whether the current generation has aged or filled enough to switch."""
        return (now_ns - self._epoch_start_ns >= self._rotate_after_ns
                or len(self._stored) >= self._rotate_after_keys)

    def advance(self, now_ns: int) -> None:
        """Begin the next epoch: keys sent before the last one are due again."""
        self.epoch += 1
        self._epoch_start_ns = now_ns
        self._stored.clear()
        self._sent = {k: e for k, e in self._sent.items() if e >= self.epoch - 1}


class StackMaps:
    """Reads the stacks of new keys from the kernel's maps, and switches generations.

    ``maps`` gives the loaded program's map of a name; ``python`` says
    whether the program keeps Python stacks too.
    """

    def __init__(self, maps: Callable[[str], BpfMap], config: EbpfConfig, python: bool) -> None:
        self._map = maps
        self._python = python
        # Half full leaves the kernel room for the stacks it stores before
        # the reader next looks.
        self.generations = Generations(config.stack_map_entries // 2,
                                       int(config.export_interval_s * 1e9))

    def start(self) -> None:
        self.generations.start(time.monotonic_ns())

    def native(self, keys: Iterable[tuple[int, int]]) -> list[Event]:
        return self.generations.new_stacks(keys, self._read_native)

    def python(self, keys: Iterable[tuple[int, int]]) -> list[Event]:
        return self.generations.new_stacks(keys, self._read_python)

    def rotate_if_due(self) -> bool:
        """Switch the kernel to the other generation's maps if this one is done."""
        now = time.monotonic_ns()
        if not self.generations.due(now):
            return False
        new = (self.generations.epoch + 1) & 1
        self._map(f"stacks_{new}").clear()
        if self._python:
            self._map(f"python_stacks_{new}").clear()
        self._map("generation").update(_U32.pack(0), _U32.pack(new))
        self.generations.advance(now)
        return True

    def _read_native(self, key: int, generation: int) -> StackTrace | None:
        """The ``struct native_stack`` under ``key``; None if the map no longer has it."""
        raw = self._map(f"stacks_{generation}").lookup(_U64.pack(key))
        if raw is None:
            return None
        (depth,) = _U32.unpack_from(raw)
        depth = min(depth, (len(raw) - 8) // 8)
        return StackTrace(key, list(struct.unpack_from(f"<{depth}Q", raw, 8)),
                          self.generations.epoch)

    def _read_python(self, key: int, generation: int) -> PythonStack | None:
        return read_python_stack(self._map(f"python_stacks_{generation}"), key,
                                 self.generations.epoch)
