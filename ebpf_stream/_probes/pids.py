"""What the probes share about the processes they watch: names and per-pid map entries."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .._bpf.loader import LoadedProgram
from .._bpf.syscalls import BpfMap

_U32 = struct.Struct("<I")


class CommNames:
    """Decodes the kernel's 16-byte ``comm`` fields, caching the few distinct ones.

    A field may come with its NUL padding or without (numpy strips it).
    """

    def __init__(self, limit: int = 4096) -> None:
        self._names: dict[bytes, str] = {}
        self._limit = limit

    def __call__(self, raw: bytes) -> str:
        s = self._names.get(raw)
        if s is None:
            if len(self._names) > self._limit:
                self._names.clear()
            s = self._names[raw] = raw.partition(b"\0")[0].decode("utf-8", "replace")
        return s


def process_name(pid: int) -> str | None:
    """``pid``'s name as the kernel keeps it; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return None


def forget_pid_keys(table: BpfMap, pids: set[int]) -> None:
    """Delete the entries of ``table`` whose key starts with one of ``pids`` (a u32)."""
    for key in list(table.walk_keys()):
        if int.from_bytes(key[:4], "little") in pids:
            table.delete(key)


def load_targets(program: LoadedProgram, targets: Iterable[int]) -> None:
    for pid in targets:
        program.map("targets").update(_U32.pack(pid), b"\x01")
