"""Kernel frames named from ``/proc/kallsyms``.

kallsyms has over 100k lines, of which stacks hit a few hundred, and it is
parsed inside the host's process.  So the parse goes a block of lines at a
time, which bounds its transient memory, with one regular expression and
C-level iteration (``bytes.fromhex``, ``map``, ``itertools``) rather than
Python code per line, which keeps it near a tenth of a second; and only what
lookups need is kept: per address one code symbol's start and reach, in
arrays; the names zlib-compressed in blocks, a block inflated only when a
stack hits one of its symbols; and modules as runs of symbols.  That is some
2 MB, where the names alone take 3 MB as text and far more as Python strings.
"""

from __future__ import annotations

import re
import sys
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from itertools import accumulate, chain, compress, count, groupby, islice, repeat
from operator import add, itemgetter, mul, ne
from typing import BinaryIO

from .._binaries.ranges import Ranges, one_per_address, reach, underscores
from .._model.profile import Frame, FrameKind

__all__ = ["KERNEL", "KallsymsTable", "KernelSymbols"]

KERNEL = "[kernel.kallsyms]"
# kallsyms is read and parsed this many bytes (some 5k lines) at a time, which
# bounds the transient lists of the parse.
BLOCK_SIZE = 1 << 18
# Names kept compressed, this many to a block: inflating one takes some 20 us.
_NAME_BLOCK = 256
# Addresses are zero-padded hex of one width: that of a u1, u2, u4 or u8.
_TYPECODES = {2: "B", 4: "H", 8: "I", 16: "Q"}
# bytes.translate tables.  Symbol type to kind: 1 for code; 2 for the rest
# (data, rodata, bss), which only end the code before them; 0 is left for
# symbols without an address.  Then kind to a selector of code, or of the rest.
_KINDS = bytes(1 if byte in b"tTwW" else 2 for byte in range(256))
_CODE = bytes((0, 1, 0)) + bytes(253)
_DATA = bytes((0, 0, 1)) + bytes(253)


def _line_pattern(width: int) -> re.Pattern[bytes]:
    """A kallsyms line, "ADDRESS TYPE NAME[\\tMODULE]", as address, type, name and
    module (as kallsyms writes it, "[nf_tables]"; empty for the core kernel)."""
    return re.compile(
        rb"^(.{%d}) (.) (?=.)([^\t\n]*)(?:\t(.*))?$" % width, re.M)


def _blocks(stream: BinaryIO) -> Iterator[bytes]:
    """``stream`` in blocks of whole lines."""
    while block := stream.read(BLOCK_SIZE):
        yield block + stream.readline()


class _Parsed:
    """The code symbols of kallsyms in file order, as the parse collects them:
    each a column, and the names back to back."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.pattern = _line_pattern(width)
        self.addresses = array("Q")
        self.types = bytearray()  # each symbol's type letter
        self.names = bytearray()  # each NUL-ended
        self.name_at = array("I", [0])  # where each name starts in names, then the end
        self.modules = array("I")  # each symbol's index in module_ids
        self.module_ids = {b"": 0}  # module as written -> index; b"": the core kernel
        self.data = array("Q")  # addresses of the other symbols

    def add(self, block: bytes) -> None:
        """Collect the symbols of the lines in ``block``."""
        rows = self.pattern.findall(block)
        digits = b"".join(map(itemgetter(0), rows)).decode("ascii")
        raw = bytes.fromhex(digits)
        if len(raw) != len(rows) * self.width // 2:  # fromhex skipped whitespace
            raise ValueError("kallsyms addresses are not all hex")
        addresses = array(_TYPECODES[self.width], raw)
        if sys.byteorder == "little":  # the hex has the most significant digit first
            addresses.byteswap()
        types = b"".join(map(itemgetter(1), rows))
        kinds = types.translate(_KINDS)
        if addresses.count(0):  # kptr_restrict hides them all as 0: no symbols then
            kinds = bytes(map(mul, kinds, map(bool, addresses)))
        self.data.extend(compress(addresses, kinds.translate(_DATA)))
        code = kinds.translate(_CODE)
        self.addresses.extend(compress(addresses, code))
        self.types.extend(compress(types, code))
        names = list(compress(map(itemgetter(2), rows), code))
        if names:
            self.names += b"\0".join(names)
            self.names += b"\0"
        self.name_at.extend(accumulate(map(add, map(len, names), repeat(1)),
                                       initial=self.name_at.pop()))
        for module, run in groupby(compress(map(itemgetter(3), rows), code)):
            index = self.module_ids.setdefault(module, len(self.module_ids))
            self.modules.extend(repeat(index, len(list(run))))

    def name(self, index: int) -> bytearray:
        return self.names[self.name_at[index]:self.name_at[index + 1] - 1]

    def compressed_names(self, order: array[int]) -> list[bytes]:
        """The names of the symbols in ``order``, NUL-ended, compressed
        ``_NAME_BLOCK`` to a block."""
        blocks = []
        for at in range(0, len(order), _NAME_BLOCK):
            indices = order[at:at + _NAME_BLOCK]
            first, last = indices[0], indices[-1]
            if indices == array("I", range(first, last + 1)):  # in file order: one slice
                names = self.names[self.name_at[first]:self.name_at[last + 1]]
            else:
                names = bytearray().join(
                    [self.names[self.name_at[i]:self.name_at[i + 1]] for i in indices])
            blocks.append(zlib.compress(names, 1))
        return blocks

    def preference(self, index: int) -> tuple[int, ...]:
        """Of aliases, the least is kept: a global name, then the plainest."""
        name = self.name(index)
        return self.types[index] >= ord("a"), underscores(name), len(name)


class KallsymsTable:
    """The code symbols of kallsyms, one per address, compact."""

    __slots__ = ("_module_runs", "_names", "_resolved", "_run_modules", "ranges")

    def __init__(self, stream: BinaryIO) -> None:
        blocks = _blocks(stream)
        first = next(blocks, b"")
        width = first.find(b" ")
        if width not in _TYPECODES:
            raise ValueError("kallsyms is not in the expected format")
        parsed = _Parsed(width)
        for block in chain((first,), blocks):
            parsed.add(block)
        keep, starts = one_per_address(parsed.addresses, parsed.preference)
        self.ranges = Ranges(starts, reach(starts, parsed.data))
        self._names = parsed.compressed_names(keep)
        modules = array("I", map(parsed.modules.__getitem__, keep))
        self._module_runs = _run_starts(modules)
        names = [sys.intern(raw.decode(errors="replace")) if raw else KERNEL
                 for raw in parsed.module_ids]
        self._run_modules = [names[modules[at]] for at in self._module_runs]
        self._resolved: dict[int, tuple[str, str]] = {}

    def symbol(self, index: int) -> tuple[str, str]:
        """(name, module) of the symbol at ``index`` of :attr:`ranges`."""
        found = self._resolved.get(index)
        if found is None:
            block, at = divmod(index, _NAME_BLOCK)
            name = zlib.decompress(self._names[block]).split(b"\0")[at]
            run = bisect_right(self._module_runs, index) - 1
            found = self._resolved[index] = (name.decode(errors="replace"),
                                             self._run_modules[run])
        return found


def _run_starts(values: array[int]) -> array[int]:
    """Where each run of equal ``values`` starts."""
    changes = compress(count(1), map(ne, values, islice(values, 1, None)))
    return array("I", chain((0,), changes) if values else ())


class KernelSymbols:
    """Kernel text symbols from kallsyms, parsed on first use.

    Without a readable kallsyms every kernel frame is ``[kernel.kallsyms]+0x...``.
    """

    def __init__(self, path: str = "/proc/kallsyms") -> None:
        self._path = path
        self._loaded = False
        self._table: KallsymsTable | None = None

    def load(self) -> None:
        """Parse kallsyms now, if not yet done."""
        if not self._loaded:
            self._loaded = True
            try:
                with open(self._path, "rb") as f:
                    self._table = KallsymsTable(f)
            except (OSError, ValueError):  # unreadable or unparsable: addresses only
                pass

    def resolve(self, addresses: Sequence[int]) -> tuple[Frame, ...]:
        """Frames for a kernel stack, leaf first, in the order given.

        Every frame but the leaf holds a return address, which may already lie
        past the end of the calling function: it is looked up one byte back.
        """
        if not addresses:
            return ()
        self.load()
        table = self._table
        frames = []
        for depth, address in enumerate(addresses):
            index = table.ranges.find(address - 1 if depth else address) if table else -1
            if table and index >= 0:
                name, module = table.symbol(index)
                frames.append(Frame(name, module, FrameKind.KERNEL, address))
            else:
                frames.append(Frame(f"{KERNEL}+0x{address:x}", KERNEL, FrameKind.KERNEL,
                                    address))
        return tuple(frames)
