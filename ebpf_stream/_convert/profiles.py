"""CPU profiles as OTLP Profiles (``opentelemetry.proto.profiles.v1development``).

One request holds one dictionary shared by every process in the batch, and
one resource per process.  Each process gets two profiles over the same
stacks, because an OTLP profile has a single sample type:

- ``samples/count``: one timestamp per sample, so backends can slice by time;
- ``cpu/nanoseconds``: the CPU time per stack (count times the period).

Both carry the sampling period as ``cpu/nanoseconds``.  Locations carry the
``profile.frame.type`` attribute (``kernel``, ``native`` or ``cpython``).  A
Python location has no mapping, and one line: its function (qualified name
and source file) and the line being run.
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
from .._model.profile import FrameKind, ProcessInfo, Profile, StackSamples
from .attributes import ResourceFactory, any_value

FRAME_TYPE = "profile.frame.type"
_FRAME_TYPES = {FrameKind.KERNEL: "kernel", FrameKind.NATIVE: "native",
                FrameKind.PYTHON: "cpython"}


def _group_by_process(profile: Profile) -> dict[ProcessInfo, list[StackSamples]]:
    groups: dict[ProcessInfo, list[StackSamples]] = defaultdict(list)
    for s in profile:
        groups[profile.process_of(s)].append(s)
    return groups


def profiles_request(profile: Profile, resources: ResourceFactory,
                     scope: InstrumentationScope) -> ExportProfilesServiceRequest:
    """The OTLP request for ``profile``; empty (no resources) when it has no samples."""
    request = ExportProfilesServiceRequest()
    d = ProfileDictionary()
    samples_type = pb.ValueType(type_strindex=d.string("samples"), unit_strindex=d.string("count"))
    cpu_type = pb.ValueType(type_strindex=d.string("cpu"), unit_strindex=d.string("nanoseconds"))
    period = profile.period_ns
    for process, stacks in _group_by_process(profile).items():
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
            if len(s.timestamps_ns) == s.count:
                counted.samples.add(stack_index=stack, timestamps_unix_nano=sorted(s.timestamps_ns))
            else:  # merged without timestamps: the aggregate is all there is
                counted.samples.add(stack_index=stack, values=[s.count])
            timed.samples.add(stack_index=stack, values=[s.count * period])
        request.resource_profiles.add(
            resource=resources.for_process(process),
            scope_profiles=[pb.ScopeProfiles(scope=scope, profiles=[counted, timed])],
        )
    if request.resource_profiles:  # without samples the request stays empty: nothing to send
        _fill_dictionary(request.dictionary, d)
    return request


def _fill_dictionary(out: pb.ProfilesDictionary, d: ProfileDictionary) -> None:
    frame_type_key = d.string(FRAME_TYPE)
    attribute_index = {}
    out.attribute_table.add()  # entry 0: the null attribute
    for kind, name in _FRAME_TYPES.items():
        attribute_index[kind] = len(out.attribute_table)
        out.attribute_table.add(key_strindex=frame_type_key, value=any_value(name))
    out.mapping_table.extend(
        pb.Mapping(filename_strindex=m.filename, memory_limit=m.memory_limit) for m in d.mappings)
    out.function_table.extend(
        pb.Function(name_strindex=f.name, system_name_strindex=f.system_name,
                    filename_strindex=f.filename) for f in d.functions)
    out.location_table.add()
    out.location_table.extend(
        pb.Location(mapping_index=loc.mapping, address=loc.address,
                    lines=[pb.Line(function_index=loc.function, line=loc.line)],
                    attribute_indices=[attribute_index[loc.kind]])
        for loc in d.locations[1:])
    out.stack_table.extend(pb.Stack(location_indices=s) for s in d.stacks)
    out.link_table.add()
    # Last: the loops above may still intern strings.
    out.string_table.extend(d.strings)
