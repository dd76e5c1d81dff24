"""CPU profiles as OTLP Profiles (``opentelemetry.proto.profiles.v1development``).

One request holds one dictionary shared by every process in the batch, and
one resource per process.  Each process gets two profiles over the same
stacks, because an OTLP profile has a single sample type:

- ``samples/count``: one timestamp per sample, so backends can slice by time;
- ``cpu/nanoseconds``: the CPU time per stack (count times the period).

Both carry the sampling period as ``cpu/nanoseconds``.  A process with
waits recorded off the CPU gets a third, ``off_cpu/nanoseconds``: each
wait's nanoseconds beside the time it ended.  Locations carry the
``profile.frame.type`` attribute (``kernel``, ``native`` or ``cpython``).  A
Python location has no mapping, and one line: its function (qualified name
and source file) and the line being run.

A sample taken for a request links to its span (a ``Link`` of the
dictionary, so a backend can jump from CPU time to the trace) and carries
the request's ``http.route`` and ``http.request.method`` attributes; the
stacks of one process are kept apart by request, so each request's samples
are samples of their own.
"""

from __future__ import annotations

import os
from collections import defaultdict

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb

from .._model.dictionary import ProfileDictionary
from .._model.profile import FrameKind, ProcessInfo, Profile, RequestContext, StackSamples
from .._model.request_fields import request_attributes, span_ids
from .attributes import ResourceFactory, any_value

FRAME_TYPE = "profile.frame.type"
_FRAME_TYPES = {FrameKind.KERNEL: "kernel", FrameKind.NATIVE: "native",
                FrameKind.PYTHON: "cpython"}


class _SampleTables:
    """The dictionary's attribute and link tables, each entry interned once.

    Entry 0 of each is the null entry, and the frame types of locations are
    the first attributes; a request's link and attributes follow as samples
    need them.
    """

    def __init__(self) -> None:
        self.attributes: dict[tuple[str, str], int] = {}  # (key, value) -> index
        self.links: dict[tuple[bytes, bytes], int] = {}  # (trace id, span id) -> index
        self.frame_types = {kind: self.attribute(FRAME_TYPE, name)
                            for kind, name in _FRAME_TYPES.items()}
        self._contexts: dict[RequestContext, tuple[int, list[int]]] = {}

    def attribute(self, key: str, value: str) -> int:
        return self.attributes.setdefault((key, value), len(self.attributes) + 1)

    def context(self, context: RequestContext | None) -> tuple[int, list[int]]:
        """The link index and attribute indices of a sample taken for ``context``."""
        if context is None:
            return 0, []
        found = self._contexts.get(context)
        if found is None:
            ids = span_ids(context)
            link = 0 if ids is None else self.links.setdefault(ids, len(self.links) + 1)
            found = self._contexts[context] = (link, [
                self.attribute(key, value) for key, value in request_attributes(context).items()])
        return found


def _group_by_process(
        profile: Profile) -> dict[ProcessInfo, tuple[list[StackSamples], list[StackSamples]]]:
    """Each process's (CPU stacks, off-CPU stacks)."""
    groups: dict[ProcessInfo, tuple[list[StackSamples], list[StackSamples]]] = defaultdict(
        lambda: ([], []))
    for s in profile:
        groups[profile.process_of(s)][0].append(s)
    for s in profile.off_cpu.values():
        groups[profile.process_of(s)][1].append(s)
    return groups


def profiles_request(profile: Profile, resources: ResourceFactory,
                     scope: InstrumentationScope) -> ExportProfilesServiceRequest:
    """The OTLP request for ``profile``; empty (no resources) when it has no samples."""
    request = ExportProfilesServiceRequest()
    d = ProfileDictionary()
    tables = _SampleTables()
    samples_type = pb.ValueType(type_strindex=d.string("samples"), unit_strindex=d.string("count"))
    cpu_type = pb.ValueType(type_strindex=d.string("cpu"), unit_strindex=d.string("nanoseconds"))
    off_cpu_type = pb.ValueType(type_strindex=d.string("off_cpu"),
                                unit_strindex=d.string("nanoseconds"))
    period = profile.period_ns
    for process, (stacks, waits) in _group_by_process(profile).items():
        start = profile.start_of(process.pid)
        duration = max(0, profile.end_ns - start)
        counted = pb.Profile(sample_type=samples_type, period_type=cpu_type, period=period,
                             time_unix_nano=start, duration_nano=duration,
                             profile_id=os.urandom(16))
        timed = pb.Profile(sample_type=cpu_type, period_type=cpu_type, period=period,
                           time_unix_nano=start, duration_nano=duration,
                           profile_id=os.urandom(16))
        for s in stacks:
            stack = d.stack(s.frames)
            link, attributes = tables.context(s.context)
            if len(s.timestamps_ns) == s.count:
                counted.samples.add(stack_index=stack, link_index=link,
                                    attribute_indices=attributes,
                                    timestamps_unix_nano=sorted(s.timestamps_ns))
            else:  # merged without timestamps: the aggregate is all there is
                counted.samples.add(stack_index=stack, link_index=link,
                                    attribute_indices=attributes, values=[s.count])
            timed.samples.add(stack_index=stack, link_index=link, attribute_indices=attributes,
                              values=[s.count * period])
        profiles = [counted, timed] if stacks else []
        if waits:
            off = pb.Profile(sample_type=off_cpu_type, time_unix_nano=start,
                             duration_nano=duration, profile_id=os.urandom(16))
            for s in waits:
                link, attributes = tables.context(s.context)
                sample = off.samples.add(stack_index=d.stack(s.frames), link_index=link,
                                         attribute_indices=attributes)
                if len(s.timestamps_ns) == s.count:
                    sample.timestamps_unix_nano.extend(s.timestamps_ns)
                    sample.values.extend(s.waits_ns)
                else:  # merged without timestamps
                    sample.values.append(s.off_cpu_ns)
            profiles.append(off)
        request.resource_profiles.add(
            resource=resources.for_process(process),
            scope_profiles=[pb.ScopeProfiles(scope=scope, profiles=profiles)],
        )
    if request.resource_profiles:  # without samples the request stays empty: nothing to send
        _fill_dictionary(request.dictionary, d, tables)
    return request


def _fill_dictionary(out: pb.ProfilesDictionary, d: ProfileDictionary,
                     tables: _SampleTables) -> None:
    out.attribute_table.add()  # entry 0: the null attribute
    out.attribute_table.extend(
        pb.KeyValueAndUnit(key_strindex=d.string(key), value=any_value(value))
        for key, value in tables.attributes)
    out.mapping_table.extend(
        pb.Mapping(filename_strindex=m.filename, memory_limit=m.memory_limit) for m in d.mappings)
    out.function_table.extend(
        pb.Function(name_strindex=f.name, system_name_strindex=f.system_name,
                    filename_strindex=f.filename) for f in d.functions)
    out.location_table.add()
    out.location_table.extend(
        pb.Location(mapping_index=loc.mapping, address=loc.address,
                    lines=[pb.Line(function_index=loc.function, line=loc.line)],
                    attribute_indices=[tables.frame_types[loc.kind]])
        for loc in d.locations[1:])
    out.stack_table.extend(pb.Stack(location_indices=s) for s in d.stacks)
    out.link_table.add()  # entry 0: the null link
    out.link_table.extend(pb.Link(trace_id=trace, span_id=span) for trace, span in tables.links)
    # Last: the loops above may still intern strings.
    out.string_table.extend(d.strings)
