"""The output formats and the exporters that write them."""

from __future__ import annotations

import gzip
import json
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import otlp_stacks
import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from otlp_json_decode import decode_otlp_json
from sample_frames import (
    DB_MAIN,
    EVAL,
    EXT4,
    HANDLE_RUN,
    HANDLER,
    HANDLER_LATER,
    MAIN,
    PERIOD,
    READ,
    RUN_ONCE,
    START,
    WORK,
    native,
)

from ebpf_stream._base.errors import ConfigError, ExportError
from ebpf_stream._convert.pprof_pb2 import Profile as PprofProfile
from ebpf_stream._model.dictionary import KERNEL_MAPPING
from ebpf_stream._model.profile import Profile
from ebpf_stream._outputs.flamegraph import WIDTH, render_flamegraph_svg
from ebpf_stream._outputs.folded import render_folded
from ebpf_stream._outputs.formats import FORMATS, format_for_path
from ebpf_stream._outputs.otlp.json_file import OtlpJsonFileExporter
from ebpf_stream._outputs.pprof import render_pprof
from ebpf_stream._outputs.speedscope import SCHEMA, render_speedscope
from ebpf_stream.exporters import (
    Batch,
    Exporter,
    FlamegraphSvgExporter,
    FoldedFileExporter,
    MemoryExporter,
    PprofFileExporter,
    SpeedscopeFileExporter,
)

SVG = "{http://www.w3.org/2000/svg}"
ODD = native("tmpl<int>::run&;go\nnow", module="/usr/lib/libodd.so", address=0x3000)


def sample_profile() -> Profile:
    """Two pids of "app" sharing a stack, one with a kernel tail, and "db" with an odd name."""
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=START + 2_000_000_000)
    p.add(10, "app", (MAIN, WORK, READ, EXT4), count=3, timestamps_ns=[START + 1] * 3)
    p.add(11, "app", (MAIN, WORK, READ, EXT4), count=2)
    p.add(10, "app", (MAIN, WORK), count=4)
    p.add(20, "db", (DB_MAIN, ODD), count=1)
    p.add(20, "db", (DB_MAIN, native("operator new(unsigned long)", address=0x4000)), count=2)
    return p


def empty_profile() -> Profile:
    return Profile(period_ns=PERIOD, start_ns=START, end_ns=START)


# -- folded ------------------------------------------------------------------


def test_folded_lines_are_root_first_merged_across_pids_and_sorted() -> None:
    assert render_folded(sample_profile()).splitlines() == [
        "app;main;work 4",
        "app;main;work;vfs_read_[k];ext4_file_read_iter_[k] 5",
        "db;main;operator new(unsigned long) 2",
        "db;main;tmpl<int>::run&:go now 1",
    ]


def test_folded_count_follows_the_last_space() -> None:
    for line in render_folded(sample_profile()).splitlines():
        stack, count = line.rsplit(" ", 1)
        assert int(count) > 0
        assert "\n" not in stack


def test_folded_empty_profile_is_an_empty_file() -> None:
    assert render_folded(empty_profile()) == ""


def test_folded_never_writes_an_empty_or_unencodable_name() -> None:
    p = empty_profile()
    p.add(1, "", (native("bad\udcff"),), count=1)
    line = render_folded(p)
    assert line == "[unknown];bad? 1\n"
    line.encode("utf-8")


# -- pprof -------------------------------------------------------------------


def decode_pprof(data: bytes) -> PprofProfile:
    out = PprofProfile()
    out.ParseFromString(gzip.decompress(data))
    return out


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


# -- speedscope --------------------------------------------------------------


def test_speedscope_structure_and_weights() -> None:
    doc = json.loads(render_speedscope(sample_profile()))
    assert doc["$schema"] == SCHEMA
    frames = doc["shared"]["frames"]
    names = [f["name"] for f in frames]
    assert "vfs_read_[k]" in names
    assert {"name": "ext4_file_read_iter_[k]", "file": "ext4"} in frames
    assert len(names) == len(set(zip(names, [f["file"] for f in frames], strict=True)))

    profiles = {p["name"]: p for p in doc["profiles"]}
    assert list(profiles) == ["app (10)", "app (11)", "db (20)"]
    for p in profiles.values():
        assert (p["type"], p["unit"], p["startValue"]) == ("sampled", "nanoseconds", 0)
        assert p["endValue"] == sum(p["weights"])
        assert len(p["samples"]) == len(p["weights"])

    def stacks(p: dict[str, Any]) -> dict[tuple[str, ...], int]:
        return {tuple(names[i] for i in sample): weight
                for sample, weight in zip(p["samples"], p["weights"], strict=True)}

    assert stacks(profiles["app (10)"]) == {
        ("main", "work", "vfs_read_[k]", "ext4_file_read_iter_[k]"): 3 * PERIOD,
        ("main", "work"): 4 * PERIOD,
    }
    assert stacks(profiles["app (11)"]) == {
        ("main", "work", "vfs_read_[k]", "ext4_file_read_iter_[k]"): 2 * PERIOD,
    }


def test_speedscope_empty_profile_is_valid_json() -> None:
    doc = json.loads(render_speedscope(empty_profile()))
    assert doc["profiles"] == []
    assert doc["shared"]["frames"] == []


# -- SVG flame graph ---------------------------------------------------------


def frames_of(svg: str) -> dict[str, ET.Element]:
    """Each drawn frame's <g>, by the name in its tooltip."""
    root = ET.fromstring(svg)
    out = {}
    for g in root.iter(f"{SVG}g"):
        tip = g.findtext(f"{SVG}title")
        assert tip is not None
        out[tip[: tip.rindex(" (")]] = g
    return out


def width(g: ET.Element) -> float:
    rect = g.find(f"{SVG}rect")
    assert rect is not None
    return float(rect.attrib["width"])


def test_svg_is_valid_xml_with_escaped_names_and_proportional_widths() -> None:
    svg = render_flamegraph_svg(sample_profile(), title="<cpu> & more")
    frames = frames_of(svg)
    assert {"all", "app", "db", "main", "work", "vfs_read_[k]",
            "tmpl<int>::run&:go now"} <= set(frames)
    assert "&lt;int&gt;::run&amp;:go now" in svg
    assert "&lt;cpu&gt; &amp; more" in svg

    total = width(frames["all"])
    assert width(frames["app"]) == pytest.approx(total * 9 / 12, abs=0.01)
    assert width(frames["db"]) == pytest.approx(total * 3 / 12, abs=0.01)
    tip = frames["app"].findtext(f"{SVG}title")
    assert tip == "app (9 samples, 75.00%)"

    # Root at the bottom: callees are drawn above their callers.
    def y(g: ET.Element) -> float:
        rect = g.find(f"{SVG}rect")
        assert rect is not None
        return float(rect.attrib["y"])

    assert y(frames["all"]) > y(frames["app"]) > y(frames["work"]) > y(frames["vfs_read_[k]"])
    # Kernel frames get their own hue.
    kernel_fill = frames["vfs_read_[k]"].find(f"{SVG}rect")
    user_fill = frames["work"].find(f"{SVG}rect")
    assert kernel_fill is not None and user_fill is not None
    assert kernel_fill.attrib["fill"] != user_fill.attrib["fill"]


def test_svg_omits_tiny_frames_and_truncates_long_names() -> None:
    p = empty_profile()
    long_name = "x" * 400
    p.add(1, "app", (native("hot"),), count=100_000)
    p.add(1, "app", (native("rare"),), count=1)
    p.add(1, "app", (native("hot"), native(long_name)), count=20_000)
    frames = frames_of(render_flamegraph_svg(p))
    assert "rare" not in frames
    text = frames[long_name].findtext(f"{SVG}text")
    assert text is not None and text.endswith("..") and len(text) < len(long_name)
    assert frames["hot"].findtext(f"{SVG}text") == "hot"
    assert width(frames["all"]) <= WIDTH


def test_svg_without_samples_says_so() -> None:
    svg = render_flamegraph_svg(empty_profile())
    root = ET.fromstring(svg)
    assert "No samples" in "".join(root.itertext())
    assert frames_of(svg) == {}


# -- Python frames -----------------------------------------------------------

PYTHON_ROOT = ("python3;main;_PyEval_EvalFrameDefault;"
               "BaseEventLoop._run_once (asyncio/base_events.py:1922);"
               "Handle._run (asyncio/events.py:80)")


def python_profile() -> Profile:
    """An asyncio service's merged stacks, in two lines of one handler."""
    p = empty_profile()
    p.add(40, "python3", (MAIN, EVAL, RUN_ONCE, HANDLE_RUN, HANDLER), count=3)
    p.add(40, "python3", (MAIN, EVAL, RUN_ONCE, HANDLE_RUN, HANDLER_LATER), count=1)
    return p


def test_folded_python_frames_read_qualname_file_and_line() -> None:
    assert render_folded(python_profile()).splitlines() == [
        f"{PYTHON_ROOT};handler (app.py:3) 3",
        f"{PYTHON_ROOT};handler (app.py:4) 1",
    ]


def test_speedscope_python_frames_carry_their_source_file_and_line() -> None:
    frames = json.loads(render_speedscope(python_profile()))["shared"]["frames"]
    assert {"name": "handler (app.py:3)", "file": "/srv/app.py", "line": 3} in frames
    assert {"name": "handler (app.py:4)", "file": "/srv/app.py", "line": 4} in frames
    assert {"name": "Handle._run (asyncio/events.py:80)",
            "file": "/usr/lib/python3.11/asyncio/events.py", "line": 80} in frames
    assert {"name": "main", "file": "/usr/bin/app"} in frames  # native: no line
    assert len(frames) == 6


def test_svg_python_frames_are_labelled_like_folded() -> None:
    frames = frames_of(render_flamegraph_svg(python_profile()))
    assert {"BaseEventLoop._run_once (asyncio/base_events.py:1922)",
            "Handle._run (asyncio/events.py:80)", "handler (app.py:3)",
            "handler (app.py:4)"} <= set(frames)
    assert frames["handler (app.py:3)"].findtext(f"{SVG}title") == (
        "handler (app.py:3) (3 samples, 75.00%)")


# -- exporters ---------------------------------------------------------------


def batch(count: int) -> Batch:
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=START + 1)
    p.add(10, "app", (MAIN, WORK, READ), count=count, timestamps_ns=[START] * count)
    return Batch(p)


@pytest.mark.anyio
async def test_file_exporter_rewrites_atomically_with_cumulative_counts(tmp_path: Path) -> None:
    path = tmp_path / "out.folded"
    exporter = FoldedFileExporter(path)
    assert isinstance(exporter, Exporter)
    await exporter.export(batch(2))
    assert path.read_text() == "app;main;work;vfs_read_[k] 2\n"
    with path.open() as before:
        await exporter.export(batch(3))
        # The file was replaced, not rewritten in place: a reader keeps a whole file.
        assert before.read() == "app;main;work;vfs_read_[k] 2\n"
    assert path.read_text() == "app;main;work;vfs_read_[k] 5\n"
    await exporter.aclose()
    assert path.read_text() == "app;main;work;vfs_read_[k] 5\n"
    assert os.listdir(tmp_path) == ["out.folded"]


@pytest.mark.anyio
async def test_file_exporter_does_not_alias_or_keep_timestamps(tmp_path: Path) -> None:
    exporter = FoldedFileExporter(tmp_path / "out.folded")
    first = batch(2)
    await exporter.export(first)
    await exporter.export(batch(3))
    assert first.profile.sample_count == 2
    assert exporter._profile is not None
    assert all(s.timestamps_ns == [] for s in exporter._profile)


@pytest.mark.anyio
async def test_file_exporter_renders_in_a_worker_thread(tmp_path: Path) -> None:
    threads: list[int] = []

    class Recording(FoldedFileExporter):
        def render(self, profile: Profile) -> bytes:
            threads.append(threading.get_ident())
            return super().render(profile)

    exporter = Recording(tmp_path / "out.folded")
    async with anyio.create_task_group() as tg:
        for n in (1, 2, 3):
            tg.start_soon(exporter.export, batch(n))
    assert threads and threading.get_ident() not in threads
    assert (tmp_path / "out.folded").read_text() == "app;main;work;vfs_read_[k] 6\n"


def check_file(fmt: str, path: Path, samples: int) -> None:
    data = path.read_bytes()
    if fmt == "folded":
        assert sum(int(line.rsplit(" ", 1)[1]) for line in data.decode().splitlines()) == samples
    elif fmt == "pprof":
        assert sum(s.value[0] for s in decode_pprof(data).sample) == samples
    elif fmt == "otlp-json":
        lines = data.splitlines()
        requests = [decode_otlp_json(line, ExportProfilesServiceRequest) for line in lines
                    if b'"resourceProfiles"' in line]
        assert sum(otlp_stacks.stacks(requests).values()) == samples
    elif fmt == "speedscope":
        doc = json.loads(data)
        assert sum(w for p in doc["profiles"] for w in p["weights"]) == samples * PERIOD
    else:
        root = ET.fromstring(data)
        if samples:
            assert frames_of(data.decode())["all"].findtext(f"{SVG}title") == (
                f"all ({samples} samples, 100.00%)")
        else:
            assert "No samples" in "".join(root.itertext())


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", sorted(FORMATS))
async def test_every_format_writes_cumulative_files(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / f"out.{fmt}"
    exporter = FORMATS[fmt](path)
    await exporter.export(batch(2))
    check_file(fmt, path, 2)
    await exporter.export(batch(5))
    check_file(fmt, path, 7)
    await exporter.aclose()
    check_file(fmt, path, 7)


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", sorted(FORMATS))
async def test_every_format_writes_a_valid_file_without_samples(fmt: str, tmp_path: Path) -> None:
    closed_early = tmp_path / f"closed.{fmt}"
    await FORMATS[fmt](closed_early).aclose()
    check_file(fmt, closed_early, 0)

    empty = tmp_path / f"empty.{fmt}"
    exporter = FORMATS[fmt](empty)
    await exporter.export(Batch(empty_profile()))
    check_file(fmt, empty, 0)


@pytest.mark.anyio
async def test_svg_exporter_uses_its_title(tmp_path: Path) -> None:
    path = tmp_path / "out.svg"
    exporter = FlamegraphSvgExporter(path, title="my & title")
    await exporter.export(batch(1))
    assert "my &amp; title" in path.read_text()


@pytest.mark.parametrize("exporter", [*FORMATS.values()])
@pytest.mark.parametrize(("path", "problem"), [
    ("/nonexistent-dir/sub/out.folded", "directory /nonexistent-dir/sub does not exist"),
    ("/etc/hostname/out.folded", "/etc/hostname is not a directory"),
    ("/", "it is a directory"),
])
def test_a_path_that_cannot_be_written_is_refused_when_the_exporter_is_made(
        exporter: Callable[[str], object], path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        exporter(path)
    assert str(info.value) == f"cannot write {path}: {problem}"


def test_a_directory_this_user_cannot_write_to_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):
        pytest.skip("this user may write anywhere (root)")
    with pytest.raises(ConfigError, match=f"directory {locked} is not writable by uid"):
        FoldedFileExporter(locked / "out.folded")


@pytest.mark.anyio
async def test_a_write_the_os_refuses_later_raises_export_error() -> None:
    exporter = FoldedFileExporter("/proc/out.folded")  # a directory the check cannot judge
    with pytest.raises(ExportError) as info:
        await exporter.export(batch(1))
    message = str(info.value)
    assert message.startswith("cannot write /proc/out.folded: ") and "\n" not in message
    assert message != "cannot write /proc/out.folded: "


@pytest.mark.anyio
async def test_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a-directory"
    exporter = PprofFileExporter(target)
    target.mkdir()  # after the exporter was made: its write now fails
    with pytest.raises(ExportError, match="a-directory"):
        await exporter.export(batch(1))
    assert os.listdir(tmp_path) == ["a-directory"]
    assert os.listdir(target) == []


@pytest.mark.parametrize(("name", "fmt"), [
    ("cpu.folded", "folded"), ("cpu.collapsed", "folded"), ("cpu.txt", "folded"),
    ("cpu.pb.gz", "pprof"), ("cpu.pprof", "pprof"), ("cpu.pb", "pprof"),
    ("cpu.speedscope.json", "speedscope"), ("cpu.json", "speedscope"),
    ("dir/CPU.SVG", "svg"), ("cpu.gz", None), ("cpu", None),
    ("cpu.otlp.json", "otlp-json"), ("cpu.otlp.jsonl", "otlp-json"), ("cpu.jsonl", "otlp-json"),
])
def test_format_for_path(name: str, fmt: str | None) -> None:
    assert format_for_path(name) == fmt
    assert format_for_path(Path(name)) == fmt


def test_formats_map_to_file_exporters() -> None:
    expected = {"folded": FoldedFileExporter, "pprof": PprofFileExporter,
                "speedscope": SpeedscopeFileExporter, "svg": FlamegraphSvgExporter,
                "otlp-json": OtlpJsonFileExporter}
    assert dict(FORMATS) == expected


# -- memory ------------------------------------------------------------------


@pytest.mark.anyio
async def test_memory_exporter_keeps_batches_and_their_merge() -> None:
    exporter = MemoryExporter()
    assert isinstance(exporter, Exporter)
    assert exporter.profile is None
    first, second = batch(2), batch(3)
    await exporter.export(first)
    await exporter.export(second)
    assert exporter.batches == [first, second]
    merged = exporter.profile
    assert merged is not None
    assert merged.sample_count == 5
    assert [len(s.timestamps_ns) for s in merged] == [5]
    assert first.profile.sample_count == 2
    assert not exporter.closed
    await exporter.aclose()
    assert exporter.closed


@pytest.mark.anyio
async def test_an_exporter_failure_is_logged_counted_and_raised_at_the_end_on_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    from ebpf_stream._base.stats import Stats
    from ebpf_stream._outputs.fanout import FanOut

    class Refusing:
        async def export(self, batch: Batch) -> None:
            raise RuntimeError("UNAVAILABLE: the collector said\n  try again later")

        async def aclose(self) -> None:
            pass

    stats = Stats()
    memory = MemoryExporter()
    with pytest.raises(ExportError) as info:
        async with FanOut([Refusing(), memory], stats) as fanout:
            await fanout.export(batch(1))
    assert str(info.value) == ("export failed: UNAVAILABLE: the collector said try again "
                               "later")
    assert stats.export_errors == 1 and len(memory.batches) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "exporter Refusing failed: UNAVAILABLE: the collector said try again later"]


def test_exporters_prepare_once_per_run_in_a_worker_thread_before_exporting() -> None:
    """What exporting takes loads as the run starts, not at the first export under load."""
    from ebpf_stream._base.stats import Stats
    from ebpf_stream._outputs.fanout import FanOut

    class Preparing(MemoryExporter):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []
            self.prepared_in: list[int] = []

        def prepare(self) -> None:
            self.calls.append("prepare")
            self.prepared_in.append(threading.get_ident())

        async def export(self, batch: Batch) -> None:
            self.calls.append("export")
            await super().export(batch)

    exporter = Preparing()

    async def run() -> None:
        async with FanOut([exporter], Stats()) as fanout:
            await fanout.export(batch(3))
            await fanout.export(batch(3))

    anyio.run(run)
    anyio.run(run)
    assert exporter.calls == ["prepare", "export", "export"] * 2
    assert threading.get_ident() not in exporter.prepared_in


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_file_exporter_prepares_what_renders_it(fmt: str, tmp_path: Path) -> None:
    exporter = FORMATS[fmt](tmp_path / f"out.{fmt}")
    exporter.prepare()  # type: ignore[attr-defined]
