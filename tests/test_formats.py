"""Choosing a file format by name or by the path's extension."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebpf_stream._outputs.formats import FORMATS, ROUTE_FORMATS, exporter_for, format_for_path
from ebpf_stream._outputs.otlp.json_file import OtlpJsonFileExporter
from ebpf_stream.exporters import (
    FlamegraphSvgExporter,
    FoldedFileExporter,
    PprofFileExporter,
    SpeedscopeFileExporter,
)


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


def test_by_route_reaches_the_flame_graph_formats_alone(tmp_path: Path) -> None:
    assert sorted(ROUTE_FORMATS) == ["folded", "speedscope", "svg"]
    for fmt in FORMATS:
        exporter = exporter_for(fmt, tmp_path / "out", by_route=True)
        assert type(exporter) is FORMATS[fmt]
        assert getattr(exporter, "by_route", False) is (fmt in ROUTE_FORMATS)
