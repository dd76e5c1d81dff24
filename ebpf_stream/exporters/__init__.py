"""Public exporters: re-exported from the private implementations."""

from typing import TYPE_CHECKING

from .._base.lazy import lazy_exports

if TYPE_CHECKING:
    from .._model.batch import Batch
    from .._outputs.base import ExportContext, Exporter
    from .._outputs.files import (
        FlamegraphSvgExporter,
        FoldedFileExporter,
        PprofFileExporter,
        SpeedscopeFileExporter,
    )
    from .._outputs.memory import MemoryExporter
    from .._outputs.otlp.exporter import OtlpExporter, OtlpGrpcExporter, OtlpHttpExporter
    from .._outputs.otlp.json_file import OtlpJsonFileExporter

# Each exporter's module loads on first use: OtlpGrpcExporter alone pulls in grpc.
__getattr__ = lazy_exports(__name__, {
    ".._model.batch": ("Batch",),
    ".._outputs.base": ("ExportContext", "Exporter"),
    ".._outputs.files": ("FlamegraphSvgExporter", "FoldedFileExporter", "PprofFileExporter",
                           "SpeedscopeFileExporter"),
    ".._outputs.memory": ("MemoryExporter",),
    ".._outputs.otlp.exporter": ("OtlpExporter", "OtlpGrpcExporter", "OtlpHttpExporter"),
    ".._outputs.otlp.json_file": ("OtlpJsonFileExporter",),
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
