"""The pprof format."""

from __future__ import annotations

from sample_frames import EXT4, MAIN, PERIOD, READ, START
from sample_profiles import (
    HEALTH,
    ITEM,
    ITEM_AGAIN,
    decode_pprof,
    empty_profile,
    request_profile,
    sample_profile,
)

from ebpf_stream._model.dictionary import KERNEL_MAPPING
from ebpf_stream._model.profile import RequestContext
from ebpf_stream._outputs.pprof import render_pprof


def test_pprof_round_trip() -> None:
    out = decode_pprof(render_pprof(sample_profile()))
    s = out.string_table
    assert s[0] == ""
    assert [(s[t.type], s[t.unit]) for t in out.sample_type] == [
        ("samples", "count"), ("cpu", "nanoseconds")]
    assert (s[out.period_type.type], s[out.period_type.unit], out.period) == (
        "cpu", "nanoseconds", PERIOD)
    assert out.time_nanos == START
    assert out.duration_nanos == 2_000_000_000

    functions = {f.id: f for f in out.function}
    mappings = {m.id: m for m in out.mapping}
    locations = {loc.id: loc for loc in out.location}

    def names(sample_location_ids: list[int]) -> list[str]:
        return [s[functions[locations[i].line[0].function_id].name] for i in sample_location_ids]

    got = {}
    for sample in out.sample:
        pid, process = sample.label
        assert (s[pid.key], s[process.key]) == ("pid", "process")
        key = (pid.num, s[process.str], tuple(names(list(sample.location_id))))
        got[key] = list(sample.value)
    assert got == {
        (10, "app", ("ext4_file_read_iter", "vfs_read", "work", "main")): [3, 3 * PERIOD],
        (11, "app", ("ext4_file_read_iter", "vfs_read", "work", "main")): [2, 2 * PERIOD],
        (10, "app", ("work", "main")): [4, 4 * PERIOD],
        (20, "db", ("tmpl<int>::run&;go\nnow", "main")): [1, PERIOD],
        (20, "db", ("operator new(unsigned long)", "main")): [2, 2 * PERIOD],
    }

    # A function is its name, so "main" of app and of db is one entry; their locations
    # differ by mapping, and shared frames share a location.
    assert sorted(s[f.name] for f in out.function).count("main") == 1
    assert len(out.location) == 7
    mains = {locations[i].mapping_id for i in locations
             if s[functions[locations[i].line[0].function_id].name] == "main"}
    assert len(mains) == 2
    assert len({(s[f.name], f.id) for f in out.function}) == len(out.function)

    by_address = {loc.address: loc for loc in out.location}
    kernel_mapping = mappings[by_address[READ.address].mapping_id]
    assert s[kernel_mapping.filename] == KERNEL_MAPPING
    assert by_address[EXT4.address].mapping_id == kernel_mapping.id
    assert s[mappings[by_address[MAIN.address].mapping_id].filename] == "/usr/bin/app"
    assert sorted(s[m.filename] for m in out.mapping) == sorted(
        [KERNEL_MAPPING, "/usr/bin/app", "/usr/bin/db", "/usr/lib/libodd.so"])
    for loc in out.location:
        mapping = mappings[loc.mapping_id]
        assert mapping.has_functions
        assert mapping.memory_start <= loc.address < mapping.memory_limit


def test_pprof_is_deterministic_and_handles_empty_profiles() -> None:
    assert render_pprof(sample_profile()) == render_pprof(sample_profile())
    out = decode_pprof(render_pprof(empty_profile()))
    assert len(out.sample) == 0
    assert out.string_table[0] == ""



def test_pprof_labels_samples_with_their_request() -> None:
    out = decode_pprof(render_pprof(request_profile()))
    s = out.string_table
    functions = {f.id: s[f.name] for f in out.function}
    locations = {loc.id: functions[loc.line[0].function_id] for loc in out.location}
    got = {}
    for sample in out.sample:
        labels = {s[label.key]: s[label.str] for label in sample.label
                  if s[label.key] not in ("pid", "process")}
        stack = tuple(locations[i] for i in reversed(sample.location_id))
        got[stack, frozenset(labels.items())] = sample.value[0]

    def span(context: RequestContext) -> set[tuple[str, str]]:
        return {("trace_id", context.trace_id), ("span_id", context.span_id)}

    items = {("http.route", "/items/{id}"), ("http.request.method", "GET")}
    assert got == {
        (("main", "work"), frozenset(span(ITEM) | items)): 3,
        (("main", "work"), frozenset(span(ITEM_AGAIN) | items)): 2,
        (("main", "work", "vfs_read"),  # routed without tracing: no ids
         frozenset({("http.route", "/checkout"), ("http.request.method", "POST")})): 4,
        (("main", "work"), frozenset()): 1,  # outside any request
        (("main",), frozenset(span(HEALTH) | {("http.route", "/health")})): 2,  # no method
    }
