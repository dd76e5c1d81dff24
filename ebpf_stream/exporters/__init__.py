"""Public exporters: re-exported from the private implementations."""

from .._batch import Batch
from .._exporters.base import Exporter
from .._exporters.files import (
    FlamegraphSvgExporter,
    FoldedFileExporter,
    PprofFileExporter,
    SpeedscopeFileExporter,
)
from .._exporters.memory import MemoryExporter

__all__ = [
    "Batch",
    "Exporter",
    "FlamegraphSvgExporter",
    "FoldedFileExporter",
    "MemoryExporter",
    "PprofFileExporter",
    "SpeedscopeFileExporter",
]
