"""Reading another process's memory through ``/proc/PID/mem``.

A read of memory that is unmapped, or of a process that has exited, fails
instead of returning garbage, which is what makes it safe to follow pointers
that the target may have freed since the kernel saw them.
"""

from __future__ import annotations

import os
import struct
from types import TracebackType

_U64 = struct.Struct("<Q")
# pread takes a signed 64-bit offset: higher addresses cannot be user memory anyway.
_MAX_ADDRESS = (1 << 63) - 1


class MemoryReadError(OSError):
    """Part of the requested range could not be read: unmapped, or the process is gone."""


class ProcessMemory:
    """A process's address space, read with pread on one kept fd.

    Opening needs ptrace access to the process (root, or the same user
    without Yama restrictions); a failure raises OSError.
    """

    __slots__ = ("_fd", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at ``address``; raises MemoryReadError unless all were read."""
        if address < 0 or size < 0 or address + size > _MAX_ADDRESS:
            raise MemoryReadError(f"address 0x{address:x} is not a user address")
        try:
            data = os.pread(self._fd, size, address)
        except OSError as e:
            raise MemoryReadError(
                f"cannot read {size} bytes at 0x{address:x} in process {self.pid}: "
                f"{e.strerror}") from None
        if len(data) != size:
            raise MemoryReadError(
                f"short read at 0x{address:x} in process {self.pid}: {len(data)} of {size} "
                "bytes (the process may have exited)")
        return data

    def u64(self, address: int) -> int:
        value: int = _U64.unpack(self.read(address, 8))[0]
        return value

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
