"""The function symbols of one ELF file, merged into address ranges.

A file may name its functions in ``.symtab``, ``.dynsym`` and a debug file
at once, and name one function several times (``write``, ``__write``,
``__libc_write``).  Each address keeps one name, the one a person would
look for: sized over unsized, global over weak over local, then the plainest.
Names stay in the string tables until looked up: a binary has far more
symbols than a profile ever hits.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from itertools import repeat
from operator import add

from .debug_files import Origin, debug_symbols
from .elf import ElfHeaders, FunctionSymbols, Reader, read_symbols
from .ranges import Ranges, one_per_address, reach, underscores

__all__ = ["ElfImage", "ImageKey", "SymbolTable"]

ImageKey = tuple[object, ...]


class SymbolTable:
    """Function symbols of one ELF file (.symtab and .dynsym, and those of its
    debug file, merged): one per address, with its reach."""

    __slots__ = ("_names", "_ranges", "_strings")

    def __init__(self, sources: Sequence[FunctionSymbols]) -> None:
        self._strings = b"".join(source.strings + b"\0" for source in sources)
        if len(self._strings) > 0xFFFFFFFF:  # beyond the offsets kept; no real file
            raise ValueError("ELF string tables too large")
        values, sizes, names, ranks = array("Q"), array("Q"), array("I"), bytearray()
        base = 0  # of each source's strings in self._strings
        for source in sources:
            values.extend(source.values)
            sizes.extend(source.sizes)
            names.extend(map(add, source.names, repeat(base)))
            ranks += source.ranks
            base += len(source.strings) + 1

        def preference(index: int) -> tuple[int, ...]:
            name = self._name(names[index])
            return sizes[index] == 0, ranks[index], underscores(name), len(name)

        keep, starts = one_per_address(values, preference)
        kept_sizes = map(sizes.__getitem__, keep)
        self._ranges = Ranges(starts, array("Q", [
            size or unsized for size, unsized in zip(kept_sizes, reach(starts), strict=True)]))
        self._names = array("I", map(names.__getitem__, keep))

    @property
    def nbytes(self) -> int:
        """About what it holds in memory."""
        return (len(self._strings) + self._names.itemsize * len(self._names)
                + 2 * 8 * len(self._ranges.starts))

    def name(self, vaddr: int) -> str | None:
        if vaddr < 0:
            return None
        index = self._ranges.find(vaddr)
        if index < 0:
            return None
        return self._name(self._names[index]).decode(errors="replace")

    def _name(self, at: int) -> bytes:
        return self._strings[at:self._strings.index(b"\0", at)]


class ElfImage:
    """A parsed ELF file, shared by every mapping of it in every process."""

    __slots__ = ("has_symtab", "headers", "key", "symbols")

    def __init__(self, key: ImageKey, reader: Reader, headers: ElfHeaders,
                 origin: Origin) -> None:
        self.key = key
        self.headers = headers
        # A file's own .symtab is as good as its debug file's: skip the search.
        debug = [] if headers.has_symtab else debug_symbols(reader, headers, origin)
        self.has_symtab = headers.has_symtab or bool(debug)
        self.symbols = SymbolTable(read_symbols(reader, headers.sections) + debug)
