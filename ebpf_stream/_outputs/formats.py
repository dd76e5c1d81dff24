"""The file formats ``record -o`` can write, and telling them from a file name."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from .base import Exporter
from .files import (
    FlamegraphSvgExporter,
    FoldedFileExporter,
    PprofFileExporter,
    SpeedscopeFileExporter,
)
from .otlp.json_file import OtlpJsonFileExporter

FORMATS: Mapping[str, Callable[[Path], Exporter]] = {
    "folded": FoldedFileExporter,
    "pprof": PprofFileExporter,
    "speedscope": SpeedscopeFileExporter,
    "svg": FlamegraphSvgExporter,
    "otlp-json": OtlpJsonFileExporter,
}

# Longest suffix first, so ".speedscope.json" wins over ".json".
_SUFFIXES = (
    (".speedscope.json", "speedscope"),
    (".otlp.jsonl", "otlp-json"),
    (".otlp.json", "otlp-json"),
    (".collapsed", "folded"),
    (".folded", "folded"),
    (".jsonl", "otlp-json"),
    (".pprof", "pprof"),
    (".pb.gz", "pprof"),
    (".json", "speedscope"),
    (".txt", "folded"),
    (".svg", "svg"),
    (".pb", "pprof"),
)


def format_for_path(path: str | os.PathLike[str]) -> str | None:
    """The format a file name implies (a key of FORMATS), or None if it implies none."""
    name = os.fspath(path).lower()
    return next((fmt for suffix, fmt in _SUFFIXES if name.endswith(suffix)), None)


def format_suffix(path: str | os.PathLike[str]) -> str:
    """The suffix that names ``path``'s format (``.pb.gz``), else its last suffix."""
    name = os.fspath(path).lower()
    return next((suffix for suffix, _ in _SUFFIXES if name.endswith(suffix)),
                Path(name).suffix)
