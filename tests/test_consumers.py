"""Our files, read by the tools people open them with.

Each format is read by its real consumer: ``go tool pprof`` (Debian's
golang-go) for pprof, speedscope's own importer (npm ``speedscope``, run in
node) for speedscope JSON, protobuf's strict ``json_format.Parse`` for every
OTLP/JSON line, and Chromium for the flame graph's script.  ``./run test``
installs the tools; a test whose tool is absent skips, saying which.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _support import WORKLOADS, chromium, go_command, node_package
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from otlp_json_decode import decode_otlp_json
from sample_frames import EVAL, MAIN, PERIOD, READ, START, kernel, native, python
from sample_profiles import ITEM, ITEM_AGAIN, request_profile
from test_otlp_trace import make_batch

from ebpf_stream._convert.pprof_pb2 import Profile as PprofProfile
from ebpf_stream._model.labels import KERNEL_SUFFIX, frame_label
from ebpf_stream._model.profile import Frame, Profile
from ebpf_stream._outputs.flamegraph import WIDTH, render_flamegraph_svg
from ebpf_stream._outputs.pprof import render_pprof
from ebpf_stream._outputs.speedscope import render_speedscope
from ebpf_stream.exporters import Batch, OtlpJsonFileExporter, SpeedscopeFileExporter

CLI = [sys.executable, "-m", "ebpf_stream._cli"]
CONSUMERS = Path(__file__).parent / "consumers"

# Python names that pprof's heuristics for demangled C++ would cut short, and the
# names our symbolizers give frames they cannot name.
MODULE = python("<module>", "/srv/work.py", 30)
LISTCOMP = python("main.<locals>.<listcomp>", "/srv/work.py", 12)
LAMBDA = python("<lambda>", "/srv/work.py", 5)
GENEXPR = python("<genexpr>", "/srv/work.py", 7)
LOST = python("[python stack lost]", "[unknown]", 0)
UNKNOWN = native("[unknown]+0x7f00123456", module="[unknown]", address=0x7F00123456)
SYSCALL = kernel("entry_SYSCALL_64_after_hwframe", address=0xFFFF_FFFF_8100_0000)
# A C++ symbol: pprof demangles it, as it does every native function's system name.
MANGLED = native("_ZN3foo3barEv", address=0x1300)
DEMANGLED = {MANGLED.name: "foo::bar"}


def odd_names_profile() -> Profile:
    p = Profile(period_ns=PERIOD, start_ns=START + 123_456_789,
                end_ns=START + 123_456_789 + 2_500_000_001)
    p.add(10, "python", (EVAL, MODULE, LISTCOMP, MANGLED, SYSCALL, READ), count=3)
    p.add(10, "python", (EVAL, MODULE, LAMBDA, UNKNOWN), count=2)
    p.add(11, "python", (EVAL, MODULE, GENEXPR), count=4)
    p.add(11, "python", (LOST,), count=1)
    p.add(12, "app", (MAIN,), count=5)
    return p


# -- go tool pprof -----------------------------------------------------------


def pprof(path: Path, *options: str) -> str:
    result = subprocess.run([go_command(), "tool", "pprof", *options, str(path)],
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "TZ": "UTC"})
    assert result.returncode == 0, result.stderr
    return result.stdout


_TOP_ROW = re.compile(r"^\s*(\d+)\s+\S+%\s+\S+%\s+\d+\s+\S+%\s+(.+)$")


def pprof_top(path: Path) -> dict[str, int]:
    """Samples by leaf function name, from ``go tool pprof -top``."""
    out = pprof(path, "-top", "-sample_index=samples", "-nodefraction=0", "-nodecount=100000")
    rows = out.partition("      flat  flat%   sum%        cum   cum%\n")[2]
    assert rows, out
    flat = {}
    for row in rows.splitlines():
        match = _TOP_ROW.match(row)
        assert match, row
        flat[match[2]] = int(match[1])
    return flat


def pprof_labelled_traces(path: Path, *options: str,
                          ) -> Counter[tuple[frozenset[tuple[str, str]], tuple[str, ...]]]:
    """Samples by labels and root-first stack of function names, from ``go tool pprof
    -traces``.

    Each trace prints its labels (``%10s:  value``, a longer key in full) and
    then its frames, leaf first, as ``%10s   name`` with the sample's value on
    the first: a frame's line alone has three spaces after its tenth character.
    """
    out = pprof(path, "-traces", "-sample_index=samples", *options)
    traces: Counter[tuple[frozenset[tuple[str, str]], tuple[str, ...]]] = Counter()
    for trace in out.split("-----------+" + "-" * 55 + "\n")[1:]:
        lines = [line for line in trace.splitlines() if line[10:13] == "   "]
        labels = {line.strip().partition(":  ")[::2]
                  for line in trace.splitlines() if line and line[10:13] != "   "}
        if lines:
            stack = tuple(line[13:] for line in reversed(lines))
            traces[frozenset(labels), stack] += int(lines[0][:10])
    return traces


def pprof_traces(path: Path) -> Counter[tuple[str, ...]]:
    """Samples by root-first stack of function names, from ``go tool pprof -traces``."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for (_, stack), count in pprof_labelled_traces(path).items():
        stacks[stack] += count
    return stacks


# The units pprof scales a duration to, in seconds.
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "mins": 60.0, "hrs": 3600.0,
                   "days": 86400.0}


def pprof_time_and_duration(path: Path) -> tuple[str, float]:
    """The profile's start as ``-raw`` prints it (Go's time.Time in UTC, to the ns)
    and its duration in seconds as the reports' header prints it (to 3 digits)."""
    time = re.search(r"^Time: (.+)$", pprof(path, "-raw"), re.MULTILINE)
    duration = re.search(r"^Duration: ([\d.]+)([a-z]+),", pprof(path, "-top"), re.MULTILINE)
    assert time and duration
    return time[1], float(duration[1]) * _DURATION_UNITS[duration[2]]


def go_time(ns: int) -> str:
    """How Go's time.Time.String prints ``ns`` since the epoch, in UTC."""
    seconds, fraction = divmod(ns, 10**9)
    text = datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}{f'.{fraction:09d}'.rstrip('0') if fraction else ''} +0000 UTC"


def function_names(frames: tuple[Frame, ...]) -> tuple[str, ...]:
    return tuple(DEMANGLED.get(f.name, f.name) for f in frames)


def test_pprof_names_every_function_as_the_profile_does(tmp_path: Path) -> None:
    profile = odd_names_profile()
    path = tmp_path / "odd.pb.gz"
    path.write_bytes(render_pprof(profile))

    expected: Counter[tuple[str, ...]] = Counter()
    for s in profile:
        expected[function_names(s.frames)] += s.count
    assert pprof_traces(path) == expected
    leaves: Counter[str] = Counter()
    for stack, count in expected.items():
        leaves[stack[-1]] += count
    flat = pprof_top(path)
    assert {name: n for name, n in flat.items() if n} == leaves
    assert set(flat) == {name for stack in expected for name in stack}


def test_pprof_shows_each_samples_request_and_slices_by_it(tmp_path: Path) -> None:
    profile = request_profile()
    path = tmp_path / "requests.pb.gz"
    path.write_bytes(render_pprof(profile))
    expected: Counter[tuple[frozenset[tuple[str, str]], tuple[str, ...]]] = Counter()
    for s in profile:
        labels = {("pid", str(s.pid)), ("process", s.process)}
        if s.context is not None:
            labels |= {(key, value) for key, value in (
                ("trace_id", s.context.trace_id), ("span_id", s.context.span_id),
                ("http.route", s.context.route), ("http.request.method", s.context.method))
                if value}
        expected[frozenset(labels), function_names(s.frames)] += s.count
    assert pprof_labelled_traces(path) == expected
    # One trace's stacks, and one endpoint's.
    assert sum(pprof_labelled_traces(path, f"-tagfocus=trace_id={ITEM.trace_id}").values()) == (
        sum(s.count for s in profile if s.context and s.context.trace_id == ITEM.trace_id))
    assert sum(pprof_labelled_traces(path, "-tagfocus=http.request.method=GET").values()) == (
        sum(s.count for s in profile if s.context == ITEM or s.context == ITEM_AGAIN))


def test_pprof_reads_the_profiles_time_and_duration(tmp_path: Path) -> None:
    profile = odd_names_profile()
    path = tmp_path / "odd.pb.gz"
    path.write_bytes(render_pprof(profile))
    assert pprof_time_and_duration(path) == (
        go_time(profile.start_ns), pytest.approx((profile.end_ns - profile.start_ns) / 1e9,
                                                 rel=0.01))


# -- speedscope --------------------------------------------------------------


def speedscope_import(path: Path) -> dict[str, Any]:
    """What speedscope's importer reads from ``path`` (see consumers/speedscope_import.mjs)."""
    package = node_package("speedscope")
    result = subprocess.run(["node", str(CONSUMERS / "speedscope_import.mjs"), str(package),
                             str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def time_order(profile: dict[str, Any], names: set[str]) -> list[str]:
    """The names, among ``names``, of the boxes the Time Order view draws, left to
    right, a name that recurs at once counted once."""
    order: list[str] = []
    for _, label, _, _ in profile["calls"]:
        name = label.partition(" (")[0]
        if name in names and order[-1:] != [name]:
            order.append(name)
    return order


ALPHA = python("alpha", "/srv/alternate.py", 20)
BETA = python("beta", "/srv/alternate.py", 24)


def alternating(phases: int, per_phase: int, start: int = START) -> Profile:
    """A process that runs alpha, then beta, and so on, ``per_phase`` samples each."""
    p = Profile(period_ns=PERIOD, start_ns=start, end_ns=start + phases * per_phase * PERIOD)
    for phase in range(phases):
        leaf = BETA if phase % 2 else ALPHA
        first = start + phase * per_phase * PERIOD
        p.add(10, "python", (EVAL, MODULE, leaf), count=per_phase,
              timestamps_ns=[first + i * PERIOD for i in range(per_phase)])
    return p


def test_speedscope_time_order_shows_what_ran_when(tmp_path: Path) -> None:
    path = tmp_path / "alternating.speedscope.json"
    path.write_text(render_speedscope(alternating(90, 3)))
    loaded = speedscope_import(path)
    assert loaded["warnings"] == []
    (profile,) = loaded["profiles"]
    assert (profile["name"], profile["unit"]) == ("python (10)", "nanoseconds")
    assert profile["totalWeight"] == 90 * 3 * PERIOD
    assert time_order(profile, {"alpha", "beta"}) == ["alpha", "beta"] * 45


@pytest.mark.anyio
async def test_speedscope_file_keeps_time_order_across_exports(tmp_path: Path) -> None:
    path = tmp_path / "out.speedscope.json"
    exporter = SpeedscopeFileExporter(path)
    # Two intervals; the samples of each come grouped by stack, not in time order.
    await exporter.export(Batch(alternating(5, 2)))
    await exporter.export(Batch(alternating(5, 2, start=START + 10 * PERIOD)))
    await exporter.aclose()
    loaded = speedscope_import(path)
    assert loaded["warnings"] == []
    (profile,) = loaded["profiles"]
    # The last alpha of the first interval runs on into the first of the second.
    assert time_order(profile, {"alpha", "beta"}) == ["alpha", "beta"] * 4 + ["alpha"]
    assert profile["totalWeight"] == 20 * PERIOD


def test_speedscope_loads_every_kind_of_frame_without_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "odd.json"  # no .speedscope.json: found by its $schema
    profile = odd_names_profile()
    path.write_text(render_speedscope(profile))
    loaded = speedscope_import(path)
    assert loaded["warnings"] == []
    assert [p["name"] for p in loaded["profiles"]] == ["app (12)", "python (10)", "python (11)"]
    assert sum(p["totalWeight"] for p in loaded["profiles"]) == profile.sample_count * PERIOD


def test_speedscope_reads_stacks_rooted_at_their_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "routes.speedscope.json"
    profile = request_profile()
    path.write_text(render_speedscope(profile, by_route=True))
    loaded = speedscope_import(path)
    assert loaded["warnings"] == []
    (read,) = loaded["profiles"]
    roots: Counter[str] = Counter()
    for depth, name, start, end in read["calls"]:
        if depth == 0:
            roots[name] += end - start
    assert roots == {"GET /items/{id}": 5 * PERIOD, "POST /checkout": 4 * PERIOD,
                     "/health": 2 * PERIOD, "[no route]": PERIOD}


# -- OTLP/JSON ---------------------------------------------------------------

REQUEST_TYPES: dict[str, type[Message]] = {
    "resourceProfiles": ExportProfilesServiceRequest,
    "resourceMetrics": ExportMetricsServiceRequest,
    "resourceLogs": ExportLogsServiceRequest,
}


def parse_strictly(line: bytes) -> Message:
    """``line`` read by protobuf's own proto3 JSON parser, which refuses unknown fields,
    wrong types and malformed values."""
    (message_type,) = {REQUEST_TYPES[key] for key in json.loads(line) if key in REQUEST_TYPES}
    message = message_type()
    json_format.Parse(line, message)
    return message


@pytest.mark.anyio
async def test_every_otlp_json_line_is_proto3_json_to_protobufs_strict_parser(
        tmp_path: Path) -> None:
    path = tmp_path / "out.otlp.jsonl"
    exporter = OtlpJsonFileExporter(path)
    await exporter.export(make_batch())  # every kind of record and of totals
    await exporter.export(Batch(odd_names_profile()))
    await exporter.aclose()
    parsed = [parse_strictly(line) for line in path.read_bytes().splitlines()]
    assert [type(m) for m in parsed] == [
        ExportProfilesServiceRequest, ExportMetricsServiceRequest, ExportLogsServiceRequest,
        ExportProfilesServiceRequest, ExportMetricsServiceRequest]


# -- the flame graph in a browser --------------------------------------------

SEARCHED = "rgb(230,0,230)"


def in_browser(svg: Path, actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What Chromium shows of ``svg`` as loaded and after each action (see
    consumers/flamegraph_browser.mjs)."""
    playwright = node_package("playwright-core")
    result = subprocess.run(["node", str(CONSUMERS / "flamegraph_browser.mjs"), str(playwright),
                             str(chromium()), str(svg), json.dumps(actions)],
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    states: list[dict[str, Any]] = json.loads(result.stdout)
    return states


def test_flame_graph_zooms_searches_and_resets_as_flamegraph_pl_does(tmp_path: Path) -> None:
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=START + 12 * PERIOD)
    p.add(10, "python", (EVAL, MODULE, ALPHA), count=6)
    p.add(10, "python", (EVAL, MODULE, BETA), count=3)
    p.add(12, "app", (MAIN,), count=3)
    svg = tmp_path / "flame.svg"
    svg.write_text(render_flamegraph_svg(p))
    alpha = frame_label(ALPHA)
    loaded_names = [f[0] for f in in_browser(svg, [])[0]["frames"]]

    states = in_browser(svg, [
        {"clickFrame": loaded_names.index(alpha)},
        {"click": "#unzoom"},
        {"press": "Control+f", "answer": "ALPHA"},
        {"press": "Control+i"},
        {"click": "#search"},
        {"press": "F3", "answer": "^beta"},
        {"press": "Escape"},
        {"click": "#ignorecase"},
        {"click": "#search", "answer": "("},
    ])
    loaded, zoomed, reset, sensitive, insensitive, cleared, beta, escaped, case_off, bad = (
        states)

    def frame(state: dict[str, Any], name: str) -> list[Any]:
        (found,) = [f for f in state["frames"] if f[0] == name]
        return found

    def searched(state: dict[str, Any]) -> set[str]:
        return {f[0] for f in state["frames"] if f[3] == SEARCHED}

    assert (loaded["unzoom"], loaded["search"], loaded["ignorecase"], loaded["matched"]) == (
        False, "Search", "", "")
    # A click zooms into the frame: it spans the graph, and "Reset Zoom" appears.
    assert frame(zoomed, alpha)[2] == pytest.approx(frame(loaded, "all")[2])
    assert not frame(zoomed, "app")[4]
    assert zoomed["unzoom"]
    # "Reset Zoom" puts every frame back and hides itself.
    assert reset["frames"] == loaded["frames"]
    assert not reset["unzoom"]
    # Ctrl-F asks for a regular expression; the search is case-sensitive...
    assert sensitive["dialogs"] == ["Search frames (regular expression):"]
    assert (searched(sensitive), sensitive["matched"]) == (set(), "Matched: 0.00%")
    # ... until "ic" (Ctrl-I) turns case off, which searches again.
    assert insensitive["ignorecase"] == "on"
    assert (searched(insensitive), insensitive["matched"]) == ({alpha}, "Matched: 50.00%")
    assert insensitive["search"] == "Reset Search"
    # "Reset Search" clears the search and restores every frame's color.
    assert cleared["frames"] == loaded["frames"]
    assert (cleared["search"], cleared["matched"]) == ("Search", "")
    # F3 searches too, and the prompt says case is ignored; Escape clears the search.
    assert beta["dialogs"] == ["Search frames (regular expression, ignoring case):"]
    assert (searched(beta), beta["matched"]) == ({frame_label(BETA)}, "Matched: 25.00%")
    assert escaped["frames"] == loaded["frames"]
    assert (escaped["search"], escaped["matched"]) == ("Search", "")
    assert case_off["ignorecase"] == ""
    # A bad regular expression says so and changes nothing.
    assert bad["matched"] == "Invalid regular expression: ("
    assert bad["frames"] == loaded["frames"]
    assert frame(loaded, "all")[2] == pytest.approx(WIDTH - 20)


# -- a real workload ---------------------------------------------------------


def names_in_folded(path: Path) -> set[str]:
    """Every function name the folded file shows: Python frames without their
    ``(file:line)``, kernel ones without their suffix, processes left out."""
    names = set()
    for line in path.read_text().splitlines():
        for label in line.rpartition(" ")[0].split(";")[1:]:
            if label.endswith(")") and " (" in label:
                label = label.rpartition(" (")[0]
            names.add(label.removesuffix(KERNEL_SUFFIX))
    return names


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_a_recorded_python_program_reads_right_in_every_consumer(tmp_path: Path) -> None:
    phases = 20
    outputs = {fmt: tmp_path / f"out.{fmt}" for fmt in
               ("folded", "pb.gz", "speedscope.json", "otlp.jsonl")}
    result = subprocess.run(
        [*CLI, "record", "--rate", "99", *(a for p in outputs.values() for a in ("-o", str(p))),
         "--", sys.executable, str(WORKLOADS / "python" / "alternate.py"), str(phases), "150"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr

    # pprof names every function as the folded file does, <module> included.
    folded_names = names_in_folded(outputs["folded"])
    assert {"<module>", "alpha", "beta", "spin"} <= folded_names
    assert set(pprof_top(outputs["pb.gz"])) == folded_names
    assert {name for stack in pprof_traces(outputs["pb.gz"]) for name in stack} == folded_names
    # Its header names the program, which pprof takes from the first mapping.
    header = re.search(r"^File: (.+)$", pprof(outputs["pb.gz"], "-top"), re.MULTILINE)
    assert header and os.path.basename(header[1]) == os.path.basename(
        os.path.realpath(sys.executable))
    written = PprofProfile()
    written.ParseFromString(gzip.decompress(outputs["pb.gz"].read_bytes()))
    assert pprof_time_and_duration(outputs["pb.gz"]) == (
        go_time(written.time_nanos), pytest.approx(written.duration_nanos / 1e9, rel=0.01))

    # Its time window holds every sample, as the OTLP/JSON lines time them.
    lines = outputs["otlp.jsonl"].read_bytes().splitlines()
    times = [t for line in lines if b'"resourceProfiles"' in line
             for rp in decode_otlp_json(line, ExportProfilesServiceRequest).resource_profiles
             for sp in rp.scope_profiles for p in sp.profiles for s in p.samples
             for t in s.timestamps_unix_nano]
    assert times
    assert written.time_nanos <= min(times)
    assert max(times) < written.time_nanos + written.duration_nanos

    # speedscope's Time Order view shows the program's alternation.
    loaded = speedscope_import(outputs["speedscope.json"])
    assert loaded["warnings"] == []
    (profile,) = [p for p in loaded["profiles"] if p["name"].startswith("python")]
    assert time_order(profile, {"alpha", "beta"}) == ["alpha", "beta"] * (phases // 2)

    # Every OTLP/JSON line is proto3 JSON to protobuf's strict parser.
    parsed = [parse_strictly(line) for line in lines]
    assert {type(m) for m in parsed} >= {ExportProfilesServiceRequest,
                                         ExportMetricsServiceRequest}
