"""The engine's own log records as OTLP logs.

Warnings and errors of the engine (lost samples, a failing exporter, a slow
shutdown) reach the same pipeline as its data, so operators see them where
they look at the profiles.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.logs.v1 import logs_pb2 as pb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from .attributes import AttributeValue, any_value, key_values, scope

_SEVERITIES = (  # (lowest logging level, OTLP severity number): the data model's mapping
    (logging.CRITICAL, pb.SeverityNumber.SEVERITY_NUMBER_FATAL),
    (logging.ERROR, pb.SeverityNumber.SEVERITY_NUMBER_ERROR),
    (logging.WARNING, pb.SeverityNumber.SEVERITY_NUMBER_WARN),
    (logging.INFO, pb.SeverityNumber.SEVERITY_NUMBER_INFO),
    (logging.DEBUG, pb.SeverityNumber.SEVERITY_NUMBER_DEBUG),
)


def severity(level: int) -> pb.SeverityNumber.ValueType:
    return next((number for lowest, number in _SEVERITIES if level >= lowest),
                pb.SeverityNumber.SEVERITY_NUMBER_TRACE)


def log_record(record: logging.LogRecord) -> pb.LogRecord:
    attributes: dict[str, AttributeValue] = {
        "code.file.path": record.pathname,
        "code.line.number": record.lineno,
        "code.function.name": record.funcName,
        "logger.name": record.name,
    }
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        kind = type(exc)
        attributes["exception.type"] = (kind.__qualname__ if kind.__module__ == "builtins"
                                        else f"{kind.__module__}.{kind.__qualname__}")
        attributes["exception.message"] = str(exc)
        attributes["exception.stacktrace"] = "".join(traceback.format_exception(exc))
    time_ns = int(record.created * 1e9)
    return pb.LogRecord(
        time_unix_nano=time_ns, observed_time_unix_nano=time_ns,
        severity_number=severity(record.levelno), severity_text=record.levelname,
        body=any_value(record.getMessage()), attributes=key_values(attributes),
    )


def logs_request(records: Sequence[logging.LogRecord], resource: Resource,
                 ) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    if records:
        request.resource_logs.add(resource=resource, scope_logs=[pb.ScopeLogs(
            scope=scope(), log_records=[log_record(r) for r in records])])
    return request
