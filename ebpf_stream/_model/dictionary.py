"""The interned tables of a profile, shared by the pprof and OTLP encodings.

Both formats describe stacks through tables of strings, mappings, functions
and locations referenced by index.  Building those tables once, here, from
the profile model is what keeps a pprof file and an OTLP profile of the same
samples identical frame for frame.

Index 0 of every table is a null entry: pprof ids start at 1, and OTLP's
dictionary reserves entry 0 of each table for the zero value.

A Python frame is a function of a source file at a line: its location has
no mapping (index 0, which both formats read as "not applicable": there is
no binary to symbolize against) and one location per line, so the lines of
one function stay apart.

A function's system name is the symbol its binary or the kernel knows it by,
which is its name as we read it.  A Python function has no such symbol, so
its system name is left empty: pprof reads a function whose name equals its
system name as one still to demangle, and its heuristics for C++ would strip
the ``<...>`` off ``<module>`` or ``<listcomp>``.
"""

from __future__ import annotations

import dataclasses

from .profile import Frame, FrameKind

KERNEL_MAPPING = "[kernel.kallsyms]"
"""The mapping every kernel frame belongs to, whatever its module."""


def valid_utf8(text: str) -> str:
    """``text`` with lone surrogates replaced, so protobuf and JSON accept it.

    Symbol names come from binaries and may hold bytes that decoded with
    ``surrogateescape``; every encoder needs valid UTF-8.
    """
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


@dataclasses.dataclass(slots=True)
class MappingEntry:
    """One binary: its file name, and an address range covering every location in it.

    Addresses are relative to the module, so the range starts at 0 and only
    has to reach past the highest address seen.
    """

    filename: int
    memory_limit: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionEntry:
    name: int
    system_name: int = 0  # the symbol of a native or kernel function; Python ones have none
    filename: int = 0  # the source file of a Python function; native ones have none


@dataclasses.dataclass(frozen=True, slots=True)
class LocationEntry:
    mapping: int  # 0 for a Python frame
    address: int
    function: int
    kind: FrameKind
    line: int = 0  # the source line of a Python frame


class ProfileDictionary:
    """Strings, mappings, functions, locations and stacks, each interned once."""

    def __init__(self) -> None:
        self.strings: dict[str, int] = {"": 0}
        self.mappings: list[MappingEntry] = [MappingEntry(0)]
        self.functions: list[FunctionEntry] = [FunctionEntry(0)]
        self.locations: list[LocationEntry] = [LocationEntry(0, 0, 0, FrameKind.NATIVE)]
        self.stacks: list[tuple[int, ...]] = [()]
        self._mapping_index: dict[str, int] = {}
        self._function_index: dict[tuple[str, str], int] = {}
        self._location_index: dict[Frame, int] = {}
        self._stack_index: dict[tuple[Frame, ...], int] = {}

    def string(self, text: str) -> int:
        index = self.strings.get(text)
        if index is None:
            index = self.strings[text] = len(self.strings)
        return index

    def stack(self, frames: tuple[Frame, ...]) -> int:
        """The index of a root-first stack, stored leaf first as both formats list it."""
        index = self._stack_index.get(frames)
        if index is None:
            index = self._stack_index[frames] = len(self.stacks)
            self.stacks.append(tuple(self.location(f) for f in reversed(frames)))
        return index

    def location(self, frame: Frame) -> int:
        index = self._location_index.get(frame)
        if index is None:
            index = self._location_index[frame] = len(self.locations)
            mapping = 0
            if frame.kind is not FrameKind.PYTHON:
                mapping = self._mapping(frame)
                entry = self.mappings[mapping]
                entry.memory_limit = max(entry.memory_limit, frame.address + 1)
            self.locations.append(LocationEntry(mapping, frame.address, self._function(frame),
                                                frame.kind, frame.line))
        return index

    def _mapping(self, frame: Frame) -> int:
        return self.mapping(KERNEL_MAPPING if frame.kind is FrameKind.KERNEL else frame.module)

    def mapping(self, name: str) -> int:
        """The index of the mapping of the binary ``name``."""
        index = self._mapping_index.get(name)
        if index is None:
            index = self._mapping_index[name] = len(self.mappings)
            self.mappings.append(MappingEntry(self.string(valid_utf8(name))))
        return index

    def _function(self, frame: Frame) -> int:
        # A native function is only its name in both formats (its binary is the
        # location's mapping), so one name is one entry even when several binaries
        # define it.  A Python function is its name in its source file.
        python = frame.kind is FrameKind.PYTHON
        filename = frame.module if python else ""
        key = (frame.name, filename)
        index = self._function_index.get(key)
        if index is None:
            index = self._function_index[key] = len(self.functions)
            name = self.string(valid_utf8(frame.name))
            self.functions.append(FunctionEntry(name, 0 if python else name,
                                                self.string(valid_utf8(filename))))
        return index
