"""The region a process publishes for whoever profiles it, and its format.

A process that runs ``publish()`` maps a small memfd named
``ebpf-stream-context``; a profiler finds it in ``/proc/PID/maps``, whether
it runs in that process or outside it (the node-agent case: the app only
publishes, a privileged agent reads).  The region holds:

- a header: what the kernel needs to find the running task's request
  (``Header``);
- the names of routes and methods, each written once and then referred to
  by its offset, which is what a sample carries.

The mapping is private: after a fork, each process writes its own names
into its own copy, and an agent reading ``/proc/PID/mem`` sees that copy.
Names are only ever appended, so whatever a sample refers to stays.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

NAME = "ebpf-stream-context"
"""The memfd's name: ``/memfd:ebpf-stream-context (deleted)`` in the maps."""
MAGIC = b"EBPFSCTX"
VERSION = 1
SIZE = 64 * 1024
MAX_NAME = 255  # bytes of one route or method kept

_HEADER = struct.Struct("<8sIIQIIQQQ")
_LENGTH = struct.Struct("<H")
NAMES_START = 128  # after the header, which leaves room for more fields

VALUE = struct.Struct("<16s8sII")
"""A task's request as the kernel copies it: trace id, span id (both big
endian, as their hex reads), and the offsets of its route and method names
in the region (0: none)."""
VALUE_SIZE = VALUE.size
NO_VALUE = bytes(VALUE_SIZE)
"""A value outside any request (all zeros, as the kernel leaves a sample without one)."""


class Header(NamedTuple):
    """What the kernel reads to find a sample's request in this process."""

    var: int  # address of the ContextVar whose value is the request
    var_hash: int  # its 32-bit HAMT hash
    thread_context: int  # offset of PyThreadState.context
    bitmap_type: int
    array_type: int
    bytes_type: int

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, SIZE, self.var, self.var_hash, self.thread_context,
                            self.bitmap_type, self.array_type, self.bytes_type)


HEADER_SIZE = _HEADER.size


def parse_header(raw: bytes) -> Header | None:
    """The header at the start of ``raw``, or None if it is not one this version reads."""
    if len(raw) < _HEADER.size:
        return None
    magic, version, size, *fields = _HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION or size != SIZE:
        return None
    return Header(*fields)


def encode_name(text: str) -> bytes:
    """One name as the region stores it: its length, then UTF-8 (cut at ``MAX_NAME``)."""
    data = text.encode("utf-8", "replace")[:MAX_NAME]
    return _LENGTH.pack(len(data)) + data


def decode_name(raw: bytes) -> str:
    """The name at the start of ``raw`` (``MAX_NAME + 2`` bytes cover any)."""
    if len(raw) < _LENGTH.size:
        return ""
    (length,) = _LENGTH.unpack_from(raw)
    return raw[_LENGTH.size:_LENGTH.size + length].decode("utf-8", "replace")
