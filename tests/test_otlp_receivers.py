"""The OTLP test receivers themselves, checked with plain clients (grpc.aio stubs, httpx).

The exporter tests trust what these receivers record and answer, so that is checked here first.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any

import anyio
import grpc
import httpx
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2,
    profiles_service_pb2_grpc,
)
from otlp_receivers import (
    Behaviour,
    Receiver,
    closed_port,
    grpc_receiver,
    http_receiver,
)

pytestmark = pytest.mark.anyio

SIGNALS = ("profiles", "metrics", "logs")
PATHS = {"profiles": "/v1development/profiles", "metrics": "/v1/metrics", "logs": "/v1/logs"}
REQUESTS: dict[str, type[Message]] = {
    "profiles": profiles_service_pb2.ExportProfilesServiceRequest,
    "metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "logs": logs_service_pb2.ExportLogsServiceRequest,
}
RESPONSES: dict[str, type[Message]] = {
    "profiles": profiles_service_pb2.ExportProfilesServiceResponse,
    "metrics": metrics_service_pb2.ExportMetricsServiceResponse,
    "logs": logs_service_pb2.ExportLogsServiceResponse,
}
STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "profiles": profiles_service_pb2_grpc.ProfilesServiceStub,
    "metrics": metrics_service_pb2_grpc.MetricsServiceStub,
    "logs": logs_service_pb2_grpc.LogsServiceStub,
}
REJECTED = {
    "profiles": "rejected_profiles",
    "metrics": "rejected_data_points",
    "logs": "rejected_log_records",
}
RECEIVERS: dict[str, Callable[..., AbstractAsyncContextManager[Receiver]]] = {
    "grpc": grpc_receiver,
    "http": http_receiver,
}


def sample(signal: str, tag: str = "a") -> Message:
    """A request big and repetitive enough that gzip shrinks it.

    grpc sends a message uncompressed, whatever the channel says, when gzip would not make it
    smaller, and the gRPC receiver records what was on the wire.
    """
    request = REQUESTS[signal]()
    resource = getattr(request, f"resource_{signal}").add().resource
    resource.attributes.add(key="service.name").value.string_value = f"svc-{tag}"
    resource.attributes.add(key="padding").value.string_value = "x" * 500
    return request


def target(receiver: Receiver) -> str:
    return receiver.endpoint.removeprefix("http://")


async def grpc_export(
    receiver: Receiver, signal: str, request: Message, *, compress: bool = False
) -> Message:
    compression = grpc.Compression.Gzip if compress else None
    async with grpc.aio.insecure_channel(target(receiver), compression=compression) as channel:
        response: Message = await STUBS[signal](channel).Export(
            request, metadata=(("x-test", "yes"),), timeout=5
        )
    return response


async def http_post(
    receiver: Receiver,
    signal: str,
    request: Message,
    *,
    compress: bool = False,
    client: httpx.AsyncClient | None = None,
) -> httpx.Response:
    body = request.SerializeToString()
    headers = {"content-type": "application/x-protobuf", "x-test": "yes"}
    if compress:
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    url = receiver.endpoint + PATHS[signal]
    if client is not None:
        return await client.post(url, content=body, headers=headers)
    async with httpx.AsyncClient() as fresh:
        return await fresh.post(url, content=body, headers=headers)


async def export(protocol: str, receiver: Receiver, signal: str, request: Message) -> Message:
    """One successful export over either protocol, returning the decoded response."""
    if protocol == "grpc":
        return await grpc_export(receiver, signal, request)
    response = await http_post(receiver, signal, request)
    assert response.status_code == 200, response.content
    return RESPONSES[signal].FromString(response.content)


def retry_info(status: status_pb2.Status) -> error_details_pb2.RetryInfo | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info
    return None


# -- gRPC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["identity", "gzip"])
@pytest.mark.parametrize("signal", SIGNALS)
async def test_grpc_records_and_answers(signal: str, compress: bool) -> None:
    async with grpc_receiver() as receiver:
        response = await grpc_export(receiver, signal, sample(signal), compress=compress)
    assert response == RESPONSES[signal]()
    assert receiver.requests(signal) == [sample(signal)]
    [call] = receiver.calls
    assert (call.signal, call.failed) == (signal, False)
    assert call.compression == ("gzip" if compress else "identity")
    assert call.headers["x-test"] == "yes"
    assert call.headers["user-agent"].startswith("grpc-python")


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        ("unavailable", grpc.StatusCode.UNAVAILABLE),
        ("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT),
        ("bad_gateway", grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_grpc_failures_carry_status_and_retry_info(
    failure: str, code: grpc.StatusCode
) -> None:
    behaviour = Behaviour(fail_first=2, failure=failure, retry_after_s=1.5)
    async with grpc_receiver(behaviour) as receiver:
        for signal in ("metrics", "logs"):  # counted together across signals
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await grpc_export(receiver, signal, sample(signal))
            assert caught.value.code() == code
            trailing = caught.value.trailing_metadata()
            assert trailing is not None
            status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
            assert status.code == code.value[0]
            info = retry_info(status)
            assert info is not None
            assert info.retry_delay.ToNanoseconds() == 1_500_000_000
        await grpc_export(receiver, "logs", sample("logs", "third"))
    assert [c.failed for c in receiver.calls] == [True, True, False]
    assert receiver.requests("logs") == [sample("logs", "third")]
    assert receiver.requests("metrics") == []


async def test_grpc_failure_without_retry_after_has_no_retry_info() -> None:
    async with grpc_receiver(Behaviour(fail_first=1)) as receiver:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await grpc_export(receiver, "profiles", sample("profiles"))
    trailing = caught.value.trailing_metadata()
    assert trailing is not None
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    assert retry_info(status) is None


async def test_grpc_undecodable_request_is_invalid_and_not_recorded() -> None:
    async with grpc_receiver() as receiver, grpc.aio.insecure_channel(target(receiver)) as channel:
        export_logs: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await export_logs(b"\x0a\x05ab", timeout=5)  # a field claiming 5 bytes, with 2
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert receiver.calls == []


# -- HTTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["identity", "gzip"])
@pytest.mark.parametrize("signal", SIGNALS)
async def test_http_records_and_answers(signal: str, compress: bool) -> None:
    async with http_receiver() as receiver:
        response = await http_post(receiver, signal, sample(signal), compress=compress)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-protobuf"
    assert RESPONSES[signal].FromString(response.content) == RESPONSES[signal]()
    assert receiver.requests(signal) == [sample(signal)]
    [call] = receiver.calls
    assert (call.signal, call.failed) == (signal, False)
    assert call.compression == ("gzip" if compress else "identity")
    assert call.headers["x-test"] == "yes"
    assert call.headers["content-type"] == "application/x-protobuf"


async def test_http_keeps_the_connection_alive() -> None:
    async with http_receiver() as receiver, httpx.AsyncClient() as client:
        ports = set()
        for signal in SIGNALS:
            response = await http_post(receiver, signal, sample(signal), client=client)
            assert response.status_code == 200
            ports.add(response.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(ports) == 1
    assert [c.signal for c in receiver.calls] == list(SIGNALS)


@pytest.mark.parametrize(
    ("failure", "status"),
    [("unavailable", 503), ("resource_exhausted", 429), ("invalid", 400), ("bad_gateway", 502)],
)
async def test_http_failures_carry_status_and_retry_after(failure: str, status: int) -> None:
    behaviour = Behaviour(fail_first=2, failure=failure, retry_after_s=1.2)
    async with http_receiver(behaviour) as receiver, httpx.AsyncClient() as client:
        for signal in ("profiles", "metrics"):
            response = await http_post(receiver, signal, sample(signal), client=client)
            assert response.status_code == status
            assert response.headers["retry-after"] == "2"  # whole seconds, rounded up
            assert response.headers["content-type"] == "application/x-protobuf"
            assert retry_info(status_pb2.Status.FromString(response.content)) is not None
        behaviour.retry_after_s = None
        response = await http_post(receiver, "metrics", sample("metrics"), client=client)
        assert response.status_code == 200
    assert [c.failed for c in receiver.calls] == [True, True, False]
    assert receiver.requests("metrics") == [sample("metrics")]


async def test_http_failure_without_retry_after_has_no_header() -> None:
    async with http_receiver(Behaviour(fail_first=1)) as receiver:
        response = await http_post(receiver, "logs", sample("logs"))
    assert response.status_code == 503
    assert "retry-after" not in response.headers


async def test_http_protocol_errors() -> None:
    body = sample("logs").SerializeToString()
    async with http_receiver() as receiver, httpx.AsyncClient(base_url=receiver.endpoint) as client:
        protobuf = {"content-type": "application/x-protobuf"}
        assert (await client.post("/v1/traces", content=body, headers=protobuf)).status_code == 404
        wrong_method = await client.get("/v1/logs")
        assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")
        json = {"content-type": "application/json"}
        assert (await client.post("/v1/logs", content=b"{}", headers=json)).status_code == 415
        brotli = {**protobuf, "content-encoding": "br"}
        assert (await client.post("/v1/logs", content=body, headers=brotli)).status_code == 415
        truncated = await client.post("/v1/logs", content=b"\x0a\x05ab", headers=protobuf)
        assert truncated.status_code == 400
        bad_gzip = {**protobuf, "content-encoding": "gzip"}
        assert (await client.post("/v1/logs", content=body, headers=bad_gzip)).status_code == 400
        # The connection survives all of that.
        assert (await client.post("/v1/logs", content=body, headers=protobuf)).status_code == 200
    assert [c.failed for c in receiver.calls] == [False]


async def test_http_shutdown_closes_connections_and_tasks() -> None:
    before = asyncio.all_tasks()
    async with httpx.AsyncClient() as client:
        async with http_receiver() as receiver:
            await http_post(receiver, "logs", sample("logs"), client=client)  # stays open
            assert len(asyncio.all_tasks() - before) == 1  # the connection's task
            port = int(receiver.endpoint.rsplit(":", 1)[1])
        assert asyncio.all_tasks() == before
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)


# -- both ---------------------------------------------------------------------------------------

both = pytest.mark.parametrize("protocol", list(RECEIVERS))


@both
async def test_reject_answers_partial_success(protocol: str) -> None:
    async with RECEIVERS[protocol](Behaviour(reject=3)) as receiver:
        for signal in SIGNALS:
            response: Any = await export(protocol, receiver, signal, sample(signal))
            assert getattr(response.partial_success, REJECTED[signal]) == 3
            assert response.partial_success.error_message == "rejected by test"
    assert [c.failed for c in receiver.calls] == [False] * 3


@both
async def test_delay_is_per_call_and_does_not_block_others(protocol: str) -> None:
    async with RECEIVERS[protocol](Behaviour(delay_s=0.3)) as receiver:
        start = time.monotonic()
        async with anyio.create_task_group() as tg:
            for signal in ("metrics", "logs"):
                tg.start_soon(export, protocol, receiver, signal, sample(signal))
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 0.55
    # Recorded on arrival, before the delay.
    assert all(call.at - start < 0.2 for call in receiver.calls)


@both
async def test_wait_for_waits_and_times_out_naming_what_arrived(protocol: str) -> None:
    async def send_two() -> None:
        for tag in ("failed", "ok"):
            with suppress(grpc.aio.AioRpcError, AssertionError):  # the first one is meant to fail
                await export(protocol, receiver, "logs", sample("logs", tag))

    async with RECEIVERS[protocol](Behaviour(fail_first=1)) as receiver:
        async with anyio.create_task_group() as tg:
            tg.start_soon(send_two)
            assert await receiver.wait_for("logs", timeout=5) == [sample("logs", "ok")]
        with pytest.raises(TimeoutError, match=r"2 successful profiles.*2 logs \(1 failed\)"):
            await receiver.wait_for("profiles", count=2, timeout=0.05)


async def test_closed_port_refuses_connections() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{closed_port()}/v1/logs", content=b"")
