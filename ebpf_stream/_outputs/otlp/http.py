"""OTLP over HTTP: protobuf bodies POSTed with ``httpx``'s async client.

Serializing and compressing a large request takes milliseconds, so it runs
in a worker thread and the host's event loop keeps its latency.  Responses
429, 502, 503 and 504 (and network failures) are retryable, honouring
``Retry-After``; any other error status is final, as the OTLP
specification says.
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import ssl
import time

import httpx
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from ..._base.otlp_settings import Compression, Endpoint
from ..._base.overhead import run_sync
from .transport import RESPONSES, DeliveryError

_RETRYABLE_STATUS = {429, 502, 503, 504}
_PROTOBUF = "application/x-protobuf"


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(response: httpx.Response) -> str:
    """The receiver's reason: a ``google.rpc.Status`` body, or the start of the text."""
    detail = ""
    if response.headers.get("content-type", "").startswith(_PROTOBUF):
        with contextlib.suppress(DecodeError):
            detail = status_pb2.Status.FromString(response.content).message
    if not detail:
        detail = response.text[:200].strip()
    return f"HTTP {response.status_code}" + (f": {detail}" if detail else "")


def _ssl_context(endpoint: Endpoint) -> ssl.SSLContext | bool:
    if endpoint.url.startswith("http://"):
        return False  # plaintext: skip loading the CA bundle, ~20 ms per client
    if not (endpoint.certificate or endpoint.client_certificate):
        return True
    context = ssl.create_default_context(cafile=endpoint.certificate)
    if endpoint.client_certificate:
        context.load_cert_chain(endpoint.client_certificate, endpoint.client_key)
    return context


def _encode(request: Message, compress: bool) -> bytes:
    body = request.SerializeToString()
    return gzip.compress(body, compresslevel=6, mtime=0) if compress else body


class HttpTransport:
    """Sends one signal's requests to ``endpoint.url``.

    The client is created on first use, so that each run (each event loop,
    under ``EbpfCpuProfiler``) has its own connections.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._gzip = endpoint.compression is Compression.GZIP
        headers = {**dict(endpoint.headers), "content-type": _PROTOBUF}
        if self._gzip:
            headers["content-encoding"] = "gzip"
        self._headers = headers
        self._verify = _ssl_context(endpoint)  # here: a bad certificate fails at once
        self._client: httpx.AsyncClient | None = None
        self._response_type = RESPONSES[endpoint.signal]

    async def send(self, request: Message) -> Message:
        body = await run_sync(_encode, request, self._gzip)
        if self._client is None:
            self._client = httpx.AsyncClient(headers=self._headers,
                                             timeout=self.endpoint.timeout_s,
                                             verify=self._verify)
        try:
            response = await self._client.post(self.endpoint.url, content=body)
        except httpx.TimeoutException:
            raise DeliveryError(f"no response within {self.endpoint.timeout_s:g}s",
                                retryable=True) from None
        except httpx.TransportError as exc:
            raise DeliveryError(f"cannot connect: {exc or type(exc).__name__}",
                                retryable=True) from None
        if response.is_success:
            try:
                return self._response_type.FromString(response.content)
            except DecodeError:
                return self._response_type()  # a success with an odd body is still a success
        status = response.status_code
        raise DeliveryError(
            _error_message(response), retryable=status in _RETRYABLE_STATUS,
            retry_after=retry_after(response.headers.get("retry-after")))

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None  # a later send opens a new one
            await client.aclose()
