"""Conversion of the engine's model into OTLP requests: profiles, metrics and logs.

Units, no network: what ``EventConverter`` builds is decoded back and compared with the
profile it came from (and with the pprof rendering of the same profile).
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import random
import socket
import sys
from collections import Counter
from typing import Any

import otlp_stacks
import pytest
from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.profiles.v1development import profiles_pb2
from otlp_json_decode import decode_otlp_json
from sample_frames import (
    EVAL,
    HANDLE_RUN,
    HANDLER,
    HANDLER_LATER,
    MAIN,
    PERIOD,
    READ,
    RUN_ONCE,
    START,
    WORK,
    kernel,
    native,
    python,
)
from sample_profiles import HEALTH, ITEM, ITEM_AGAIN, request_profile

from ebpf_stream._base.config import EbpfConfig
from ebpf_stream._base.overhead import Overhead
from ebpf_stream._base.stats import Stats
from ebpf_stream._convert.converter import EventConverter
from ebpf_stream._convert.json import encode_otlp_json
from ebpf_stream._convert.pprof_pb2 import Profile as PprofProfile
from ebpf_stream._convert.profiles import FRAME_TYPE
from ebpf_stream._model.batch import Batch
from ebpf_stream._model.dictionary import KERNEL_MAPPING
from ebpf_stream._model.events import CpuSample
from ebpf_stream._model.labels import KERNEL_SUFFIX, frame_label, short_file
from ebpf_stream._model.profile import Frame, FrameKind, ProcessInfo, Profile, RequestContext
from ebpf_stream._outputs.pprof import render_pprof

DURATION = 2_000_000_000
END = START + DURATION
PARSE = native("parse", module="/usr/lib/libjson.so", address=0x300)
EXT4 = kernel("ext4_file_read_iter", module="ext4", address=0xFFFF_FFFF_C030_0000)
SCHEDULE = kernel("schedule", address=0xFFFF_FFFF_8110_0000)
WORKER = kernel("worker_thread", address=0xFFFF_FFFF_8100_0000)
DB_MAIN = native("main", module="/usr/bin/postgres", address=0x2000)
DB_SCAN = native("heap_scan", module="/usr/bin/postgres", address=0x2400)

APP = ProcessInfo(10, "app", "app", "/usr/bin/app --serve")
APP2 = ProcessInfo(11, "app", "app", "/usr/bin/app --worker")
DB = ProcessInfo(20, "db", "postgres", "postgres -D /data")
KWORKER_PID = 30  # no ProcessInfo: a kernel thread


def timestamps(rng: random.Random, count: int) -> list[int]:
    """Times within the profile's interval, deliberately unsorted."""
    return [START + rng.randrange(DURATION) for _ in range(count)]


def sample_profile() -> Profile:
    """Four processes; kernel and native frames; frames and whole stacks shared across stacks
    and processes; every sample timestamped."""
    rng = random.Random(7)
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=END,
                processes={10: APP, 11: APP2, 20: DB})
    for pid, process, frames, count in (
        (10, "app", (MAIN, WORK, READ, EXT4), 3),
        (10, "app", (MAIN, WORK), 4),
        (10, "app", (MAIN, WORK, PARSE), 2),
        (11, "app", (MAIN, WORK, READ, EXT4), 5),  # the same stack in another process
        (20, "db", (DB_MAIN, DB_SCAN), 6),
        (20, "db", (DB_MAIN, DB_SCAN, READ), 1),
        (KWORKER_PID, "kworker/0:1", (WORKER, SCHEDULE), 2),
    ):
        p.add(pid, process, frames, count, timestamps(rng, count))
    return p


def frame_name(frame: Frame) -> str:
    return frame.name + (KERNEL_SUFFIX if frame.kind is FrameKind.KERNEL else "")


def expected_stacks(profile: Profile, scale: int = 1) -> Counter[tuple[int, tuple[str, ...]]]:
    out: Counter[tuple[int, tuple[str, ...]]] = Counter()
    for s in profile:
        out[s.pid, tuple(frame_name(f) for f in s.frames)] += s.count * scale
    return out


def convert(profile: Profile, attributes: dict[str, str] | None = None,
            ) -> ExportProfilesServiceRequest:
    converter = EventConverter(resource_attributes={} if attributes is None else attributes)
    return converter.convert_batch(Batch(profile)).profiles


def attrs(resource: object) -> dict[str, object]:
    return otlp_stacks.resource_attributes(resource)


def profiles_of(request: ExportProfilesServiceRequest,
                ) -> list[tuple[int, profiles_pb2.Profile]]:
    """(pid, profile) for every profile in the request."""
    return [(int(attrs(rp.resource)["process.pid"]), profile)  # type: ignore[call-overload]
            for rp in request.resource_profiles
            for sp in rp.scope_profiles for profile in sp.profiles]


def sample_type(request: ExportProfilesServiceRequest, profile: profiles_pb2.Profile,
                ) -> tuple[str, str]:
    s = request.dictionary.string_table
    return s[profile.sample_type.type_strindex], s[profile.sample_type.unit_strindex]


# -- profiles ----------------------------------------------------------------------------------


def test_profiles_decode_to_the_same_stacks_and_counts() -> None:
    profile = sample_profile()
    request = convert(profile)
    assert otlp_stacks.stacks([request]) == expected_stacks(profile)
    assert otlp_stacks.stacks([request], sample_type="cpu") == expected_stacks(profile, PERIOD)
    assert len(request.resource_profiles) == 4  # one resource per process


def test_profiles_survive_the_wire() -> None:
    profile = sample_profile()
    wire = convert(profile).SerializeToString()
    request = ExportProfilesServiceRequest.FromString(wire)
    assert otlp_stacks.stacks([request]) == expected_stacks(profile)


def test_each_process_has_a_count_and_a_cpu_profile_with_period_and_interval() -> None:
    request = convert(sample_profile())
    s = request.dictionary.string_table
    ids = set()
    for rp in request.resource_profiles:
        (sp,) = rp.scope_profiles
        assert sp.scope.name == "ebpf_stream"
        assert sorted(sample_type(request, p) for p in sp.profiles) == [
            ("cpu", "nanoseconds"), ("samples", "count")]
        for p in sp.profiles:
            assert (s[p.period_type.type_strindex], s[p.period_type.unit_strindex]) == (
                "cpu", "nanoseconds")
            assert p.period == PERIOD
            assert (p.time_unix_nano, p.duration_nano) == (START, DURATION)
            assert len(p.profile_id) == 16 and any(p.profile_id)
            ids.add(p.profile_id)
    assert len(ids) == 2 * len(request.resource_profiles)


def test_cpu_values_are_count_times_period_and_counts_carry_sorted_timestamps() -> None:
    profile = sample_profile()
    request = convert(profile)
    checked = 0
    for _, p in profiles_of(request):
        kind = sample_type(request, p)[0]
        for sample in p.samples:
            if kind == "cpu":
                assert list(sample.timestamps_unix_nano) == []
                assert len(sample.values) == 1 and sample.values[0] % PERIOD == 0
                continue
            times = list(sample.timestamps_unix_nano)
            assert list(sample.values) == []  # one event per timestamp
            assert times and times == sorted(times)
            assert all(p.time_unix_nano <= t < p.time_unix_nano + p.duration_nano
                       for t in times)
            checked += len(times)
    assert checked == profile.sample_count

    # The cpu value of each stack is its timestamp count times the period.
    counted = otlp_stacks.stacks([request])
    timed = otlp_stacks.stacks([request], sample_type="cpu")
    assert timed == Counter({k: v * PERIOD for k, v in counted.items()})


def test_timestamps_match_the_profile_per_stack() -> None:
    profile = sample_profile()
    request = convert(profile)
    d = request.dictionary
    by_stack: dict[tuple[int, int], list[int]] = {}
    for pid, p in profiles_of(request):
        if sample_type(request, p)[0] == "samples":
            for sample in p.samples:
                by_stack[pid, sample.stack_index] = list(sample.timestamps_unix_nano)
    assert len(by_stack) == len(profile.stacks)
    expected = {}
    for s in profile:
        names = tuple(f.name for f in reversed(s.frames))
        expected[s.pid, names] = sorted(s.timestamps_ns)
    got = {}
    for (pid, index), times in by_stack.items():
        names = tuple(d.string_table[d.function_table[d.location_table[i].lines[0]
                                                      .function_index].name_strindex]
                      for i in d.stack_table[index].location_indices)
        got[pid, names] = times
    assert got == expected


def test_merged_profile_without_timestamps_carries_counts() -> None:
    merged = Profile(period_ns=PERIOD, start_ns=START, end_ns=END)
    merged.merge(sample_profile(), keep_timestamps=False)
    request = convert(merged)
    for _, p in profiles_of(request):
        for sample in p.samples:
            assert list(sample.timestamps_unix_nano) == []
            assert len(sample.values) == 1
    assert otlp_stacks.stacks([request]) == expected_stacks(merged)


def test_dictionary_entry_zero_is_the_zero_value_and_nothing_is_duplicated() -> None:
    d = convert(sample_profile()).dictionary
    assert d.string_table[0] == ""
    tables: dict[str, tuple[Any, type[Message]]] = {
        "mapping": (d.mapping_table, profiles_pb2.Mapping),
        "location": (d.location_table, profiles_pb2.Location),
        "function": (d.function_table, profiles_pb2.Function),
        "link": (d.link_table, profiles_pb2.Link),
        "attribute": (d.attribute_table, profiles_pb2.KeyValueAndUnit),
        "stack": (d.stack_table, profiles_pb2.Stack),
    }
    for name, (table, zero) in tables.items():
        assert len(table) >= 1, name
        assert table[0] == zero(), name
        encoded = [entry.SerializeToString(deterministic=True) for entry in table]
        assert len(set(encoded)) == len(encoded), f"duplicate {name} entries"
    assert len(set(d.string_table)) == len(d.string_table)


def test_every_index_points_into_its_table() -> None:
    request = convert(sample_profile())
    d = request.dictionary
    n_strings = len(d.string_table)
    for _, p in profiles_of(request):
        for sample in p.samples:
            assert 0 < sample.stack_index < len(d.stack_table)
    for stack in d.stack_table[1:]:
        assert stack.location_indices
        assert all(0 < i < len(d.location_table) for i in stack.location_indices)
    for loc in d.location_table[1:]:
        assert 0 < loc.mapping_index < len(d.mapping_table)
        assert [0 < line.function_index < len(d.function_table) for line in loc.lines] == [True]
        assert all(0 < i < len(d.attribute_table) for i in loc.attribute_indices)
    for fn in d.function_table[1:]:
        assert 0 < fn.name_strindex < n_strings
    for m in d.mapping_table[1:]:
        assert 0 < m.filename_strindex < n_strings


def test_locations_carry_their_frame_type_and_kernel_frames_share_one_mapping() -> None:
    profile = sample_profile()
    d = convert(profile).dictionary
    s = d.string_table
    seen: dict[str, str] = {}
    for loc in d.location_table[1:]:
        (index,) = loc.attribute_indices
        attribute = d.attribute_table[index]
        assert s[attribute.key_strindex] == FRAME_TYPE
        kind = attribute.value.string_value
        name = s[d.function_table[loc.lines[0].function_index].name_strindex]
        mapping = s[d.mapping_table[loc.mapping_index].filename_strindex]
        seen[f"{name}@{mapping}"] = kind
        assert (kind == "kernel") == (mapping == KERNEL_MAPPING)
        assert loc.address < d.mapping_table[loc.mapping_index].memory_limit
    frames = {f for st in profile for f in st.frames}
    expected = {
        f"{f.name}@{KERNEL_MAPPING if f.kind is FrameKind.KERNEL else f.module}":
            "kernel" if f.kind is FrameKind.KERNEL else "native"
        for f in frames}
    assert seen == expected


def test_shared_frames_and_stacks_are_interned_once() -> None:
    profile = sample_profile()
    request = convert(profile)
    d = request.dictionary
    distinct_frames = {f for st in profile for f in st.frames}
    distinct_stacks = {st.frames for st in profile}
    assert len(d.location_table) == 1 + len(distinct_frames)
    assert len(d.stack_table) == 1 + len(distinct_stacks)
    # pids 10 and 11 sampled the same stack: both samples reference one stack entry.
    index = {pid: {sample.stack_index for sample in p.samples} for pid, p in profiles_of(request)}
    assert index[10] & index[11]
    # "main" of app and "main" of postgres: one function (a name), two locations, told apart
    # by their mappings.
    names = [d.string_table[f.name_strindex] for f in d.function_table[1:]]
    assert names.count("main") == 1
    mains = {d.string_table[d.mapping_table[loc.mapping_index].filename_strindex]
             for loc in d.location_table[1:]
             if d.string_table[d.function_table[loc.lines[0].function_index].name_strindex]
             == "main"}
    assert mains == {"/usr/bin/app", "/usr/bin/postgres"}


def sample_requests(request: ExportProfilesServiceRequest,
                    ) -> dict[str, Counter[tuple[tuple[str, ...], tuple[str, str] | None,
                                                 frozenset[tuple[str, str]]]]]:
    """Each profile type's values by (stack, (trace id, span id) of the link, attributes)."""
    d = request.dictionary
    s = d.string_table

    def frames(stack_index: int) -> tuple[str, ...]:
        return tuple(s[d.function_table[d.location_table[i].lines[0].function_index]
                       .name_strindex]
                     for i in reversed(d.stack_table[stack_index].location_indices))

    def link(index: int) -> tuple[str, str] | None:
        found = d.link_table[index]
        return (found.trace_id.hex(), found.span_id.hex()) if index else None

    out: dict[str, Counter[Any]] = {}
    for _, p in profiles_of(request):
        values = out.setdefault(s[p.sample_type.type_strindex], Counter())
        for sample in p.samples:
            attributes = frozenset((s[d.attribute_table[i].key_strindex],
                                    d.attribute_table[i].value.string_value)
                                   for i in sample.attribute_indices)
            values[frames(sample.stack_index), link(sample.link_index), attributes] += (
                sum(sample.values) or len(sample.timestamps_unix_nano))
    return out


def span(context: RequestContext) -> tuple[str, str]:
    return context.trace_id, context.span_id


def test_samples_link_to_their_span_and_carry_the_route_and_method() -> None:
    request = convert(request_profile())
    route, method = "http.route", "http.request.method"
    items = frozenset({(route, "/items/{id}"), (method, "GET")})
    expected = Counter({
        (("main", "work"), span(ITEM), items): 3,
        (("main", "work"), span(ITEM_AGAIN), items): 2,  # the same stack, another request
        (("main", "work", "vfs_read"), None,
         frozenset({(route, "/checkout"), (method, "POST")})): 4,  # routed, no span
        (("main", "work"), None, frozenset()): 1,  # outside any request
        (("main",), span(HEALTH), frozenset({(route, "/health")})): 2,  # no method
    })
    got = sample_requests(request)
    assert got["samples"] == expected
    assert got["cpu"] == Counter({key: n * PERIOD for key, n in expected.items()})


def test_links_and_request_attributes_are_interned_once() -> None:
    d = convert(request_profile()).dictionary
    assert d.link_table[0] == profiles_pb2.Link()
    # HEALTH shares ITEM's trace but not its span: a link of its own.
    assert [(link.trace_id.hex(), link.span_id.hex()) for link in d.link_table[1:]] == [
        span(ITEM), span(ITEM_AGAIN), span(HEALTH)]
    assert all((len(link.trace_id), len(link.span_id)) == (16, 8) for link in d.link_table[1:])
    s = d.string_table
    pairs = [(s[a.key_strindex], a.value.string_value) for a in d.attribute_table[1:]]
    assert len(set(pairs)) == len(pairs)
    assert {pair for pair in pairs if pair[0] != FRAME_TYPE} == {
        ("http.route", "/items/{id}"), ("http.request.method", "GET"),
        ("http.route", "/checkout"), ("http.request.method", "POST"), ("http.route", "/health")}


def test_links_read_back_from_otlp_json() -> None:
    request = convert(request_profile())
    line = encode_otlp_json(request)
    assert f'"linkTable":[{{}},{{"traceId":"{ITEM.trace_id}","spanId":"{ITEM.span_id}"}}'.encode(
        ) in line
    back = decode_otlp_json(line, ExportProfilesServiceRequest)
    assert sample_requests(back) == sample_requests(request)


def test_resource_attributes_from_the_caller_and_the_process() -> None:
    request = convert(sample_profile(), {"service.name": "checkout",
                                         "deployment.environment.name": "prod",
                                         "process.pid": "999"})
    by_pid = {int(a["process.pid"]): a  # type: ignore[call-overload]
              for a in (attrs(rp.resource) for rp in request.resource_profiles)}
    assert set(by_pid) == {10, 11, 20, KWORKER_PID}
    for a in by_pid.values():
        assert a["service.name"] == "checkout"
        assert a["deployment.environment.name"] == "prod"
        assert a["host.name"] == socket.gethostname()
    assert by_pid[10]["process.executable.name"] == "app"
    assert by_pid[10]["process.command_line"] == "/usr/bin/app --serve"
    assert by_pid[11]["process.command_line"] == "/usr/bin/app --worker"
    assert by_pid[20]["process.executable.name"] == "postgres"
    assert by_pid[20]["process.command_line"] == "postgres -D /data"
    # A kernel thread has neither executable nor command line: left out, not empty.
    assert "process.executable.name" not in by_pid[KWORKER_PID]
    assert "process.command_line" not in by_pid[KWORKER_PID]


def test_service_name_falls_back_to_unknown_service_with_the_executable() -> None:
    request = convert(sample_profile(), {"deployment.environment.name": "prod"})
    names = {int(a["process.pid"]): a["service.name"]  # type: ignore[call-overload]
             for a in (attrs(rp.resource) for rp in request.resource_profiles)}
    assert names == {10: "unknown_service:app", 11: "unknown_service:app",
                     20: "unknown_service:postgres",
                     KWORKER_PID: "unknown_service:kworker/0:1"}


def test_resource_attributes_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-list,team=perf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-name")
    request = EventConverter().convert_batch(Batch(sample_profile())).profiles
    for rp in request.resource_profiles:
        a = attrs(rp.resource)
        assert (a["service.name"], a["team"]) == ("from-name", "perf")


def test_empty_profile_gives_empty_requests() -> None:
    converted = EventConverter(resource_attributes={}).convert_batch(
        Batch(Profile(period_ns=PERIOD, start_ns=START, end_ns=START)))
    # Empty means no fields at all: the exporters skip a request without fields.
    assert converted.profiles.ListFields() == []
    assert converted.metrics.ListFields() == []


def test_odd_names_become_valid_utf8() -> None:
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=END)
    p.add(5, "bad\udcff", (native("fn\udcfe", module="/tmp/lib\udcfd.so"),), 1, [START])
    request = convert(p)
    request = ExportProfilesServiceRequest.FromString(request.SerializeToString())
    assert otlp_stacks.stacks([request]) == {(5, ("fn?",)): 1}
    d = request.dictionary
    assert "/tmp/lib?.so" in d.string_table


# -- agreement with pprof ----------------------------------------------------------------------


def test_pprof_and_otlp_list_the_same_stacks_mappings_and_totals() -> None:
    profile = sample_profile()
    request = convert(profile)
    pprof = PprofProfile.FromString(gzip.decompress(render_pprof(profile)))

    ps = pprof.string_table
    functions = {f.id: ps[f.name] for f in pprof.function}
    locations = {loc.id: functions[loc.line[0].function_id] for loc in pprof.location}
    pprof_samples: Counter[tuple[int, tuple[str, ...]]] = Counter()
    pprof_cpu: Counter[tuple[int, tuple[str, ...]]] = Counter()
    for pp_sample in pprof.sample:
        pid = next(label.num for label in pp_sample.label if ps[label.key] == "pid")
        leaf_first = tuple(locations[i] for i in pp_sample.location_id)
        pprof_samples[pid, leaf_first] += pp_sample.value[0]
        pprof_cpu[pid, leaf_first] += pp_sample.value[1]

    d = request.dictionary
    s = d.string_table
    otlp_samples: Counter[tuple[int, tuple[str, ...]]] = Counter()
    otlp_cpu: Counter[tuple[int, tuple[str, ...]]] = Counter()
    for pid, p in profiles_of(request):
        kind = sample_type(request, p)[0]
        for sample in p.samples:
            leaf_first = tuple(
                s[d.function_table[d.location_table[i].lines[0].function_index].name_strindex]
                for i in d.stack_table[sample.stack_index].location_indices)
            if kind == "samples":
                otlp_samples[pid, leaf_first] += (sum(sample.values) if sample.values
                                                  else len(sample.timestamps_unix_nano))
            else:
                otlp_cpu[pid, leaf_first] += sum(sample.values)

    assert otlp_samples == pprof_samples
    assert otlp_cpu == pprof_cpu
    assert sum(otlp_samples.values()) == profile.sample_count
    assert sum(otlp_cpu.values()) == profile.sample_count * PERIOD
    assert sorted(s[m.filename_strindex] for m in d.mapping_table[1:]) == sorted(
        ps[m.filename] for m in pprof.mapping)
    assert {m.filename_strindex and s[m.filename_strindex]: m.memory_limit
            for m in d.mapping_table[1:]} == {ps[m.filename]: m.memory_limit
                                             for m in pprof.mapping}
    assert pprof.period == PERIOD
    assert (pprof.time_nanos, pprof.duration_nanos) == (START, DURATION)


# -- Python frames -----------------------------------------------------------------------------

PY_APP = ProcessInfo(40, "python3", "python3.11", "python3 /srv/app.py")
ADMIN_HANDLER = python("handler", "/srv/admin.py", 3)  # the same name in another file


def python_profile() -> Profile:
    """A Python service's merged stacks: two lines of one function, and a function of the same
    name in another file."""
    rng = random.Random(3)
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=END, processes={40: PY_APP})
    for frames, count in (
        ((MAIN, EVAL, RUN_ONCE, HANDLE_RUN, HANDLER), 4),
        ((MAIN, EVAL, RUN_ONCE, HANDLE_RUN, HANDLER_LATER, EVAL), 2),
        ((MAIN, EVAL, RUN_ONCE, ADMIN_HANDLER), 1),
    ):
        p.add(40, "python3", frames, count, timestamps(rng, count))
    return p


def python_expected() -> Counter[tuple[int, tuple[str, ...]]]:
    return Counter({(s.pid, tuple(map(frame_label, s.frames))): s.count
                    for s in python_profile()})


def test_python_frames_in_otlp_are_cpython_locations_without_mapping() -> None:
    request = convert(python_profile())
    assert otlp_stacks.stacks([request]) == python_expected()
    d = request.dictionary
    s = d.string_table
    by_frame: dict[tuple[str, str, int], profiles_pb2.Location] = {}
    functions: dict[tuple[str, str], int] = {}
    for loc in d.location_table[1:]:
        (index,) = loc.attribute_indices
        if d.attribute_table[index].value.string_value != "cpython":
            assert loc.mapping_index > 0
            continue
        (line,) = loc.lines
        fn = d.function_table[line.function_index]
        name, path = s[fn.name_strindex], s[fn.filename_strindex]
        # No symbol: a system name equal to the name would read as one still to demangle.
        assert (loc.mapping_index, loc.address, s[fn.system_name_strindex]) == (0, 0, "")
        by_frame[name, path, line.line] = loc
        functions[name, path] = line.function_index
    python_frames = (RUN_ONCE, HANDLE_RUN, HANDLER, HANDLER_LATER, ADMIN_HANDLER)
    assert set(by_frame) == {(f.name, f.module, f.line) for f in python_frames}
    # Lines 3 and 4 of handler: two locations of one function; admin.py's handler is another.
    assert functions["handler", "/srv/app.py"] != functions["handler", "/srv/admin.py"]
    assert len(set(functions.values())) == len(functions) == 4
    assert "/srv/app.py" not in {s[m.filename_strindex] for m in d.mapping_table}


def test_python_frames_in_pprof_match_otlp() -> None:
    pprof = PprofProfile.FromString(gzip.decompress(render_pprof(python_profile())))
    ps = pprof.string_table
    functions = {f.id: f for f in pprof.function}
    mapped = {m.id for m in pprof.mapping}

    def label(loc: Any) -> str:
        (line,) = loc.line
        fn = functions[line.function_id]
        if loc.mapping_id == 0:
            return f"{ps[fn.name]} ({short_file(ps[fn.filename])}:{line.line})"
        assert loc.mapping_id in mapped and line.line == 0 and fn.filename == 0
        return ps[fn.name]

    locations = {loc.id: label(loc) for loc in pprof.location}
    got: Counter[tuple[int, tuple[str, ...]]] = Counter()
    for sample in pprof.sample:
        pid = next(label.num for label in sample.label if ps[label.key] == "pid")
        got[pid, tuple(locations[i] for i in reversed(sample.location_id))] += sample.value[0]
    assert got == python_expected()
    assert sum(loc.mapping_id == 0 for loc in pprof.location) == 5


# -- metrics -----------------------------------------------------------------------------------


Named = dict[str, list[tuple[dict[str, object], metrics_pb2.Metric]]]


def metrics_by_name(request: ExportMetricsServiceRequest) -> Named:
    out: Named = {}
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == "ebpf_stream"
            for metric in sm.metrics:
                out.setdefault(metric.name, []).append((attrs(rm.resource), metric))
    return out


def point_attrs(point: metrics_pb2.NumberDataPoint) -> dict[str, object]:
    return otlp_stacks.resource_attributes(point)


def value(point: metrics_pb2.NumberDataPoint) -> float:
    return point.as_double if point.WhichOneof("value") == "as_double" else point.as_int


def test_process_cpu_time_per_process_by_mode() -> None:
    profile = sample_profile()
    request = EventConverter(resource_attributes={"service.name": "svc"}).convert_batch(
        Batch(profile)).metrics
    metrics = metrics_by_name(request)
    assert set(metrics) == {"process.cpu.time"}  # no stats given: no engine metrics
    expected: dict[int, Counter[str]] = {}
    for s in profile:
        mode = "system" if s.frames[-1].kind is FrameKind.KERNEL else "user"
        expected.setdefault(s.pid, Counter())[mode] += s.count
    got: dict[int, dict[str, float]] = {}
    for resource, metric in metrics["process.cpu.time"]:
        assert resource["service.name"] == "svc"
        assert metric.unit == "s"
        assert metric.WhichOneof("data") == "sum"
        assert metric.sum.is_monotonic
        assert metric.sum.aggregation_temporality == (
            metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA)
        pid = int(resource["process.pid"])  # type: ignore[call-overload]
        for point in metric.sum.data_points:
            assert (point.start_time_unix_nano, point.time_unix_nano) == (START, END)
            got.setdefault(pid, {})[str(point_attrs(point)["cpu.mode"])] = value(point)
    assert set(got) == set(expected)
    for pid, modes in expected.items():
        assert got[pid] == pytest.approx({m: c * PERIOD / 1e9 for m, c in modes.items()})
        assert sum(got[pid].values()) == pytest.approx(
            sum(s.count for s in profile if s.pid == pid) * PERIOD / 1e9)
    assert got[KWORKER_PID] == pytest.approx({"system": 2 * PERIOD / 1e9})
    assert got[10] == pytest.approx({"system": 3 * PERIOD / 1e9, "user": 6 * PERIOD / 1e9})


ENGINE_METRICS = {
    "ebpf_stream.samples.received", "ebpf_stream.samples.exported",
    "ebpf_stream.samples.dropped", "ebpf_stream.stacks.lost", "ebpf_stream.export.errors",
    "ebpf_stream.export.rejected", "ebpf_stream.overhead.cpu.utilization",
    "ebpf_stream.overhead.memory.usage",
}


def test_engine_metrics_carry_the_stats() -> None:
    stats = Stats(received=1000, dropped_kernel=7, dropped_user=5, exported=980,
                  lost_stacks=3, export_errors=2, undelivered=11, rejected=4)
    converter = EventConverter(resource_attributes={"service.name": "svc"})
    request = converter.convert_batch(Batch(sample_profile()), stats,
                                      Overhead(cpu_percent=1.5, memory_bytes=12_345_678)).metrics
    metrics = metrics_by_name(request)
    assert set(metrics) == ENGINE_METRICS | {"process.cpu.time"}

    engine: dict[str, metrics_pb2.Metric] = {}
    resources = []
    for name in ENGINE_METRICS:
        [(resource, engine[name])] = metrics[name]
        resources.append(resource)
    # All under one resource: the engine's own process.
    own = resources[0]
    assert all(r == own for r in resources)
    assert own["process.pid"] == os.getpid()
    assert own["service.name"] == "svc"

    def only(name: str) -> float:
        (point,) = engine[name].sum.data_points
        assert engine[name].sum.is_monotonic
        assert engine[name].sum.aggregation_temporality == (
            metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE)
        assert point.start_time_unix_nano == converter.started_ns
        assert point.time_unix_nano >= converter.started_ns
        return value(point)

    assert only("ebpf_stream.samples.received") == 1000
    assert only("ebpf_stream.samples.exported") == 980
    assert only("ebpf_stream.stacks.lost") == 3
    assert only("ebpf_stream.export.errors") == 2
    assert only("ebpf_stream.export.rejected") == 4
    dropped = engine["ebpf_stream.samples.dropped"].sum.data_points
    assert {point_attrs(p)["ebpf_stream.drop.reason"]: value(p) for p in dropped} == {
        "kernel": 7, "pipeline": 5, "export": 11}
    for name in ("ebpf_stream.samples.received", "ebpf_stream.samples.dropped"):
        assert engine[name].unit == "{sample}"
    (cpu,) = engine["ebpf_stream.overhead.cpu.utilization"].gauge.data_points
    assert engine["ebpf_stream.overhead.cpu.utilization"].unit == "1"
    assert cpu.as_double == pytest.approx(0.015)
    (memory,) = engine["ebpf_stream.overhead.memory.usage"].gauge.data_points
    assert engine["ebpf_stream.overhead.memory.usage"].unit == "By"
    assert memory.as_int == 12_345_678


def test_engine_metrics_without_samples_are_still_sent() -> None:
    converted = EventConverter(resource_attributes={}).convert_batch(
        Batch(Profile(period_ns=PERIOD, start_ns=START, end_ns=START)), Stats(received=3))
    assert set(metrics_by_name(converted.metrics)) == ENGINE_METRICS
    assert converted.profiles.ListFields() == []


@pytest.mark.parametrize(("kernel_stack", "mode"), [
    (-errno.EFAULT, "user"), (0x1_0000_0005, "system"), (-errno.ENOMEM, "system")])
def test_convert_event_to_metric(kernel_stack: int, mode: str) -> None:
    converter = EventConverter(EbpfConfig().with_sample_rate(49), resource_attributes={})
    period = round(1e9 / 49)
    sample = CpuSample(timestamp_ns=START, pid=42, tid=43, cpu=3, comm="worker",
                       user_stack=0x1_0000_0001, kernel_stack=kernel_stack)
    metric = converter.convert_event_to_metric(sample)
    assert (metric.name, metric.unit) == ("process.cpu.time", "s")
    assert metric.sum.is_monotonic
    assert metric.sum.aggregation_temporality == (
        metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA)
    (point,) = metric.sum.data_points
    assert point.as_double == pytest.approx(period / 1e9)
    assert (point.start_time_unix_nano, point.time_unix_nano) == (START - period, START)
    assert point_attrs(point) == {"process.pid": 42, "process.executable.name": "worker",
                                  "cpu.mode": mode, "cpu.logical_number": 3}


# -- logs --------------------------------------------------------------------------------------


def make_record(level: int, message: str, *args: object,
                exc_info: BaseException | None = None) -> logging.LogRecord:
    record = logging.getLogger("ebpf_stream").makeRecord(
        "ebpf_stream", level, "/src/ebpf_stream/_x.py", 42, message, args,
        (type(exc_info), exc_info, exc_info.__traceback__) if exc_info else None,
        func="flush")
    return record


def test_log_records_become_otlp_logs() -> None:
    try:
        raise ConnectionRefusedError(111, "refused")
    except ConnectionRefusedError as exc:
        error = exc
    records = [
        make_record(logging.DEBUG, "debug %d", 1),
        make_record(logging.INFO, "info"),
        make_record(logging.WARNING, "lost %d samples", 12),
        make_record(logging.ERROR, "export failed", exc_info=error),
        make_record(logging.CRITICAL, "fatal"),
        make_record(5, "trace"),
    ]
    request = EventConverter(resource_attributes={"service.name": "svc"}).convert_logs(records)
    (rl,) = request.resource_logs
    resource = attrs(rl.resource)
    assert resource["service.name"] == "svc"
    assert resource["process.pid"] == os.getpid()
    assert resource["process.executable.name"] == os.path.basename(sys.executable)
    (sl,) = rl.scope_logs
    assert sl.scope.name == "ebpf_stream"
    got = [(r.severity_number, r.severity_text, r.body.string_value) for r in sl.log_records]
    sev = logs_pb2.SeverityNumber
    assert got == [
        (sev.SEVERITY_NUMBER_DEBUG, "DEBUG", "debug 1"),
        (sev.SEVERITY_NUMBER_INFO, "INFO", "info"),
        (sev.SEVERITY_NUMBER_WARN, "WARNING", "lost 12 samples"),
        (sev.SEVERITY_NUMBER_ERROR, "ERROR", "export failed"),
        (sev.SEVERITY_NUMBER_FATAL, "CRITICAL", "fatal"),
        (sev.SEVERITY_NUMBER_TRACE, "Level 5", "trace"),
    ]
    for record, out in zip(records, sl.log_records, strict=True):
        assert out.time_unix_nano == pytest.approx(record.created * 1e9, abs=1000)
        assert out.observed_time_unix_nano == out.time_unix_nano
        a = otlp_stacks.resource_attributes(out)
        assert a["code.file.path"] == "/src/ebpf_stream/_x.py"
        assert a["code.line.number"] == 42
        assert a["code.function.name"] == "flush"
        assert a["logger.name"] == "ebpf_stream"
        if record.exc_info:
            assert a["exception.type"] == "ConnectionRefusedError"
            assert a["exception.message"] == "[Errno 111] refused"
        else:
            assert "exception.type" not in a


def test_no_log_records_give_an_empty_request() -> None:
    assert EventConverter(resource_attributes={}).convert_logs([]).ListFields() == []
