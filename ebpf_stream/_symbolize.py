"""Symbolization: raw BPF stack addresses to :class:`Frame` objects.

Kernel addresses resolve against ``/proc/kallsyms``.  User addresses resolve
against the ELF symbol tables of the files a process maps, read by a small
ELF64 reader of our own: symbolization needs only headers, symbol tables and
the build id, and owning the reader keeps bcc and pyelftools out of it.  A
stripped file (a distro library has only ``.dynsym``) also takes the ``.symtab``
of its separate debug file, found by build id or ``.gnu_debuglink``, or else
of its ``.gnu_debugdata``, so its local functions resolve by name too.

Everything expensive is cached, and every cache is bounded: ELF symbol tables
by build id (libc is parsed once for all processes), process maps per pid, and
finished frames per (ELF, address).  A Symbolizer is not thread-safe: one
collector thread owns it.
"""

from __future__ import annotations

import lzma
import mmap
import os
import struct
import sys
import time
import zlib
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from functools import partial
from typing import Any, BinaryIO, Generic, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from ._profile import Frame, FrameKind, ProcessInfo

__all__ = ["KernelSymbols", "Symbolizer"]

_KERNEL = "[kernel.kallsyms]"
_UNKNOWN = "[unknown]"
_VDSO = "[vdso]"
_DELETED = " (deleted)"

# kallsyms types of code symbols; the rest (data, rodata, bss) only bound them.
_TEXT_TYPES = np.frombuffer(b"tTwW", np.uint8)
# How far a symbol without a size may reach.  Functions are smaller than this,
# and it stops addresses far past the last symbol of a region resolving to it.
_MAX_UNSIZED = np.uint64(1 << 16)
# kallsyms is read and parsed this many bytes (some 5k lines) at a time, which
# keeps the transient arrays of its vectorized parse small.
_KALLSYMS_BLOCK = 1 << 18
# A kernel built with call padding names the padding before each function foo
# __pfx_foo: half its symbols.  Such a pair stores its name bytes once.
_PFX = b"__pfx_"
# Names kept compressed, this many to a block: stacks hit a few hundred of
# over 100k names, and inflating a block of them takes some 20 us.
_NAME_BLOCK = 256
_ADDR_MAX = np.uint64(2**64 - 1)
# A miss in the cached maps re-reads them (dlopen), but at most this often: a
# JIT process misses on every JIT frame and its maps can be thousands of lines,
# and an interpreter without frame pointers leaves stack words that are no code
# address at all.  Each re-read that finds the maps unchanged doubles the wait,
# up to the second figure; a change brings it back to the first.
_MAPS_REFRESH_S = 0.5
_MAPS_REFRESH_MAX_S = 8.0
# Cached ELF images (two entries each: by file and by build id); mappings in use
# keep theirs alive regardless.
_MAX_IMAGES = 1024

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")
_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                 ("value", "<u8"), ("size", "<u8")])
_SHT_SYMTAB, _SHT_NOTE, _SHT_DYNSYM = 2, 7, 11
_PT_LOAD, _PT_NOTE = 1, 4
_PF_X = 1
_STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC = 1, 2, 10
_STB_GLOBAL, _STB_WEAK = 1, 2
_NT_GNU_BUILD_ID = 3
_SHN_XINDEX = 0xFFFF
# Where debug packages (Debian's *-dbg and *-dbgsym) install separate debug files.
_DEBUG_DIR = "/usr/lib/debug"
# A .gnu_debugdata holds just symbols: far smaller than this unless hostile.
_MAX_DEBUGDATA = 64 << 20

_K = TypeVar("_K")
_V = TypeVar("_V")
_U64 = npt.NDArray[np.uint64]
_ImageKey = tuple[object, ...]
# The function symbols of one symbol table, with its string table.
_Symbols = tuple[npt.NDArray[np.void], bytes]


class _Lru(Generic[_K, _V]):
    """A dict that forgets its least recently used entries beyond ``capacity``."""

    __slots__ = ("_capacity", "_data")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._data: OrderedDict[_K, _V] = OrderedDict()

    def get(self, key: _K) -> _V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self._capacity:
            self._data.popitem(last=False)

    def pop(self, key: _K) -> None:
        self._data.pop(key, None)


class _Ranges:
    """Symbol address ranges sorted by start, searched in bulk with numpy."""

    __slots__ = ("_lengths", "_starts")

    def __init__(self, starts: _U64, lengths: npt.NDArray[np.unsignedinteger]) -> None:
        self._starts = starts
        self._lengths = lengths

    def find(self, addresses: _U64) -> list[int]:
        """The index of the range holding each address, or -1."""
        if not len(self._starts):
            return [-1] * len(addresses)
        index = np.searchsorted(self._starts, addresses, side="right").astype(np.intp) - 1
        inside = (index >= 0) & (addresses - self._starts[index] < self._lengths[index])
        found: list[int] = np.where(inside, index, -1).tolist()
        return found


def _reach(starts: _U64, boundaries: _U64) -> _U64:
    """How far each symbol without a size reaches: to the next boundary, but at
    most ``_MAX_UNSIZED``.  ``boundaries`` is sorted and ends with ``_ADDR_MAX``."""
    reach: _U64 = boundaries[np.searchsorted(boundaries[:-1], starts, side="right")]
    reach -= starts
    return np.minimum(reach, _MAX_UNSIZED, out=reach)


def _first_per_address(addresses: _U64, *preferences: npt.NDArray[np.integer]) -> npt.NDArray[
        np.intp]:
    """Indices that sort ``addresses``, keeping one symbol per address: the one
    lowest in ``preferences`` (most significant first), then the first listed."""
    # A stable sort is fast on addresses that come nearly sorted, as they
    # usually do; only the few aliases are then ordered by preference.
    order = np.argsort(addresses, kind="stable")
    ordered = addresses[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    del ordered  # big for kallsyms: freed before the result is made
    aliased = ~first
    aliased[:-1] |= ~first[1:]
    if aliased.any():
        tied = order[aliased]
        order[aliased] = tied[np.lexsort((*(p[tied] for p in reversed(preferences)),
                                          addresses[tied]))]
    return order[first]


def _underscores(chars: npt.NDArray[np.uint8], name_starts: npt.NDArray[np.integer]) -> (
        npt.NDArray[np.int8]):
    """How many of the first two characters of each NUL- or newline-ended name are '_'."""
    first = chars[name_starts] == ord("_")
    second = first & (chars[name_starts + 1] == ord("_"))
    count: npt.NDArray[np.int8] = first.astype(np.int8) + second
    return count


def _lookup_addresses(addresses: Sequence[int]) -> _U64:
    """Addresses to look up: every frame but the leaf holds a return address,
    which may already lie past the end of the calling function."""
    lookup = np.array(addresses, dtype=np.uint64)
    lookup[1:] -= np.uint64(1)
    return lookup


def _gather(chars: npt.NDArray[np.uint8], starts: npt.NDArray[np.intp],
            lengths: npt.NDArray[np.intp]) -> npt.NDArray[np.uint8]:
    """The spans ``chars[start:start + length]``, sorted and disjoint, concatenated."""
    runs = np.empty(2 * len(starts) + 1, dtype=np.intp)  # skipped, kept, skipped, ...
    runs[0::2] = np.append(starts, len(chars)) - np.append(0, starts + lengths)
    runs[1::2] = lengths
    spans: npt.NDArray[np.uint8] = chars[np.repeat(np.arange(len(runs)) % 2 == 1, runs)]
    return spans


def _runs(values: npt.NDArray[np.integer]) -> npt.NDArray[np.intp]:
    """Where each run of equal ``values`` starts."""
    starts = np.ones(len(values), dtype=bool)
    starts[1:] = values[1:] != values[:-1]
    return np.flatnonzero(starts)


def _unprefixed(words: _U64, name_starts: npt.NDArray[np.intp],
                lengths: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
    """Which names are the previous name without its "__pfx_", compared eight
    bytes at a time: ``words[i]`` holds the text's bytes i to i + 7, little-endian."""
    after = np.flatnonzero(lengths[:-1] == lengths[1:] + len(_PFX))
    prefix = np.uint64((1 << 8 * len(_PFX)) - 1)
    after = after[words[name_starts[after]] & prefix == int.from_bytes(_PFX, "little")]
    a, b, length = name_starts[after] + len(_PFX), name_starts[after + 1], lengths[after + 1]
    counts = (length + 7) // 8
    pair = np.repeat(np.arange(len(after)), counts)
    at = 8 * (np.arange(len(pair)) - (np.cumsum(counts) - counts)[pair])
    beyond = (8 * np.maximum(8 - (length[pair] - at), 0)).astype(np.uint64)
    differ = (words[a[pair] + at] ^ words[b[pair] + at]) << beyond  # drops bytes past the name
    same = np.ones(len(after), dtype=bool)
    same[pair[differ != 0]] = False
    unprefixed = np.zeros(len(lengths), dtype=bool)
    unprefixed[after[same] + 1] = True
    return unprefixed


class _KallsymsBlock(NamedTuple):
    """The code symbols of a block of kallsyms lines, in file order."""

    addresses: _U64
    local: npt.NDArray[np.bool_]
    underscores: npt.NDArray[np.int8]
    name_lengths: npt.NDArray[np.int32]
    name_at: npt.NDArray[np.uint32]  # into the block's names
    module_runs: npt.NDArray[np.intp]  # where the symbols of each module start
    run_modules: npt.NDArray[np.int32]  # the module of each run; 0: none
    data: _U64  # the addresses of the other symbols: they end the code before them


def _kallsyms_blocks(stream: BinaryIO) -> Iterator[bytes]:
    """``stream`` in blocks of whole lines, each ending with a newline."""
    while block := stream.read(_KALLSYMS_BLOCK):
        block += stream.readline()
        yield block if block.endswith(b"\n") else block + b"\n"


def _parse_kallsyms_block(block: bytes, width: int,
                          modules: dict[bytes, int]) -> tuple[_KallsymsBlock, bytes]:
    """The code symbols of ``block`` and their NUL-ended names; modules are
    numbered in ``modules``."""
    # Padded so that the hex digits and the words at any offset are views.
    padded = block + bytes(16)
    chars = np.frombuffer(padded, np.uint8)
    buf = chars[:len(block)]
    line_ends = np.flatnonzero(buf == ord("\n"))
    starts = np.concatenate(([0], line_ends[:-1] + 1))
    long_enough = line_ends - starts > width + 3
    starts, line_ends = starts[long_enough], line_ends[long_enough]
    valid = (buf[starts + width] == ord(" ")) & (buf[starts + width + 2] == ord(" "))
    starts, line_ends = starts[valid], line_ends[valid]
    digits = sliding_window_view(chars, width)[starts].tobytes().decode("ascii")
    addresses = np.frombuffer(bytes.fromhex(digits), f">u{width // 2}").astype(np.uint64)
    kinds = buf[starts + width + 1]
    text = np.isin(kinds, _TEXT_TYPES) & (addresses != 0)  # 0: hidden by kptr_restrict
    data = addresses[~text & (addresses != 0)]
    addresses, kinds, line_ends = addresses[text], kinds[text], line_ends[text]
    name_starts = starts[text] + width + 3
    tabs = np.flatnonzero(buf == ord("\t"))
    name_ends = np.minimum(np.append(tabs, len(buf))[np.searchsorted(tabs, name_starts)],
                           line_ends)
    lengths = name_ends - name_starts
    module_ids = np.zeros(len(addresses), dtype=np.int32)
    tabbed = np.flatnonzero(name_ends < line_ends)  # few lines: those of modules
    module_ids[tabbed] = [
        modules.setdefault(block[tab + 1:end], len(modules))
        for tab, end in zip(name_ends[tabbed].tolist(), line_ends[tabbed].tolist(), strict=True)]
    module_runs = _runs(module_ids)
    # Each name takes its bytes and a NUL, unless it lies within the one before.
    shared = _unprefixed(np.ndarray((len(block),), "<u8", padded, strides=(1,)), name_starts,
                         lengths)
    stored = np.where(shared, 0, lengths + 1)
    ends = np.cumsum(stored)
    owner = np.maximum.accumulate(np.where(shared, 0, np.arange(len(lengths))))
    name_at = (ends - stored)[owner] + len(_PFX) * (np.arange(len(lengths)) - owner)
    names = _gather(buf, name_starts[~shared], stored[~shared])
    names[ends[~shared] - 1] = 0  # was the tab or newline after the name
    return _KallsymsBlock(
        addresses, kinds >= ord("a"), _underscores(buf, name_starts), lengths.astype(np.int32),
        name_at.astype(np.uint32), module_runs, module_ids[module_runs], data), names.tobytes()


class _Kallsyms:
    """The code symbols of kallsyms, compact.

    kallsyms has over 100k lines.  They are parsed vectorized a block at a
    time, to keep transient arrays small, and only what lookups need is kept:
    per address one symbol's start and length, the names in compressed blocks
    (a block is inflated, and a name decoded, only for symbols that stacks
    hit), and modules as runs of symbols.  That is some 2 MB in a host's
    memory, where the names alone would take 2.3 MB.
    """

    __slots__ = ("_module_runs", "_names", "_resolved", "_run_modules", "ranges")

    def __init__(self, stream: BinaryIO) -> None:
        modules = {b"": 0}
        columns: list[list[Any]] = [[] for _ in _KallsymsBlock._fields]
        names = bytearray()
        symbols = 0
        blocks = _kallsyms_blocks(stream)
        block = next(blocks, b"")
        # "ADDRESS TYPE NAME[\t[MODULE]]", addresses zero-padded to one width:
        # the hex of a u1, u2, u4 or u8.
        width = block.find(b" ")
        if width not in (2, 4, 8, 16):
            raise ValueError("kallsyms is not in the expected format")
        while block:
            part, part_names = _parse_kallsyms_block(block, width, modules)
            part.name_at[:] += len(names)
            part.module_runs[:] += symbols
            for column, array in zip(columns, part, strict=True):
                column.append(array)
            names += part_names
            symbols += len(part.addresses)
            block = next(blocks, b"")
        starts, name_at, module_ids, data = _kept_symbols(columns)
        self._names = _compressed_names(bytes(names), name_at)
        del names
        self._module_runs = _runs(module_ids)
        module_names = [sys.intern(raw.decode(errors="replace")) if raw else _KERNEL
                        for raw in modules]
        self._run_modules = [module_names[i] for i in module_ids[self._module_runs].tolist()]
        boundaries = np.concatenate((data, starts, [_ADDR_MAX]))
        boundaries.sort()
        self.ranges = _Ranges(starts, _reach(starts, boundaries).astype(np.uint32))
        self._resolved: dict[int, tuple[str, str]] = {}

    def symbol(self, index: int) -> tuple[str, str]:
        """(name, module) of the symbol at ``index`` of :attr:`ranges`."""
        found = self._resolved.get(index)
        if found is None:
            block, at = divmod(index, _NAME_BLOCK)
            name = zlib.decompress(self._names[block]).split(b"\0")[at]
            run = int(np.searchsorted(self._module_runs, index, side="right")) - 1
            found = self._resolved[index] = (name.decode(errors="replace"),
                                             self._run_modules[run])
        return found


def _compressed_names(blob: bytes, name_at: npt.NDArray[np.uint32]) -> list[bytes]:
    """The NUL-ended names at ``name_at`` in ``blob``, in that order, compressed
    ``_NAME_BLOCK`` names to a block.

    Names may overlap in the blob (``__pfx_foo`` holds ``foo``), so each
    block gathers its names by index.
    """
    chars = np.frombuffer(blob, np.uint8)
    nuls = np.flatnonzero(chars == 0)
    ends = nuls[np.searchsorted(nuls, name_at)] + 1  # through the NUL
    blocks = []
    for first in range(0, len(name_at), _NAME_BLOCK):
        starts = name_at[first:first + _NAME_BLOCK].astype(np.intp)
        lengths = ends[first:first + _NAME_BLOCK] - starts
        at = np.cumsum(lengths) - lengths  # where each goes in the block
        index = np.arange(int(lengths.sum())) - np.repeat(at - starts, lengths)
        blocks.append(zlib.compress(chars[index].tobytes(), 1))
    return blocks


def _kept_symbols(columns: list[list[Any]]) -> tuple[
        _U64, npt.NDArray[np.uint32], npt.NDArray[np.int32], _U64]:
    """The start, name and module of one code symbol per address, sorted, and the
    addresses of data symbols, from the columns of :class:`_KallsymsBlock`."""
    (addresses, local, underscores, name_lengths, name_at, module_runs, run_modules,
     data) = (_join(column) for column in columns)  # each block's arrays freed when joined
    # Aliases share an address: prefer a global name, then the plainest.
    keep = _first_per_address(addresses, local, underscores, name_lengths)
    modules = run_modules[np.searchsorted(module_runs, keep, side="right") - 1]
    return addresses[keep], name_at[keep], modules, data


def _join(arrays: list[Any]) -> npt.NDArray[Any]:
    """``arrays`` concatenated, which empties the list."""
    joined = np.concatenate(arrays)
    arrays.clear()
    return joined


class KernelSymbols:
    """Kernel text symbols from kallsyms, parsed on first use.

    Without a readable kallsyms every kernel frame is ``[kernel.kallsyms]+0x...``.
    """

    def __init__(self, path: str = "/proc/kallsyms") -> None:
        self._path = path
        self._loaded = False
        self._table: _Kallsyms | None = None

    def load(self) -> None:
        """Parse kallsyms now, if not yet done."""
        if not self._loaded:
            self._loaded = True
            try:
                with open(self._path, "rb") as f:
                    self._table = _Kallsyms(f)
            except (OSError, ValueError):  # unreadable or unparsable: addresses only
                pass

    def resolve(self, addresses: Sequence[int]) -> tuple[Frame, ...]:
        """Frames for a kernel stack, leaf first, in the order given."""
        if not addresses:
            return ()
        self.load()
        table = self._table
        found = (table.ranges.find(_lookup_addresses(addresses)) if table
                 else [-1] * len(addresses))
        frames = []
        for address, index in zip(addresses, found, strict=True):
            if table and index >= 0:
                name, module = table.symbol(index)
                frames.append(Frame(name, module, FrameKind.KERNEL, address))
            else:
                frames.append(Frame(f"{_KERNEL}+0x{address:x}", _KERNEL, FrameKind.KERNEL,
                                    address))
        return tuple(frames)


class _Reader:
    """Bounds-checked reads of an ELF image, from a file or from memory."""

    __slots__ = ("_pread", "_size")

    def __init__(self, pread: Callable[[int, int], bytes], size: int) -> None:
        self._pread = pread  # (length, offset) -> bytes, as os.pread takes them
        self._size = size

    @classmethod
    def of_file(cls, fd: int, size: int) -> _Reader:
        return cls(partial(os.pread, fd), size)

    @classmethod
    def of_bytes(cls, data: bytes) -> _Reader:
        return cls(lambda length, offset: data[offset:offset + length], len(data))

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError("ELF structure lies outside the file")
        data = self._pread(length, offset)
        if len(data) != length:
            raise ValueError("short read of an ELF file")
        return data


class _Section(NamedTuple):
    name: bytes
    type: int
    offset: int
    size: int
    link: int
    align: int


class _Segment(NamedTuple):
    offset: int
    vaddr: int
    filesz: int
    executable: bool


class _ElfHeaders:
    """What an ELF64 file says about itself before its symbols are read."""

    __slots__ = ("build_id", "has_symtab", "loads", "sections")

    def __init__(self, reader: _Reader) -> None:
        (ident, _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
         shstrndx) = _EHDR.unpack(reader.read(0, _EHDR.size))
        if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
            raise ValueError("not a little-endian ELF64 file")
        if (phnum and phentsize != _PHDR.size) or (shnum and shentsize != _SHDR.size):
            raise ValueError("unexpected ELF header sizes")
        if shoff and not shnum:  # extended numbering: the count is in section 0
            shnum = _SHDR.unpack(reader.read(shoff, _SHDR.size))[5]
        headers = list(_SHDR.iter_unpack(reader.read(shoff, shnum * _SHDR.size)))
        if shstrndx == _SHN_XINDEX and headers:  # extended numbering again
            shstrndx = headers[0][6]
        names = (reader.read(headers[shstrndx][4], headers[shstrndx][5])
                 if 0 < shstrndx < len(headers) else b"")
        self.sections = [
            _Section(names[h[0]:].partition(b"\0")[0], h[1], h[4], h[5], h[6], h[8])
            for h in headers]
        programs = list(_PHDR.iter_unpack(reader.read(phoff, phnum * _PHDR.size)))
        # Executable segments first: a code mapping must match one of them.
        self.loads = sorted(
            (_Segment(p[2], p[3], p[5], bool(p[1] & _PF_X)) for p in programs
             if p[0] == _PT_LOAD),
            key=lambda s: not s.executable)
        self.has_symtab = any(s.type == _SHT_SYMTAB for s in self.sections)
        notes = [(s.offset, s.size, s.align) for s in self.sections if s.type == _SHT_NOTE]
        notes += [(p[2], p[5], p[7]) for p in programs if p[0] == _PT_NOTE]
        self.build_id = next(
            (found for offset, size, align in notes
             if (found := _build_id(reader.read(offset, size), 8 if align == 8 else 4))),
            None)

    def section(self, name: bytes) -> _Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def vaddr_delta(self, file_offset: int) -> int:
        """``vaddr - file offset`` within the PT_LOAD mapped at ``file_offset``."""
        for seg in self.loads:
            if seg.offset - seg.offset % mmap.PAGESIZE <= file_offset < seg.offset + seg.filesz:
                return seg.vaddr - seg.offset
        return 0


def _build_id(notes: bytes, align: int) -> bytes | None:
    """The GNU build id among ELF notes, whose fields are padded to ``align``."""
    position = 0
    while position + _NHDR.size <= len(notes):
        name_size, desc_size, note_type = _NHDR.unpack_from(notes, position)
        name_at = position + _NHDR.size
        desc_at = name_at + -(-name_size // align) * align
        if (note_type == _NT_GNU_BUILD_ID and notes[name_at:name_at + name_size] == b"GNU\0"
                and desc_at + desc_size <= len(notes)):
            return notes[desc_at:desc_at + desc_size]
        position = desc_at + -(-desc_size // align) * align
    return None


def _read_symbols(reader: _Reader, sections: list[_Section]) -> list[_Symbols]:
    """The function symbols of each symbol table of an ELF file."""
    found = []
    for section in sections:
        if section.type not in (_SHT_SYMTAB, _SHT_DYNSYM) or section.link >= len(sections):
            continue
        strtab = sections[section.link]
        symbols = np.frombuffer(
            reader.read(section.offset, section.size - section.size % _SYM.itemsize), _SYM)
        kind = symbols["info"] & 0xF
        symbols = symbols[((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC))
                          & (symbols["value"] != 0) & (symbols["shndx"] != 0)
                          & (symbols["name"] != 0) & (symbols["name"] < strtab.size)]
        found.append((symbols, reader.read(strtab.offset, strtab.size)))
    return found


def object_symbols(reader: _Reader, headers: _ElfHeaders, names: Collection[str]) -> dict[
        str, int]:
    """ELF virtual addresses of the named data objects a file exports (defined
    ``STT_OBJECT`` symbols of ``.dynsym``); names not exported are left out."""
    found: dict[str, int] = {}
    for section in headers.sections:
        if section.type != _SHT_DYNSYM or section.link >= len(headers.sections):
            continue
        strtab = headers.sections[section.link]
        strings = reader.read(strtab.offset, strtab.size)
        symbols = np.frombuffer(
            reader.read(section.offset, section.size - section.size % _SYM.itemsize), _SYM)
        symbols = symbols[((symbols["info"] & 0xF) == _STT_OBJECT) & (symbols["shndx"] != 0)]
        for name in names:
            if name in found:
                continue
            # Where the string table reads the name: linkers share tails of
            # strings, so it may end another one, and may be there more than once.
            raw = os.fsencode(name) + b"\0"
            name_at = []
            at = strings.find(raw)
            while at >= 0:
                name_at.append(at)
                at = strings.find(raw, at + 1)
            match = symbols["value"][np.isin(symbols["name"], name_at)]
            if len(match):
                found[name] = int(match[0])
    return found


class _Origin(NamedTuple):
    """Where an image was mapped from, to find its debug files by."""

    roots: tuple[str, ...]  # the process's root first (containers), then the host's
    path: str | None  # in the process's mount namespace; None for the vdso


def _debug_symbols(reader: _Reader, headers: _ElfHeaders, origin: _Origin) -> list[_Symbols]:
    """Function symbols for a stripped image from elsewhere, or [].

    A debug file has the image's addresses, but only if it was split from the
    very same build: it must carry the image's build id or debuglink CRC.
    """
    for path, matches in _debug_files(reader, headers, origin):
        found = _read_debug_file(path, matches)
        if found:
            return found
    return _debugdata_symbols(reader, headers)


_Check = Callable[[int, _ElfHeaders], bool]  # (fd, headers) of a debug file: is it ours?


def _debug_files(reader: _Reader, headers: _ElfHeaders, origin: _Origin) -> Iterator[
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


def _debuglink(reader: _Reader, headers: _ElfHeaders) -> tuple[str, int] | None:
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


def _read_debug_file(path: str, matches: _Check) -> list[_Symbols]:
    """The function symbols of the debug file at ``path`` if it matches, else []."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        reader = _Reader.of_file(fd, os.fstat(fd).st_size)
        headers = _ElfHeaders(reader)
        if headers.has_symtab and matches(fd, headers):
            return _read_symbols(reader, headers.sections)
    except (OSError, ValueError):  # unreadable or corrupt: as good as absent
        pass
    finally:
        os.close(fd)
    return []


def _debugdata_symbols(reader: _Reader, headers: _ElfHeaders) -> list[_Symbols]:
    """The function symbols of ``.gnu_debugdata`` (MiniDebugInfo): an xz-compressed
    ELF file whose ``.symtab`` holds what the image's ``.dynsym`` lacks."""
    section = headers.section(b".gnu_debugdata")
    if section is None:
        return []
    decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ)
    try:
        data = decompressor.decompress(reader.read(section.offset, section.size),
                                       _MAX_DEBUGDATA)
        if not decompressor.eof:  # truncated, or over the limit
            return []
        mini = _Reader.of_bytes(data)
        return _read_symbols(mini, _ElfHeaders(mini).sections)
    except (ValueError, lzma.LZMAError):
        return []


class _SymbolTable:
    """Function symbols of one ELF file (.symtab and .dynsym, and those of its
    debug file, merged).

    Names stay in the string tables until looked up: a binary has far more
    symbols than a profile ever hits, so parsing is all numpy.
    """

    __slots__ = ("_names", "_ranges", "_strings")

    def __init__(self, sources: Sequence[_Symbols]) -> None:
        names: list[npt.NDArray[np.uint64]] = []
        base = 0
        for symbols, strings in sources:
            names.append(symbols["name"].astype(np.uint64) + np.uint64(base))
            base += len(strings) + 1
        merged = np.concatenate([symbols for symbols, _ in sources]) if sources else np.empty(
            0, _SYM)
        name_at = np.concatenate(names) if names else np.empty(0, np.uint64)
        self._strings = b"".join(strings + b"\0" for _, strings in sources)
        chars = np.frombuffer(self._strings, np.uint8)
        nuls = np.flatnonzero(chars == 0)
        lengths = nuls[np.searchsorted(nuls, name_at)] - name_at
        binding = merged["info"] >> 4
        rank = np.where(binding == _STB_GLOBAL, 0, np.where(binding == _STB_WEAK, 1, 2))
        # Aliases share an address: prefer a sized, global name, then the plainest
        # (write over __write, frexp over frexpf64).
        keep = _first_per_address(merged["value"], merged["size"] == 0, rank,
                                  _underscores(chars, name_at), lengths)
        starts: _U64 = merged["value"][keep]
        sizes = merged["size"][keep]
        self._ranges = _Ranges(starts, np.where(
            sizes > 0, sizes, _reach(starts, np.append(starts, _ADDR_MAX))))
        self._names = name_at[keep]

    def name(self, vaddr: int) -> str | None:
        if vaddr < 0:
            return None
        (index,) = self._ranges.find(np.array([vaddr], dtype=np.uint64))
        if index < 0:
            return None
        start = int(self._names[index])
        return self._strings[start:self._strings.index(b"\0", start)].decode(errors="replace")


class _ElfImage:
    """A parsed ELF file, shared by every mapping of it in every process."""

    __slots__ = ("has_symtab", "headers", "key", "symbols")

    def __init__(self, key: _ImageKey, reader: _Reader, headers: _ElfHeaders,
                 origin: _Origin) -> None:
        self.key = key
        self.headers = headers
        # A file's own .symtab is as good as its debug file's: skip the search.
        debug = [] if headers.has_symtab else _debug_symbols(reader, headers, origin)
        self.has_symtab = headers.has_symtab or bool(debug)
        self.symbols = _SymbolTable(_read_symbols(reader, headers.sections) + debug)


class _Mapping:
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
        self.image: _ElfImage | None = None
        self.bias = self.start - self.offset  # vaddr = address - bias

    def attach(self, image: _ElfImage) -> None:
        self.image = image
        self.bias = self.start - self.offset - image.headers.vaddr_delta(self.offset)


def _read_mappings(pid: int) -> list[_Mapping]:
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    mappings = []
    for line in lines:
        fields = line.split(None, 5)
        # Anonymous code (JIT, "[anon:...]") has no file to take symbols from.
        if len(fields) == 6 and fields[1][2] == "x" and not fields[5].startswith("[anon"):
            mappings.append(_Mapping(fields))
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


class _Process:
    """A pid's identity and executable mappings, as last read from /proc."""

    __slots__ = ("_starts", "info", "mappings", "read_at", "read_every")

    def __init__(self, pid: int) -> None:
        self.mappings: list[_Mapping] = []
        self._starts: list[int] = []
        self.read_every = _MAPS_REFRESH_S
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
        mappings = [known.get(m.identity, m) for m in _read_mappings(pid)]
        unchanged = [m.identity for m in mappings] == list(known)
        self.read_every = (min(2 * self.read_every, _MAPS_REFRESH_MAX_S) if unchanged
                           else _MAPS_REFRESH_S)
        self.mappings = mappings
        self._starts = [m.start for m in self.mappings]
        self.info = ProcessInfo(pid, comm, *_identity(pid))

    def find(self, address: int) -> _Mapping | None:
        i = bisect_right(self._starts, address) - 1
        if i >= 0 and address < self.mappings[i].end:
            return self.mappings[i]
        return None


class Symbolizer:
    """Turns kernel and user stacks into frames, caching across samples and processes."""

    def __init__(self, *, max_processes: int = 4096, max_cached_frames: int = 65536) -> None:
        self._kernel = KernelSymbols()
        self._processes: _Lru[int, _Process] = _Lru(max_processes)
        self._frames: _Lru[tuple[_ImageKey | None, str, int, bool], Frame] = _Lru(
            max_cached_frames)
        self._images: _Lru[_ImageKey, _ElfImage] = _Lru(_MAX_IMAGES)
        self.elf_parses = 0  # ELF symbol tables parsed, for stats: the rest were cache hits

    def load_kernel_symbols(self) -> None:
        """Parse kallsyms ahead of the first kernel stack.

        It takes thousands of reads; done on an event loop whose process
        has a busy Python thread, each read waits for the GIL and the loop
        freezes for seconds.  Callers run this in a worker thread.
        """
        self._kernel.load()

    def kernel_frames(self, addresses: Sequence[int]) -> tuple[Frame, ...]:
        """Frames for a kernel stack, leaf first, in the order given."""
        return self._kernel.resolve(addresses)

    def user_frames(self, pid: int, addresses: Sequence[int]) -> tuple[Frame, ...]:
        """Frames for a user stack of ``pid``, leaf first, in the order given.

        A process that has exited still resolves through the maps cached
        while it was alive, until :meth:`forget`.
        """
        if not addresses:
            return ()
        process = self._process(pid)
        frames = []
        leaf = True
        for address in addresses:
            frames.append(self._user_frame(pid, process, address, leaf))
            leaf = False
        return tuple(frames)

    def process_info(self, pid: int) -> ProcessInfo | None:
        """Name, executable and command line as first read, or None if never seen alive."""
        process = self._process(pid)
        return process.info if process else None

    def forget(self, pid: int) -> None:
        """Drop what is cached for an exited process (its ELF images stay shared)."""
        self._processes.pop(pid)

    def _process(self, pid: int) -> _Process | None:
        process = self._processes.get(pid)
        if process is None:
            try:
                process = _Process(pid)
            except OSError:  # gone, or a kernel thread's pid raced
                return None
            self._processes.put(pid, process)
        return process

    def _user_frame(self, pid: int, process: _Process | None, address: int,
                    leaf: bool) -> Frame:
        lookup = address if leaf else address - 1
        mapping = process.find(lookup) if process else None
        if mapping is None and process and self._refresh(pid, process):
            mapping = process.find(lookup)
        if mapping is None:
            return Frame(f"{_UNKNOWN}+0x{address:x}", _UNKNOWN, FrameKind.NATIVE, address)
        if not mapping.loaded:
            self._load(pid, mapping)
        image = mapping.image
        vaddr = address - mapping.bias
        key = (image.key if image else None, mapping.module, vaddr, leaf)
        frame = self._frames.get(key)
        if frame is None:
            name = image.symbols.name(vaddr if leaf else vaddr - 1) if image else None
            frame = Frame(name or f"{mapping.basename}+0x{vaddr:x}", mapping.module,
                          FrameKind.NATIVE, vaddr)
            self._frames.put(key, frame)
        return frame

    def _refresh(self, pid: int, process: _Process) -> bool:
        """Re-read the maps of ``pid`` unless read very recently; True if re-read."""
        if time.monotonic() - process.read_at < process.read_every:
            return False
        try:
            process.read(pid)
        except OSError:  # exited: keep resolving with what we have
            return False
        return True

    def _load(self, pid: int, mapping: _Mapping) -> None:
        mapping.loaded = True
        try:
            image = (self._vdso_image(pid, mapping) if mapping.module == _VDSO
                     else self._file_image(pid, mapping))
        except (OSError, ValueError):  # unreadable or not ELF64: module+offset names
            return
        if image is not None:
            mapping.attach(image)

    def _file_image(self, pid: int, mapping: _Mapping) -> _ElfImage | None:
        fd = _open_mapped_file(pid, mapping)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            # Checked before the build id so that a file already seen costs one fstat.
            file_key = ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            image = self._images.get(file_key)
            if image is None:
                image = self._image(_Reader.of_file(fd, st.st_size), file_key,
                                    _Origin(_roots(pid), mapping.module))
                self._images.put(file_key, image)
            return image
        finally:
            os.close(fd)

    def _vdso_image(self, pid: int, mapping: _Mapping) -> _ElfImage:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            data = os.pread(mem.fileno(), mapping.end - mapping.start, mapping.start)
        return self._image(_Reader.of_bytes(data), ("vdso", hash(data)),
                           _Origin(_roots(pid), None))

    def _image(self, reader: _Reader, fallback_key: _ImageKey, origin: _Origin) -> _ElfImage:
        """The image of an ELF file, parsed only if its build id is new."""
        headers = _ElfHeaders(reader)
        key = ("build-id", headers.build_id) if headers.build_id else fallback_key
        image = self._images.get(key)
        # A stripped copy without debug file may have been seen first; the full one replaces it.
        if image is None or (headers.has_symtab and not image.has_symtab):
            image = _ElfImage(key, reader, headers, origin)
            self.elf_parses += 1
            self._images.put(key, image)
        return image


def _roots(pid: int) -> tuple[str, ...]:
    """Where to look for files named by a process's paths: its root, then ours."""
    return (f"/proc/{pid}/root", "")


def _open_mapped_file(pid: int, mapping: _Mapping) -> int | None:
    """Open the file behind a mapping, or None.

    ``map_files`` reaches deleted files and other mount namespaces.  The path
    fallbacks must be the same inode, or they could be a different file now.
    """
    try:
        return os.open(f"/proc/{pid}/map_files/{mapping.range}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        if mapping.deleted:
            return None
    for root in _roots(pid):
        try:
            fd = os.open(f"{root}{mapping.module}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        if os.fstat(fd).st_ino == mapping.inode:
            return fd
        os.close(fd)
    return None
