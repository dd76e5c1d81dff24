"""The file formats ``record -o`` can write, and telling them from a file name."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

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


class _FlameGraphFormat(Protocol):
    def __call__(self, path: Path, *, by_route: bool = False,
                 kind: str = "on-cpu") -> Exporter: ...


_FLAME_GRAPHS: Mapping[str, _FlameGraphFormat] = {
    "folded": FoldedFileExporter,
    "speedscope": SpeedscopeFileExporter,
    "svg": FlamegraphSvgExporter,
}
ROUTE_FORMATS = frozenset(_FLAME_GRAPHS)
"""The flame-graph formats, which hold one kind of time and can root each stack at
its request's endpoint."""


def exporter_for(fmt: str, path: Path, *, by_route: bool = False,
                 kind: str = "on-cpu") -> Exporter:
    """The exporter that writes ``path`` in ``fmt`` (a key of FORMATS).

    The formats in ROUTE_FORMATS hold the ``kind`` of time (a ``ProfileKind``
    value) and with ``by_route`` root their stacks at their endpoints; the
    others hold every kind, as they are."""
    flame_graph = _FLAME_GRAPHS.get(fmt)
    if flame_graph is None:
        return FORMATS[fmt](path)
    return flame_graph(path, by_route=by_route, kind=kind)

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
