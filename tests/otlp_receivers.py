"""Real OTLP receivers (gRPC and HTTP/protobuf) on loopback, for end-to-end exporter tests.

Both speak the OpenTelemetry Collector's wire protocol for profiles, metrics and logs, record
every Export call as it arrived, and can be told to fail, throttle, stall or partially reject,
so exporters are tested against real sockets rather than mocks.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import math
import socket
import time
import zlib
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import anyio
import grpc
import h11
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2

__all__ = ["Behaviour", "Call", "Receiver", "closed_port", "grpc_receiver", "http_receiver"]

PROTOBUF = "application/x-protobuf"
REJECTED_MESSAGE = "rejected by test"
_GZIP_MAGIC = b"\x1f\x8b"
# Bits of grpc_compression_algorithm: identity (0) and gzip (2). Deflate is refused by grpc
# itself (UNIMPLEMENTED) instead of reaching the handler as bytes we would not recognise.
_IDENTITY_AND_GZIP = 0b101


@dataclass
class Behaviour:
    """How the receiver answers; mutable, so tests change it while the receiver runs.

    Each call is answered by the behaviour as it stood when the call arrived.
    """

    fail_first: int = 0  # the first N Export calls, all signals counted together, fail
    failure: str = "unavailable"  # or "resource_exhausted", "invalid", "bad_gateway"
    retry_after_s: float | None = None  # gRPC RetryInfo / HTTP Retry-After on failures
    delay_s: float = 0.0  # before answering each call, without holding up other calls
    reject: int = 0  # answer OK with partial_success rejecting this many items


@dataclass
class Call:
    """One Export call as it arrived, successful or not."""

    signal: str  # "profiles", "metrics" or "logs"
    request: Message  # the decoded Export*ServiceRequest
    compression: str  # "gzip" or "identity", as the request body arrived
    headers: dict[str, str]  # gRPC metadata or HTTP headers, lowercase keys
    at: float  # time.monotonic() on arrival, before any delay
    failed: bool


@dataclass(frozen=True)
class _Signal:
    name: str
    service: str
    path: str
    request: type[Message]
    response: type[Message]
    rejected_field: str


def _service(module: object, name: str) -> str:
    return module.DESCRIPTOR.services_by_name[name].full_name  # type: ignore[attr-defined, no-any-return]


_SIGNALS = {
    s.name: s
    for s in (
        _Signal(
            "profiles",
            _service(profiles_service_pb2, "ProfilesService"),
            "/v1development/profiles",
            profiles_service_pb2.ExportProfilesServiceRequest,
            profiles_service_pb2.ExportProfilesServiceResponse,
            "rejected_profiles",
        ),
        _Signal(
            "metrics",
            _service(metrics_service_pb2, "MetricsService"),
            "/v1/metrics",
            metrics_service_pb2.ExportMetricsServiceRequest,
            metrics_service_pb2.ExportMetricsServiceResponse,
            "rejected_data_points",
        ),
        _Signal(
            "logs",
            _service(logs_service_pb2, "LogsService"),
            "/v1/logs",
            logs_service_pb2.ExportLogsServiceRequest,
            logs_service_pb2.ExportLogsServiceResponse,
            "rejected_log_records",
        ),
    )
}
_BY_PATH = {s.path: s for s in _SIGNALS.values()}

_FAILURES: dict[str, tuple[grpc.StatusCode, int]] = {
    "unavailable": (grpc.StatusCode.UNAVAILABLE, 503),
    "resource_exhausted": (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, 400),
    "bad_gateway": (grpc.StatusCode.UNAVAILABLE, 502),
}


class Receiver:
    """What both receivers yield: where to send, how to answer, and what arrived."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.endpoint = ""
        self.behaviour = behaviour
        self.calls: list[Call] = []
        self._arrived = anyio.Event()

    def requests(self, signal: str) -> list[Message]:
        """The requests of the successful calls of one signal, in arrival order."""
        _signal(signal)
        return [c.request for c in self.calls if c.signal == signal and not c.failed]

    async def wait_for(self, signal: str, count: int = 1, timeout: float = 10) -> list[Message]:
        """Wait for COUNT successful calls of SIGNAL: exporters send in the background."""
        with anyio.move_on_after(timeout):
            while len(got := self.requests(signal)) < count:
                await self._arrived.wait()
            return got
        raise TimeoutError(
            f"waited {timeout}s for {count} successful {signal} call(s); arrived: {self._summary()}"
        )

    def _summary(self) -> str:
        parts = []
        for name in _SIGNALS:
            calls = [c for c in self.calls if c.signal == name]
            if calls:
                failed = sum(c.failed for c in calls)
                parts.append(f"{len(calls)} {name}" + (f" ({failed} failed)" if failed else ""))
        return ", ".join(parts) or "nothing"

    def _arrive(
        self, signal: _Signal, request: Message, compression: str, headers: dict[str, str]
    ) -> tuple[Call, Behaviour]:
        """Record a decoded call and decide, now, how it will be answered."""
        behaviour = dataclasses.replace(self.behaviour)
        failed = len(self.calls) < behaviour.fail_first
        if failed and behaviour.failure not in _FAILURES:
            raise ValueError(f"unknown failure {behaviour.failure!r}; one of {list(_FAILURES)}")
        call = Call(signal.name, request, compression, headers, time.monotonic(), failed)
        self.calls.append(call)
        self._arrived.set()
        self._arrived = anyio.Event()
        return call, behaviour


def _signal(name: str) -> _Signal:
    try:
        return _SIGNALS[name]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; one of {list(_SIGNALS)}") from None


def _response(signal: _Signal, reject: int) -> Message:
    response = signal.response()
    if reject:
        partial = response.partial_success  # type: ignore[attr-defined]
        setattr(partial, signal.rejected_field, reject)
        partial.error_message = REJECTED_MESSAGE
    return response


def _status(code: grpc.StatusCode, message: str, retry_after_s: float | None) -> status_pb2.Status:
    """The google.rpc.Status both protocols carry, with RetryInfo when a delay is asked for."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if retry_after_s is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(round(retry_after_s * 1e9))
        status.details.add().Pack(info)
    return status


def _decode(signal: _Signal, body: bytes, gzipped: bool) -> Message | None:
    try:
        return signal.request.FromString(gzip.decompress(body) if gzipped else body)
    except (DecodeError, OSError, EOFError, zlib.error):
        return None


def _header_dict(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in pairs:
        key = key.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def closed_port() -> int:
    """A loopback port with nothing listening, for "receiver down" tests.

    Nothing holds it afterwards, so in principle another process could take it; on a test
    machine that is unlikely enough.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- gRPC ---------------------------------------------------------------------------------------


def _grpc_export(receiver: Receiver, signal: _Signal) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A handler taking raw bytes: the request must reach us still compressed (see below)."""

    async def export(raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        # grpc strips grpc-encoding from invocation_metadata(), so the server runs with
        # per-message decompression off and we gunzip here. gRPC's 5-byte message prefix has
        # already been removed, and a protobuf never starts with 0x1f (wire type 7), so the gzip
        # magic is unambiguous.
        gzipped = raw[:2] == _GZIP_MAGIC
        request = _decode(signal, raw, gzipped)
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable {signal.name}")
        metadata = (
            (key, value if isinstance(value, str) else base64.b64encode(value).decode())
            for key, value in context.invocation_metadata() or ()
        )
        call, behaviour = receiver._arrive(
            signal, request, "gzip" if gzipped else "identity", _header_dict(metadata)
        )
        if behaviour.delay_s:
            await anyio.sleep(behaviour.delay_s)
        if call.failed:
            code = _FAILURES[behaviour.failure][0]
            status = _status(code, f"{behaviour.failure} (test)", behaviour.retry_after_s)
            await context.abort(
                code,
                status.message,
                trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
            )
        return _response(signal, behaviour.reject).SerializeToString()

    return grpc.unary_unary_rpc_method_handler(export)


@asynccontextmanager
async def grpc_receiver(behaviour: Behaviour | None = None) -> AsyncIterator[Receiver]:
    """An OTLP/gRPC receiver on 127.0.0.1 (ephemeral port), serving the three collector services."""
    receiver = Receiver(behaviour or Behaviour())
    server = grpc.aio.server(
        options=[
            ("grpc.per_message_decompression", 0),
            ("grpc.compression_enabled_algorithms_bitset", _IDENTITY_AND_GZIP),
        ]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(s.service, {"Export": _grpc_export(receiver, s)})
            for s in _SIGNALS.values()
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        await server.stop(0)


# -- HTTP ---------------------------------------------------------------------------------------

_Answer = tuple[int, list[tuple[str, str]], bytes]


def _error(status: int, code: grpc.StatusCode, message: str, *headers: tuple[str, str]) -> _Answer:
    """An error answer whose body is a google.rpc.Status, as OTLP/HTTP asks."""
    body = _status(code, message, None).SerializeToString()
    return status, [("content-type", PROTOBUF), *headers], body


class _HttpServer:
    """One h11 connection per asyncio task; tasks are tracked so shutdown can end them."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.tasks: set[asyncio.Task[None]] = set()

    def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Start the connection's task ourselves rather than let start_server do it.

        The task is registered before any await, so shutdown cannot miss it; and Python 3.11's
        start_server logs a cancelled connection task as an error.
        """
        task = asyncio.ensure_future(self._serve(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while (received := await self._receive(conn, reader, writer)) is not None:
                try:
                    status, headers, body = await self._answer(*received)
                except Exception as exc:  # e.g. a bad Behaviour: say so, keep the connection
                    status, headers, body = _error(500, grpc.StatusCode.INTERNAL, repr(exc))
                headers = [*headers, ("content-length", str(len(body)))]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break  # the client asked to close, or spoke HTTP/1.0
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                headers = [("content-length", "0"), ("connection", "close")]
                response = h11.Response(status_code=exc.error_status_hint, headers=headers)
                writer.write(conn.send(response) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
        except ConnectionError:
            pass
        finally:
            writer.close()
            with suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _receive(
        conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request, bytes] | None:
        """The next whole request, or None once the client closed an idle connection."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    continue_ = h11.InformationalResponse(status_code=100, headers=[])
                    writer.write(conn.send(continue_) or b"")
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            else:
                # ConnectionClosed. PAUSED cannot happen: each request is answered before the
                # next cycle starts.
                return None

    async def _answer(self, request: h11.Request, body: bytes) -> _Answer:
        headers = _header_dict(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers
        )
        signal = _BY_PATH.get(request.target.decode("latin-1").partition("?")[0])
        if signal is None:
            return _error(404, grpc.StatusCode.NOT_FOUND, "unknown path")
        if request.method != b"POST":
            return _error(405, grpc.StatusCode.UNIMPLEMENTED, "only POST", ("allow", "POST"))
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != PROTOBUF:
            return _error(415, grpc.StatusCode.INVALID_ARGUMENT, f"content type must be {PROTOBUF}")
        encoding = headers.get("content-encoding", "identity").strip().lower() or "identity"
        if encoding not in ("gzip", "identity"):
            return _error(415, grpc.StatusCode.INVALID_ARGUMENT, f"unsupported encoding {encoding}")
        message = _decode(signal, body, encoding == "gzip")
        if message is None:
            return _error(400, grpc.StatusCode.INVALID_ARGUMENT, f"undecodable {signal.name}")

        call, behaviour = self.receiver._arrive(signal, message, encoding, headers)
        if behaviour.delay_s:
            await anyio.sleep(behaviour.delay_s)
        if call.failed:
            code, http_status = _FAILURES[behaviour.failure]
            status_message = _status(code, f"{behaviour.failure} (test)", behaviour.retry_after_s)
            response_headers = [("content-type", PROTOBUF)]
            if behaviour.retry_after_s is not None:
                retry_after = str(math.ceil(behaviour.retry_after_s))
                response_headers.append(("retry-after", retry_after))
            return http_status, response_headers, status_message.SerializeToString()
        response = _response(signal, behaviour.reject)
        return 200, [("content-type", PROTOBUF)], response.SerializeToString()


@asynccontextmanager
async def http_receiver(behaviour: Behaviour | None = None,
                        port: int = 0) -> AsyncIterator[Receiver]:
    """An OTLP/HTTP (protobuf) receiver on 127.0.0.1, with keep-alive.

    ``port`` 0 takes an ephemeral one; a fixed one lets a receiver come back
    where an earlier one stood, as a restarted collector does.
    """
    receiver = Receiver(behaviour or Behaviour())
    http = _HttpServer(receiver)
    server = await asyncio.start_server(http.accept, "127.0.0.1", port)
    receiver.endpoint = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield receiver
    finally:
        server.close()
        tasks = list(http.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
