"""The pprof format: a gzip-compressed ``perftools.profiles.Profile`` message.

Frames are already symbolized, so every mapping says it has functions and
consumers show our names rather than trying to symbolize addresses again.
"""

from __future__ import annotations

import gzip

from .. import _pprof_pb2 as pb
from .._profile import Frame, FrameKind, Profile
from .folded import valid_utf8

KERNEL_MAPPING = "[kernel.kallsyms]"
"""The mapping every kernel frame belongs to, whatever its module."""


class _Builder:
    """Interns strings, mappings, functions and locations into one message."""

    def __init__(self, out: pb.Profile) -> None:
        self.out = out
        self.strings: dict[str, int] = {"": 0}
        self.mappings: dict[str, pb.Mapping] = {}
        self.functions: dict[tuple[str, str], int] = {}
        self.locations: dict[Frame, int] = {}

    def string(self, text: str) -> int:
        index = self.strings.get(text)
        if index is None:
            index = self.strings[text] = len(self.strings)
        return index

    def mapping(self, frame: Frame) -> pb.Mapping:
        name = KERNEL_MAPPING if frame.kind is FrameKind.KERNEL else frame.module
        mapping = self.mappings.get(name)
        if mapping is None:
            mapping = self.mappings[name] = self.out.mapping.add(
                id=len(self.mappings) + 1, filename=self.string(valid_utf8(name)),
                has_functions=True,
            )
        return mapping

    def function(self, frame: Frame) -> int:
        key = (frame.name, frame.module)
        function_id = self.functions.get(key)
        if function_id is None:
            function_id = self.functions[key] = len(self.functions) + 1
            name = self.string(valid_utf8(frame.name))
            self.out.function.add(id=function_id, name=name, system_name=name)
        return function_id

    def location(self, frame: Frame) -> int:
        location_id = self.locations.get(frame)
        if location_id is None:
            location_id = self.locations[frame] = len(self.locations) + 1
            mapping = self.mapping(frame)
            # Addresses are relative to the module, so the mapping starts at 0
            # and only has to reach past the highest address seen.
            mapping.memory_limit = max(mapping.memory_limit, frame.address + 1)
            self.out.location.add(
                id=location_id, mapping_id=mapping.id, address=frame.address,
                line=[pb.Line(function_id=self.function(frame))],
            )
        return location_id


def render_pprof(profile: Profile) -> bytes:
    """The gzip-compressed pprof encoding of ``profile``.

    Values are ``samples/count`` and ``cpu/nanoseconds`` (count times the
    period); each sample carries ``pid`` and ``process`` labels.
    """
    out = pb.Profile()
    b = _Builder(out)
    out.sample_type.add(type=b.string("samples"), unit=b.string("count"))
    out.sample_type.add(type=b.string("cpu"), unit=b.string("nanoseconds"))
    out.period_type.type = b.string("cpu")
    out.period_type.unit = b.string("nanoseconds")
    out.period = profile.period_ns
    out.time_nanos = profile.start_ns
    out.duration_nanos = max(0, profile.end_ns - profile.start_ns)
    pid_key, process_key = b.string("pid"), b.string("process")
    for s in profile:
        out.sample.add(
            # pprof lists the leaf first; our frames are root first.
            location_id=[b.location(f) for f in reversed(s.frames)],
            value=[s.count, s.count * profile.period_ns],
            label=[pb.Label(key=pid_key, num=s.pid),
                   pb.Label(key=process_key, str=b.string(valid_utf8(s.process)))],
        )
    out.string_table.extend(b.strings)
    # mtime=0 keeps the bytes a pure function of the profile.
    return gzip.compress(out.SerializeToString(), compresslevel=6, mtime=0)
