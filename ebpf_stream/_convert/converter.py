"""``EventConverter``: the conversion stage from the engine's model to OTLP requests.

The OTLP exporters and the OTLP/JSON file exporter all convert through this
one class, so the network and the file always carry the same data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, ScopeMetrics

from .._base import otlp_settings as settings
from .._base.config import EbpfConfig
from .._base.overhead import Overhead
from .._base.stats import Stats
from .._model.batch import Batch, SlowCall, Stall, TraceRecord
from .._model.events import CpuSample, LoopStall, OomKill, SlowSyscall, TcpConnection, Totals
from .._model.profile import ProcessInfo
from .attributes import ResourceFactory, own_process, scope
from .logs import log_record, logs_request, trace_log_record
from .metrics import (
    SeriesStarts,
    cpu_time_by_process,
    engine_metrics,
    sample_metric,
    totals_metrics,
)
from .profiles import profiles_request


def _event_of(record: TraceRecord) -> SlowSyscall | TcpConnection | OomKill | LoopStall:
    """The kernel's event a record was built from, which names its process."""
    if isinstance(record, SlowCall):
        return record.call
    if isinstance(record, Stall):
        return record.stall
    return record


@dataclasses.dataclass(frozen=True, slots=True)
class BatchRequests:
    """The OTLP requests of one batch; a request with no resources is empty."""

    profiles: ExportProfilesServiceRequest
    metrics: ExportMetricsServiceRequest
    logs: ExportLogsServiceRequest


class EventConverter:
    """Converts events, batches and log records into OTLP requests.

    ``resource_attributes`` default to ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_SERVICE_NAME``; each sampled or traced process adds its own
    ``process.*`` attributes and ``host.name``.  Cumulative engine counters
    start at the converter's creation; traced totals start when their series
    was first seen (``SeriesStarts``), so use one converter per run.  Every
    scope carries ``mode``, how the run profiles (``Profiler.mode``).
    """

    def __init__(self, config: EbpfConfig | None = None,
                 resource_attributes: Mapping[str, str] | None = None, *,
                 mode: str = "bpf") -> None:
        self.period_ns = (config or EbpfConfig()).sample_period_ns
        self._scope = scope(mode)
        self.started_ns = time.time_ns()
        self._resources = ResourceFactory(
            settings.resource_attributes() if resource_attributes is None
            else resource_attributes)
        self._series = SeriesStarts()

    def convert_event_to_metric(self, event: CpuSample) -> Metric:
        """One CPU sample as a ``process.cpu.time`` metric of one sampling period."""
        return sample_metric(event, self.period_ns)

    def convert_batch(self, batch: Batch, stats: Stats | None = None,
                      overhead: Overhead | None = None) -> BatchRequests:
        """The batch's profiles, its metrics (CPU time and traced totals) and
        its logs (traced events), each under the resource of its process;
        plus the engine's counters when ``stats`` (and ``overhead``) are given."""
        profile = batch.profile
        by_process: defaultdict[ProcessInfo, list[Metric]] = defaultdict(list)
        for process, metric in cpu_time_by_process(profile).items():
            by_process[process].append(metric)
        for process, totals in self._totals_by_process(batch).items():
            by_process[process] += totals_metrics(totals, profile.end_ns)
        metrics = ExportMetricsServiceRequest()
        for process, process_metrics in by_process.items():
            metrics.resource_metrics.add(
                resource=self._resources.for_process(process),
                scope_metrics=[ScopeMetrics(scope=self._scope, metrics=process_metrics)])
        if stats is not None:
            own = engine_metrics(stats, overhead or Overhead(0.0, 0), self.started_ns,
                                 time.time_ns())
            metrics.resource_metrics.add(
                resource=self._resources.for_process(own_process()),
                scope_metrics=[ScopeMetrics(scope=self._scope, metrics=own)])
        return BatchRequests(profiles_request(profile, self._resources, self._scope), metrics,
                             self._trace_logs(batch))

    def _totals_by_process(self, batch: Batch) -> dict[ProcessInfo, list[tuple[Totals, int]]]:
        starts = self._series.of(batch.totals, batch.profile.start_ns)
        groups: defaultdict[ProcessInfo, list[tuple[Totals, int]]] = defaultdict(list)
        for totals, start in zip(batch.totals, starts, strict=True):
            groups[batch.profile.process(totals.pid, totals.comm)].append((totals, start))
        return groups

    def _trace_logs(self, batch: Batch) -> ExportLogsServiceRequest:
        groups: defaultdict[ProcessInfo, list[LogRecord]] = defaultdict(list)
        for record in batch.records:
            event = _event_of(record)
            groups[batch.profile.process(event.pid, event.comm)].append(
                trace_log_record(record))
        return logs_request(((self._resources.for_process(p), r) for p, r in groups.items()),
                            self._scope)

    def convert_logs(self, records: Sequence[logging.LogRecord]) -> ExportLogsServiceRequest:
        """The engine's log records, under the resource of the engine's process."""
        return logs_request([(self._resources.for_process(own_process()),
                              [log_record(r) for r in records])], self._scope)
