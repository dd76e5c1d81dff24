"""A small ELF64 reader: headers, build id and symbol tables.

Symbolization needs only these, and owning the reader keeps bcc and
pyelftools out of it.  Every read is bounds-checked against the file: the
files are whatever processes map, so a corrupt or hostile one must raise
ValueError, never read past its end or allocate without bound.
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from collections.abc import Callable, Collection, Iterator
from functools import partial
from typing import NamedTuple

__all__ = ["ElfHeaders", "FunctionSymbols", "Reader", "Section", "Segment", "object_symbols",
           "read_symbols"]

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")
_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
_SHT_SYMTAB, _SHT_NOTE, _SHT_DYNSYM = 2, 7, 11
_PT_LOAD, _PT_NOTE = 1, 4
_PF_X = 1
_STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC = 1, 2, 10
_STB_GLOBAL, _STB_WEAK = 1, 2
_NT_GNU_BUILD_ID = 3
_SHN_XINDEX = 0xFFFF
# Symbol info byte -> rank of its binding, for bytes.translate: of aliases the
# global name is preferred, then the weak one.
_RANKS = bytes(0 if info >> 4 == _STB_GLOBAL else 1 if info >> 4 == _STB_WEAK else 2
               for info in range(256))


class Reader:
    """Bounds-checked reads of an ELF image, from a file or from memory."""

    __slots__ = ("_pread", "_size")

    def __init__(self, pread: Callable[[int, int], bytes], size: int) -> None:
        self._pread = pread  # (length, offset) -> bytes, as os.pread takes them
        self._size = size

    @classmethod
    def of_file(cls, fd: int, size: int) -> Reader:
        return cls(partial(os.pread, fd), size)

    @classmethod
    def of_bytes(cls, data: bytes) -> Reader:
        return cls(lambda length, offset: data[offset:offset + length], len(data))

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError("ELF structure lies outside the file")
        data = self._pread(length, offset)
        if len(data) != length:
            raise ValueError("short read of an ELF file")
        return data


class Section(NamedTuple):
    name: bytes
    type: int
    offset: int
    size: int
    link: int
    align: int


class Segment(NamedTuple):
    offset: int
    vaddr: int
    filesz: int
    executable: bool


class ElfHeaders:
    """What an ELF64 file says about itself before its symbols are read."""

    __slots__ = ("build_id", "has_symtab", "loads", "sections")

    def __init__(self, reader: Reader) -> None:
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
            Section(names[h[0]:].partition(b"\0")[0], h[1], h[4], h[5], h[6], h[8])
            for h in headers]
        programs = list(_PHDR.iter_unpack(reader.read(phoff, phnum * _PHDR.size)))
        # Executable segments first: a code mapping must match one of them.
        self.loads = sorted(
            (Segment(p[2], p[3], p[5], bool(p[1] & _PF_X)) for p in programs
             if p[0] == _PT_LOAD),
            key=lambda s: not s.executable)
        self.has_symtab = any(s.type == _SHT_SYMTAB for s in self.sections)
        notes = [(s.offset, s.size, s.align) for s in self.sections if s.type == _SHT_NOTE]
        notes += [(p[2], p[5], p[7]) for p in programs if p[0] == _PT_NOTE]
        self.build_id = next(
            (found for offset, size, align in notes
             if (found := _build_id(reader.read(offset, size), 8 if align == 8 else 4))),
            None)

    def section(self, name: bytes) -> Section | None:
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


class FunctionSymbols(NamedTuple):
    """The function symbols of one symbol table, with its string table.

    Columns rather than a tuple per symbol: a large binary has tens of
    thousands of functions, and a cached image keeps its symbols for long.
    """

    values: array[int]
    sizes: array[int]
    names: array[int]  # offsets into strings
    ranks: bytes  # of the binding: 0 global, 1 weak, 2 local
    strings: bytes


def _entries(reader: Reader, section: Section) -> Iterator[tuple[int, int, int, int, int, int]]:
    """The symbols of a symbol table section, as Elf64_Sym tuples."""
    return _SYM.iter_unpack(reader.read(section.offset, section.size - section.size % _SYM.size))


def read_symbols(reader: Reader, sections: list[Section]) -> list[FunctionSymbols]:
    """The function symbols of each symbol table of an ELF file."""
    found = []
    for section in sections:
        if section.type not in (_SHT_SYMTAB, _SHT_DYNSYM) or section.link >= len(sections):
            continue
        strtab = sections[section.link]
        # Straight into arrays: a tuple per symbol would cost some 100 bytes each, a
        # peak of tens of MB for a large binary that the agent's heap then keeps.
        values, sizes, names, infos = array("Q"), array("Q"), array("I"), bytearray()
        for name, info, _, shndx, value, size in _entries(reader, section):
            if (info & 0xF in (_STT_FUNC, _STT_GNU_IFUNC) and value and shndx
                    and 0 < name < strtab.size):
                values.append(value)
                sizes.append(size)
                names.append(name)
                infos.append(info)
        found.append(FunctionSymbols(values, sizes, names, bytes(infos.translate(_RANKS)),
                                     reader.read(strtab.offset, strtab.size)))
    return found


def object_symbols(reader: Reader, headers: ElfHeaders, names: Collection[str]) -> dict[
        str, int]:
    """ELF virtual addresses of the named data objects a file exports (defined
    ``STT_OBJECT`` symbols of ``.dynsym``); names not exported are left out."""
    found: dict[str, int] = {}
    for section in headers.sections:
        if section.type != _SHT_DYNSYM or section.link >= len(headers.sections):
            continue
        strtab = headers.sections[section.link]
        strings = reader.read(strtab.offset, strtab.size)
        # Where the string table reads each name: linkers share tails of
        # strings, so it may end another one, and may be there more than once.
        wanted: dict[int, str] = {}
        for name in names:
            raw = os.fsencode(name) + b"\0"
            at = strings.find(raw)
            while at >= 0:
                wanted.setdefault(at, name)
                at = strings.find(raw, at + 1)
        for name_at, info, _, shndx, value, _ in _entries(reader, section):
            match = wanted.get(name_at)
            if match is not None and info & 0xF == _STT_OBJECT and shndx:
                found.setdefault(match, value)  # the first such symbol of a name
    return {name: found[name] for name in names if name in found}
