"""``ebpf-stream record`` exporting OTLP to real receivers, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import anyio
import otlp_stacks
import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from otlp_json_decode import decode_otlp_json
from otlp_receivers import Behaviour, Receiver, closed_port, grpc_receiver, http_receiver
from test_cli import CLI, folded, run_cli

RECEIVERS = {"grpc": grpc_receiver, "http/protobuf": http_receiver}

bpf = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment"), pytest.mark.anyio]


def real_bpf(test):  # type: ignore[no-untyped-def]
    for mark in bpf:
        test = mark(test)
    return test


def otel_env(endpoint: str, protocol: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, **extra}


async def record(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process([*CLI, "record", *args], env=env, check=False)


def folded_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """Folded lines without the process name: what OTLP carries as the stack."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line, count in folded(path).items():
        stacks[tuple(line.split(";")[1:])] += count
    return stacks


def otlp_stacks_of(requests: list[ExportProfilesServiceRequest]) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for (_, frames), count in otlp_stacks.stacks(requests).items():
        stacks[frames] += count
    return stacks


def check_matches_folded(receiver: Receiver, out: Path, service: str) -> None:
    requests = receiver.requests("profiles")
    assert requests, "no profile arrived"
    got = otlp_stacks_of(requests)
    assert got == folded_stacks(out)
    assert max(got, key=got.__getitem__)[-3:] == ("outer", "middle", "hot_leaf")
    for request in requests:
        for rp in request.resource_profiles:
            assert otlp_stacks.resource_attributes(rp.resource)["service.name"] == service
    names = {m.name for r in receiver.requests("metrics") for rm in r.resource_metrics
             for sm in rm.scope_metrics for m in sm.metrics}
    assert {"process.cpu.time", "ebpf_stream.samples.received"} <= names


@real_bpf
@pytest.mark.parametrize("protocol", sorted(RECEIVERS))
async def test_only_otel_variables_deliver_the_profile_of_the_folded_output(
        protocol: str, running: subprocess.Popen[str], tmp_path: Path) -> None:
    out = tmp_path / "out.folded"
    async with RECEIVERS[protocol]() as receiver:
        env = otel_env(receiver.endpoint, protocol, OTEL_SERVICE_NAME="checkout",
                       OTEL_EXPORTER_OTLP_COMPRESSION="gzip")
        result = await record(env, "--pid", str(running.pid), "--duration", "5",
                              "--rate", "99", "-o", str(out))
        assert result.returncode == 0, result.stderr.decode()
        check_matches_folded(receiver, out, "checkout")
        assert sum(folded(out).values()) >= 0.85 * 5 * 99 * 0.9
        assert {c.compression for c in receiver.calls if c.signal == "profiles"} == {"gzip"}


@real_bpf
async def test_a_receiver_refusing_the_first_requests_loses_nothing(
        running: subprocess.Popen[str], tmp_path: Path) -> None:
    out = tmp_path / "out.folded"
    async with grpc_receiver(Behaviour(fail_first=3)) as receiver:
        env = otel_env(receiver.endpoint, "grpc", OTEL_SERVICE_NAME="checkout")
        result = await record(env, "--pid", str(running.pid), "--duration", "3",
                              "--rate", "99", "-o", str(out))
        assert result.returncode == 0, result.stderr.decode()
        assert sum(c.failed for c in receiver.calls) == 3
        check_matches_folded(receiver, out, "checkout")


@real_bpf
@pytest.mark.parametrize("protocol", sorted(RECEIVERS))
async def test_a_receiver_that_is_down_costs_the_timeout_and_fails_clearly(
        protocol: str, running: subprocess.Popen[str], tmp_path: Path) -> None:
    out = tmp_path / "out.folded"
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = otel_env(endpoint, protocol, OTEL_EXPORTER_OTLP_TIMEOUT="2000")
    started = time.monotonic()
    result = await record(env, "--pid", str(running.pid), "--duration", "2", "--rate", "99",
                          "-o", str(out))
    elapsed = time.monotonic() - started
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: OTLP export to") and endpoint in last, stderr
    assert "samples not delivered" in last
    # Startup (compiling the probe) takes a few seconds; the failing export may add only
    # the 2 s timeout to the 2 s of recording.
    assert elapsed < 2 + 2 + 8, elapsed
    assert sum(folded(out).values()) >= 0.85 * 2 * 99 * 0.9, "the local file must be complete"


@real_bpf
async def test_otlp_json_file_holds_the_same_stacks_as_the_folded_file(
        running: subprocess.Popen[str], tmp_path: Path) -> None:
    jsonl, out = tmp_path / "out.otlp.jsonl", tmp_path / "out.folded"
    result = run_cli("record", "--pid", str(running.pid), "--duration", "1.5", "--rate", "99",
                     "-o", str(jsonl), "-o", str(out))
    assert result.returncode == 0, result.stderr
    lines = jsonl.read_bytes().splitlines()
    requests = [decode_otlp_json(line, ExportProfilesServiceRequest) for line in lines
                if b'"resourceProfiles"' in line]
    assert otlp_stacks_of(requests) == folded_stacks(out)
    assert any(b'"resourceMetrics"' in line for line in lines)


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--otlp-endpoint", "htp//x"], {},
     "error: --otlp-endpoint: 'htp//x' is not a valid OTLP endpoint"),
    ([], {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://host:99999"},
     "error: OTEL_EXPORTER_OTLP_ENDPOINT: 'http://host:99999' is not a valid OTLP endpoint"),
    (["--otlp-protocol", "grpc"], {}, "error: --otlp-protocol: needs --otlp-endpoint"),
    ([], {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "x"},
     "error: OTEL_EXPORTER_OTLP_PROTOCOL: 'x' is not an OTLP protocol"),
])
def test_bad_otlp_settings_are_refused_up_front(
        args: list[str], env: dict[str, str], message: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run([*CLI, "record", "--duration", "1", *args], capture_output=True,
                            text=True, timeout=60, env={**environ, **env})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr
