"""Symbols for stripped files, from elsewhere.

A distro library has only ``.dynsym``: its exported functions.  Its local
functions are named by the ``.symtab`` of its separate debug file (Debian's
``*-dbg`` and ``*-dbgsym`` packages), found by build id or by
``.gnu_debuglink``, or else by its ``.gnu_debugdata`` (MiniDebugInfo).  A debug
file has the image's addresses only if it was split from the very same build,
so each candidate must prove it: by the image's build id or debuglink CRC.
"""

from __future__ import annotations

import lzma
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

from .elf import ElfHeaders, FunctionSymbols, Reader, read_symbols

__all__ = ["Origin", "debug_symbols"]

# Where debug packages install separate debug files.
_DEBUG_DIR = "/usr/lib/debug"
# A .gnu_debugdata holds just symbols: far smaller than this unless hostile.
_MAX_DEBUGDATA = 64 << 20

_Check = Callable[[int, ElfHeaders], bool]  # (fd, headers) of a debug file: is it ours?


class Origin(NamedTuple):
    """Where an image was mapped from, to find its debug files by."""

    roots: tuple[str, ...]  # the process's root first (containers), then the host's
    path: str | None  # in the process's mount namespace; None for the vdso


def debug_symbols(reader: Reader, headers: ElfHeaders, origin: Origin) -> list[
        FunctionSymbols]:
    """Function symbols for a stripped image from elsewhere, or []."""
    for path, matches in _debug_files(reader, headers, origin):
        found = _read_debug_file(path, matches)
        if found:
            return found
    return _debugdata_symbols(reader, headers)


def _debug_files(reader: Reader, headers: ElfHeaders, origin: Origin) -> Iterator[
        tuple[str, _Check]]:
    """Where the image's debug file may be, best first, with how to check it."""
    if headers.build_id:
        build_id, hex_id = headers.build_id, headers.build_id.hex()
        for root in origin.roots:
            yield (f"{root}{_DEBUG_DIR}/.build-id/{hex_id[:2]}/{hex_id[2:]}.debug",
                   lambda _, debug: debug.build_id == build_id)
    link = _debuglink(reader, headers)
    if link and origin.path:
        name, crc = link
        directory = os.path.dirname(origin.path)
        for root in origin.roots:
            for path in (f"{root}{_DEBUG_DIR}{directory}/{name}",
                         f"{root}{directory}/.debug/{name}"):
                yield path, lambda fd, _: _crc32(fd) == crc


def _debuglink(reader: Reader, headers: ElfHeaders) -> tuple[str, int] | None:
    """(file name, CRC32) from ``.gnu_debuglink``, if present and well formed."""
    section = headers.section(b".gnu_debuglink")
    if section is None:
        return None
    try:
        data = reader.read(section.offset, section.size)
    except ValueError:
        return None
    name, nul, _ = data.partition(b"\0")
    crc_at = -(-(len(name) + 1) // 4) * 4  # the CRC is 4-byte aligned after the name
    if not name or not nul or b"/" in name or crc_at + 4 > len(data):
        return None
    crc: int = struct.unpack_from("<I", data, crc_at)[0]
    return os.fsdecode(name), crc


def _crc32(fd: int) -> int:
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
        return zlib.crc32(data)


def _read_debug_file(path: str, matches: _Check) -> list[FunctionSymbols]:
    """The function symbols of the debug file at ``path`` if it matches, else []."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        reader = Reader.of_file(fd, os.fstat(fd).st_size)
        headers = ElfHeaders(reader)
        if headers.has_symtab and matches(fd, headers):
            return read_symbols(reader, headers.sections)
    except (OSError, ValueError):  # unreadable or corrupt: as good as absent
        pass
    finally:
        os.close(fd)
    return []


def _debugdata_symbols(reader: Reader, headers: ElfHeaders) -> list[FunctionSymbols]:
    """The function symbols of ``.gnu_debugdata``: an xz-compressed ELF file
    whose ``.symtab`` holds what the image's ``.dynsym`` lacks."""
    section = headers.section(b".gnu_debugdata")
    if section is None:
        return []
    decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ)
    try:
        data = decompressor.decompress(reader.read(section.offset, section.size),
                                       _MAX_DEBUGDATA)
        if not decompressor.eof:  # truncated, or over the limit
            return []
        mini = Reader.of_bytes(data)
        return read_symbols(mini, ElfHeaders(mini).sections)
    except (ValueError, lzma.LZMAError):
        return []
