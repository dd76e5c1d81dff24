"""The transport boundary: sending one OTLP request of one signal.

Queueing, retries and accounting belong to ``delivery`` above; a transport only
sends a request within its endpoint's timeout and says how it went: the
receiver's response, or a ``DeliveryError`` that says whether trying again
can help and when.  gRPC, HTTP and the mock used in unit tests are the
implementations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceResponse,
)

from ..._base.otlp_settings import Endpoint, Signal

RESPONSES: Mapping[Signal, type[Message]] = {
    Signal.PROFILES: ExportProfilesServiceResponse,
    Signal.METRICS: ExportMetricsServiceResponse,
    Signal.LOGS: ExportLogsServiceResponse,
}


class DeliveryError(Exception):
    """A request was not delivered.

    ``retryable`` says whether the same request may succeed later (the
    receiver is down or overloaded); ``retry_after`` is the delay the
    receiver asked for, if it did.
    """

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class Transport(Protocol):
    endpoint: Endpoint

    async def send(self, request: Message) -> Message:
        """Deliver ``request`` within ``endpoint.timeout_s``; return the response.

        Raises ``DeliveryError`` for any failure, never another exception.
        """

    async def aclose(self) -> None:
        """Release connections.  Called after a run's last send; a later send reconnects."""
