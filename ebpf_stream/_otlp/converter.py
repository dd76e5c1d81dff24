"""``EventConverter``: the conversion stage from the engine's model to OTLP requests.

The OTLP exporters and the OTLP/JSON file exporter all convert through this
one class, so the network and the file always carry the same data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, ScopeMetrics

from .._batch import Batch
from .._config import EbpfConfig
from .._events import CpuSample
from .._overhead import Overhead
from .._stats import Stats
from . import settings
from .attributes import ResourceFactory, own_process, scope
from .logs import logs_request
from .metrics import cpu_time_by_process, engine_metrics, sample_metric
from .profiles import profiles_request


@dataclasses.dataclass(frozen=True, slots=True)
class BatchRequests:
    """The OTLP requests of one batch; a request with no resources is empty."""

    profiles: ExportProfilesServiceRequest
    metrics: ExportMetricsServiceRequest


class EventConverter:
    """Converts events, batches and log records into OTLP requests.

    ``resource_attributes`` default to ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_SERVICE_NAME``; each sampled process adds its own ``process.*``
    attributes and ``host.name``.  Cumulative engine counters start at the
    converter's creation.
    """

    def __init__(self, config: EbpfConfig | None = None,
                 resource_attributes: Mapping[str, str] | None = None) -> None:
        self.period_ns = (config or EbpfConfig()).sample_period_ns
        self.started_ns = time.time_ns()
        self._resources = ResourceFactory(
            settings.resource_attributes() if resource_attributes is None
            else resource_attributes)

    def convert_event_to_metric(self, event: CpuSample) -> Metric:
        """One CPU sample as a ``process.cpu.time`` metric of one sampling period."""
        return sample_metric(event, self.period_ns)

    def convert_batch(self, batch: Batch, stats: Stats | None = None,
                      overhead: Overhead | None = None) -> BatchRequests:
        """The batch's profiles and per-process CPU time, plus the engine's
        counters when ``stats`` (and ``overhead``) are given."""
        profile = batch.profile
        metrics = ExportMetricsServiceRequest()
        for process, metric in cpu_time_by_process(profile).items():
            metrics.resource_metrics.add(
                resource=self._resources.for_process(process),
                scope_metrics=[ScopeMetrics(scope=scope(), metrics=[metric])])
        if stats is not None:
            own = engine_metrics(stats, overhead or Overhead(0.0, 0), self.started_ns,
                                 time.time_ns())
            metrics.resource_metrics.add(
                resource=self._resources.for_process(own_process()),
                scope_metrics=[ScopeMetrics(scope=scope(), metrics=own)])
        return BatchRequests(profiles_request(profile, self._resources), metrics)

    def convert_logs(self, records: Sequence[logging.LogRecord]) -> ExportLogsServiceRequest:
        """The engine's log records, under the resource of the engine's process."""
        return logs_request(records, self._resources.for_process(own_process()))
