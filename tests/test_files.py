"""The file exporters: rewriting whole files atomically, and refusing what cannot be written."""

from __future__ import annotations

import json
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import anyio
import otlp_stacks
import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from otlp_json_decode import decode_otlp_json
from sample_frames import PERIOD
from sample_profiles import SVG, batch, decode_pprof, empty_profile, frames_of, request_profile

from ebpf_stream._base.errors import ConfigError, ExportError
from ebpf_stream._model.profile import Profile
from ebpf_stream._outputs.formats import FORMATS, ROUTE_FORMATS, exporter_for
from ebpf_stream.exporters import (
    Batch,
    Exporter,
    FlamegraphSvgExporter,
    FoldedFileExporter,
    PprofFileExporter,
)


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


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_file_exporter_prepares_what_renders_it(fmt: str, tmp_path: Path) -> None:
    exporter = FORMATS[fmt](tmp_path / f"out.{fmt}")
    exporter.prepare()  # type: ignore[attr-defined]


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", sorted(FORMATS))
async def test_by_route_roots_the_flame_graph_formats_at_endpoints(fmt: str,
                                                                  tmp_path: Path) -> None:
    path = tmp_path / f"out.{fmt}"
    exporter = exporter_for(fmt, path, by_route=True)
    await exporter.export(Batch(request_profile()))
    await exporter.aclose()
    shows_endpoints = b"GET /items/{id}" in path.read_bytes()
    # The other formats carry the request as they always do, not as a frame.
    assert shows_endpoints == (fmt in ROUTE_FORMATS), fmt
