"""The pprof format: a gzip-compressed ``perftools.profiles.Profile`` message.

The tables come from the same ``ProfileDictionary`` as the OTLP encoding, so
both describe every stack with the same functions, locations and mappings.
Frames are already symbolized, so every mapping says it has functions and
consumers show our names rather than trying to symbolize addresses again.
Python frames have no mapping; their functions name the source file and
their lines the line being run.

A sample taken for a request is labelled with it: ``trace_id`` and
``span_id`` in hex, ``http.route`` and ``http.request.method``, so
``go tool pprof -tagfocus`` and ``-tagshow`` can slice CPU time by endpoint
or find one trace's stacks.
"""

from __future__ import annotations

import gzip
import os
from collections import Counter

from .._convert import pprof_pb2 as pb
from .._model.dictionary import ProfileDictionary, valid_utf8
from .._model.profile import FrameKind, Profile
from .._model.request_fields import request_labels


def render_pprof(profile: Profile) -> bytes:
    """The gzip-compressed pprof encoding of ``profile``.

    Values are ``samples/count`` and ``cpu/nanoseconds`` (count times the
    period), and with waits recorded off the CPU ``off_cpu/nanoseconds``,
    which only the waits' samples have (``go tool pprof -sample_index
    off_cpu``); each sample carries ``pid`` and ``process`` labels, and those
    of its request.
    """
    out = pb.Profile()
    d = ProfileDictionary()
    out.sample_type.add(type=d.string("samples"), unit=d.string("count"))
    out.sample_type.add(type=d.string("cpu"), unit=d.string("nanoseconds"))
    waits = list(profile.off_cpu.values())
    if waits:
        out.sample_type.add(type=d.string("off_cpu"), unit=d.string("nanoseconds"))
    out.period_type.type = d.string("cpu")
    out.period_type.unit = d.string("nanoseconds")
    out.period = profile.period_ns
    out.time_nanos = profile.start_ns
    out.duration_nanos = max(0, profile.end_ns - profile.start_ns)
    main = _main_binary(profile)
    if main:
        d.mapping(main)  # first: pprof names the profile after its first mapping
    pid_key, process_key = d.string("pid"), d.string("process")
    values = [(s, [s.count, s.count * profile.period_ns] + [0] * bool(waits)) for s in profile]
    values += [(s, [0, 0, s.off_cpu_ns]) for s in waits]
    for s, value in values:
        out.sample.add(
            location_id=d.stacks[d.stack(s.frames)],
            value=value,
            label=[pb.Label(key=pid_key, num=s.pid),
                   pb.Label(key=process_key, str=d.string(valid_utf8(s.process))),
                   *(pb.Label(key=d.string(key), str=d.string(value))
                     for key, value in request_labels(s.context).items())],
        )
    # Entry 0 of each table is the null entry; pprof ids are the indices.
    out.mapping.extend(
        pb.Mapping(id=i, filename=m.filename, memory_limit=m.memory_limit, has_functions=True)
        for i, m in enumerate(d.mappings) if i)
    out.function.extend(
        pb.Function(id=i, name=f.name, system_name=f.system_name, filename=f.filename)
        for i, f in enumerate(d.functions) if i)
    out.location.extend(
        pb.Location(id=i, mapping_id=loc.mapping, address=loc.address,
                    line=[pb.Line(function_id=loc.function, line=loc.line)])
        for i, loc in enumerate(d.locations) if i)
    out.string_table.extend(d.strings)
    # mtime=0 keeps the bytes a pure function of the profile.
    return gzip.compress(out.SerializeToString(), compresslevel=6, mtime=0)


def _main_binary(profile: Profile) -> str:
    """The executable of the most sampled process, as its frames name it (else
    its file name); empty if it is not known."""
    by_pid: Counter[int] = Counter()
    for s in profile:
        by_pid[s.pid] += s.count
    if not by_pid:
        return ""
    pid = by_pid.most_common(1)[0][0]
    info = profile.processes.get(pid)
    if info is None or not info.executable:
        return ""
    for s in profile:
        if s.pid == pid:
            for frame in s.frames:
                if frame.kind is FrameKind.NATIVE and os.path.basename(
                        frame.module) == info.executable:
                    return frame.module
    return info.executable
