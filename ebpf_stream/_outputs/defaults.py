"""The outputs a run gets when its code names none."""

from __future__ import annotations

from .._base.otlp_settings import endpoint_in_environment
from .base import Exporter


def exporters_from_environment() -> list[Exporter]:
    """OTLP, when an ``OTEL_EXPORTER_OTLP_*`` endpoint is set; otherwise none.

    Made for each run, since a run closes its exporters when it ends.  The
    exporter reads and checks its settings here, so a malformed endpoint is
    refused before any probe loads.
    """
    if not endpoint_in_environment():
        return []
    from .otlp.exporter import OtlpExporter  # with its protobuf, only when asked for

    return [OtlpExporter()]
