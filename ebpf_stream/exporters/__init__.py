"""Public exporters: re-exported from the private implementations."""

from .._batch import Batch
from .._exporters.base import ExportContext, Exporter
from .._exporters.files import (
    FlamegraphSvgExporter,
    FoldedFileExporter,
    PprofFileExporter,
    SpeedscopeFileExporter,
)
from .._exporters.memory import MemoryExporter
from .._exporters.otlp.exporter import OtlpExporter, OtlpGrpcExporter, OtlpHttpExporter
from .._exporters.otlp.json_file import OtlpJsonFileExporter

__all__ = [
    "Batch",
    "ExportContext",
    "Exporter",
    "FlamegraphSvgExporter",
    "FoldedFileExporter",
    "MemoryExporter",
    "OtlpExporter",
    "OtlpGrpcExporter",
    "OtlpHttpExporter",
    "OtlpJsonFileExporter",
    "PprofFileExporter",
    "SpeedscopeFileExporter",
]
