"""The profiler's side: finding a process's published region and reading names from it.

Works the same for the profiler's own process and for any other it may
read the memory of (root, or the same user with ptrace allowed): the region
is found by name in ``/proc/PID/maps`` and read through ``/proc/PID/mem``.
"""

from __future__ import annotations

from typing import NamedTuple

from . import region

_MAPS_SUFFIX = f"/memfd:{region.NAME} (deleted)"


class Published(NamedTuple):
    """A process's region: where it is mapped, and its header."""

    address: int
    header: region.Header


def _read(pid: int, address: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(address)
        return mem.read(size)


def find_published(pid: int) -> Published | None:
    """``pid``'s region, or None if it publishes none (or is gone, or unreadable)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            starts = [line.split(b"-", 1)[0] for line in maps
                      if line.rstrip().endswith(_MAPS_SUFFIX.encode())]
        for start in starts:
            address = int(start, 16)
            header = region.parse_header(_read(pid, address, region.HEADER_SIZE))
            if header is not None:
                return Published(address, header)
    except (OSError, ValueError):
        pass
    return None


class Names:
    """Route and method names of one process's region, read once each."""

    def __init__(self, pid: int, address: int) -> None:
        self._pid = pid
        self._address = address
        self._names: dict[int, str] = {0: ""}

    def __call__(self, offset: int) -> str:
        name = self._names.get(offset)
        if name is None:
            if not region.NAMES_START <= offset < region.SIZE:
                return ""
            try:
                raw = _read(self._pid, self._address + offset, region.MAX_NAME + 2)
            except OSError:
                return ""  # gone: not kept, in case the read failed for a passing reason
            name = self._names[offset] = region.decode_name(raw)
        return name
