"""OTLP over gRPC, with ``grpc.aio`` and the collector services' generated stubs.

``grpc.aio`` runs on the caller's asyncio loop (uvloop included), so sending
never blocks it.  Status codes map onto retries as the OTLP specification
says; RESOURCE_EXHAUSTED is retried only when the receiver sent a
``RetryInfo``, since otherwise the request itself may be what is too large.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc

from ..._base.otlp_settings import Compression, Endpoint, Signal
from .transport import DeliveryError

_STUBS: dict[Signal, Callable[[grpc.aio.Channel], Any]] = {
    Signal.PROFILES: profiles_service_pb2_grpc.ProfilesServiceStub,
    Signal.METRICS: metrics_service_pb2_grpc.MetricsServiceStub,
    Signal.LOGS: logs_service_pb2_grpc.LogsServiceStub,
}

_RETRYABLE = {
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
}
_STATUS_DETAILS = "grpc-status-details-bin"


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _channel(endpoint: Endpoint) -> grpc.aio.Channel:
    compression = (grpc.Compression.Gzip if endpoint.compression is Compression.GZIP
                   else grpc.Compression.NoCompression)
    if endpoint.insecure:
        return grpc.aio.insecure_channel(endpoint.grpc_target, compression=compression)
    credentials = grpc.ssl_channel_credentials(
        _read(endpoint.certificate), _read(endpoint.client_key),
        _read(endpoint.client_certificate))
    return grpc.aio.secure_channel(endpoint.grpc_target, credentials, compression=compression)


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The delay a ``google.rpc.RetryInfo`` in the error's status details asks for."""
    for key, value in error.trailing_metadata() or ():
        if key != _STATUS_DETAILS or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


def delivery_error(error: grpc.aio.AioRpcError) -> DeliveryError:
    code = error.code()
    delay = retry_delay(error)
    retryable = code in _RETRYABLE or (
        code is grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None)
    return DeliveryError(f"{code.name}: {error.details()}", retryable=retryable,
                         retry_after=delay)


class GrpcTransport:
    """Sends one signal's requests to a gRPC receiver.

    The channel is created on first use, inside the running loop, as
    ``grpc.aio`` requires.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._metadata = tuple(endpoint.headers)

    async def send(self, request: Message) -> Message:
        if self._channel is None:
            self._channel = _channel(self.endpoint)
            self._stub = _STUBS[self.endpoint.signal](self._channel)
        try:
            response: Message = await self._stub.Export(
                request, timeout=self.endpoint.timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise delivery_error(exc) from None
        return response

    async def aclose(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None  # a later send opens a new one
            await channel.close()
