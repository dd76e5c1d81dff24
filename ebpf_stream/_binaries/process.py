"""A process's executable mappings, as ``/proc/PID/maps`` lists them, and the
files behind them.

Maps are read once per pid and re-read only on a miss (a ``dlopen``), at
most every so often: see :meth:`Process.refresh`.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_right

from .._model.profile import ProcessInfo
from .containers import container_of, namespace_pid
from .symbol_table import ElfImage

__all__ = ["UNKNOWN", "Mapping", "Process", "open_mapped_file", "read_mappings", "roots"]

# The module of an address that no mapping holds.
UNKNOWN = "[unknown]"
_DELETED = " (deleted)"
# A miss in the cached maps re-reads them (dlopen), but at most this often: a
# JIT process misses on every JIT frame and its maps can be thousands of lines,
# and an interpreter without frame pointers leaves stack words that are no code
# address at all.  Each re-read that finds the maps unchanged doubles the wait,
# up to the second figure; a change brings it back to the first.
MAPS_REFRESH_S = 0.5
MAPS_REFRESH_MAX_S = 8.0


class Mapping:
    """One executable, file-backed mapping of a process."""

    __slots__ = ("basename", "bias", "deleted", "end", "identity", "image", "inode", "loaded",
                 "module", "offset", "range", "start")

    def __init__(self, fields: list[str]) -> None:
        self.range = fields[0]
        start, end = self.range.split("-")
        self.start = int(start, 16)
        self.end = int(end, 16)
        self.offset = int(fields[2], 16)
        self.inode = int(fields[4])
        path = fields[5]
        self.deleted = path.endswith(_DELETED)
        self.module = path.removesuffix(_DELETED)
        self.basename = os.path.basename(self.module)
        self.identity = (self.range, self.offset, self.inode, path)
        self.loaded = False
        self.image: ElfImage | None = None
        self.bias = self.start - self.offset  # vaddr = address - bias

    def attach(self, image: ElfImage) -> None:
        self.image = image
        self.bias = self.start - self.offset - image.headers.vaddr_delta(self.offset)


def read_mappings(pid: int) -> list[Mapping]:
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    mappings = []
    for line in lines:
        fields = line.split(None, 5)
        # Anonymous code (JIT, "[anon:...]") has no file to take symbols from.
        if len(fields) == 6 and fields[1][2] == "x" and not fields[5].startswith("[anon"):
            mappings.append(Mapping(fields))
    return mappings


def _identity(pid: int) -> tuple[str, str]:
    """(executable file name, command line) of ``pid``; empty where unreadable."""
    try:
        executable = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        executable = ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        raw = b""
    return executable, raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


class Process:
    """A pid's identity and executable mappings, as last read from /proc."""

    __slots__ = ("_starts", "info", "mappings", "read_at", "read_every")

    def __init__(self, pid: int) -> None:
        self.mappings: list[Mapping] = []
        self._starts: list[int] = []
        self.read_every = MAPS_REFRESH_S
        self.read(pid)

    def read(self, pid: int) -> None:
        """(Re-)read identity and maps, keeping the loaded ELF of unchanged mappings.

        Re-read together because a refresh usually follows an exec, which
        changes the name and command line as well as the maps.  Raises
        OSError, leaving this unchanged, if the process is gone.
        """
        self.read_at = time.monotonic()
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            comm = f.read().rstrip("\n")
        known = {m.identity: m for m in self.mappings}
        mappings = [known.get(m.identity, m) for m in read_mappings(pid)]
        unchanged = [m.identity for m in mappings] == list(known)
        self.read_every = (min(2 * self.read_every, MAPS_REFRESH_MAX_S) if unchanged
                           else MAPS_REFRESH_S)
        self.mappings = mappings
        self._starts = [m.start for m in self.mappings]
        container = container_of(pid)
        inside = namespace_pid(pid)
        self.info = ProcessInfo(pid, comm, *_identity(pid),
                                container.id if container else "",
                                container.pod_uid if container else "",
                                inside if inside != pid else 0)

    def refresh(self, pid: int) -> bool:
        """Re-read the maps of ``pid`` unless read very recently; True if re-read."""
        if time.monotonic() - self.read_at < self.read_every:
            return False
        try:
            self.read(pid)
        except OSError:  # exited: keep resolving with what we have
            return False
        return True

    def find(self, address: int) -> Mapping | None:
        i = bisect_right(self._starts, address) - 1
        if i >= 0 and address < self.mappings[i].end:
            return self.mappings[i]
        return None


def roots(pid: int) -> tuple[str, ...]:
    """Where to look for files named by a process's paths: its root, then ours."""
    return (f"/proc/{pid}/root", "")


def open_mapped_file(pid: int, mapping: Mapping) -> int | None:
    """Open the file behind a mapping, or None.

    ``map_files`` reaches deleted files and other mount namespaces.  The path
    fallbacks must be the same inode, or they could be a different file now.
    """
    try:
        return os.open(f"/proc/{pid}/map_files/{mapping.range}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        if mapping.deleted:
            return None
    for root in roots(pid):
        try:
            fd = os.open(f"{root}{mapping.module}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        if os.fstat(fd).st_ino == mapping.inode:
            return fd
        os.close(fd)
    return None
