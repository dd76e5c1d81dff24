"""Public exporters: re-exported from the private implementations."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
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

# Each exporter's module loads on first use: OtlpGrpcExporter alone pulls in grpc.
__getattr__ = lazy_exports(__name__, {
    ".._batch": ("Batch",),
    ".._exporters.base": ("ExportContext", "Exporter"),
    ".._exporters.files": ("FlamegraphSvgExporter", "FoldedFileExporter", "PprofFileExporter",
                           "SpeedscopeFileExporter"),
    ".._exporters.memory": ("MemoryExporter",),
    ".._exporters.otlp.exporter": ("OtlpExporter", "OtlpGrpcExporter", "OtlpHttpExporter"),
    ".._exporters.otlp.json_file": ("OtlpJsonFileExporter",),
})

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
