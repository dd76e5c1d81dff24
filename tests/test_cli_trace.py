"""Syscall, network and memory tracing through the ``ebpf-stream`` command, against ground truth.

The workload (tests/workloads/trace_workload.c) prints what it did: exact
syscall counts per process, its TCP connections with their ports and byte
counts, and the kernel's own page-fault counts.  The command's OTLP/JSON
output must agree, and so must bcc's syscount and tcplife where they can be
trusted on this kernel.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _support import build, loaded_programs, program_ids
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from otlp_json_decode import decode_otlp_json
from rich.console import Console
from sample_frames import PERIOD, START
from sample_profiles import request_profile

from ebpf_stream._base.config import EbpfConfig
from ebpf_stream._cli.top import Rates, TopView, percentile_ns
from ebpf_stream._model.batch import Batch
from ebpf_stream._model.events import MemoryTotals, NetworkTotals, SyscallTotals, TcpConnection
from ebpf_stream._model.profile import Profile

EBPF_STREAM = str(Path(sys.executable).with_name("ebpf-stream"))
TRACE_ALL = ["--no-cpu", "--syscalls", "--network", "--memory"]


@pytest.fixture(scope="session")
def trace_workload(workload_dir: Path) -> Path:
    return build("trace_workload", workload_dir)


def run_cli(*args: str, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EBPF_STREAM, *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


def ground_truth(stdout: str) -> dict[str, Any]:
    """The workload's JSON line, among whatever else the command printed."""
    line = next(line for line in stdout.splitlines() if line.startswith('{"pid"'))
    truth: dict[str, Any] = json.loads(line)
    return truth


# -- reading the OTLP/JSON file -------------------------------------------------------


def plain(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def attributes(kvs: Iterator[KeyValue] | Any) -> dict[str, object]:
    return {kv.key: plain(kv.value) for kv in kvs}


class Traced:
    """What an OTLP/JSON file says about each process: latest sums and the log records."""

    def __init__(self, path: Path) -> None:
        self.sums: dict[tuple[str, int, frozenset[tuple[str, object]]], tuple[int, int]] = {}
        self.logs: list[dict[str, object]] = []
        for line in path.read_bytes().splitlines():
            if b'"resourceMetrics"' in line:
                self._metrics(decode_otlp_json(line, ExportMetricsServiceRequest))
            elif b'"resourceLogs"' in line:
                self._logs(decode_otlp_json(line, ExportLogsServiceRequest))

    def _metrics(self, request: ExportMetricsServiceRequest) -> None:
        for rm in request.resource_metrics:
            pid = attributes(rm.resource.attributes).get("process.pid")
            if not isinstance(pid, int):
                continue
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if not metric.HasField("sum"):
                        continue
                    for p in metric.sum.data_points:
                        key = (metric.name, pid, frozenset(attributes(p.attributes).items()))
                        seen = self.sums.get(key)
                        if seen is None or p.time_unix_nano >= seen[0]:  # cumulative: the latest
                            self.sums[key] = (p.time_unix_nano, p.as_int)

    def _logs(self, request: ExportLogsServiceRequest) -> None:
        for rl in request.resource_logs:
            resource = attributes(rl.resource.attributes)
            for sl in rl.scope_logs:
                for record in sl.log_records:
                    self.logs.append({**attributes(record.attributes),
                                      "event.name": record.event_name,
                                      "process.pid": resource.get("process.pid")})

    def value(self, metric: str, pid: int, **attrs: object) -> int | None:
        found = self.sums.get((metric, pid, frozenset(attrs.items())))
        return None if found is None else found[1]

    def syscalls(self, pid: int, name: str) -> int | None:
        return self.value("process.syscall.count", pid, **{"syscall.name": name})

    def syscall_errors(self, pid: int, name: str) -> int | None:
        return self.value("process.syscall.errors", pid, **{"syscall.name": name})

    def syscall_names(self, pid: int) -> dict[str, int]:
        return {dict(attrs)["syscall.name"]: value  # type: ignore[misc]
                for (metric, p, attrs), (_, value) in self.sums.items()
                if metric == "process.syscall.count" and p == pid}

    def connections(self, pids: set[int]) -> list[dict[str, object]]:
        return [r for r in self.logs
                if r["event.name"] == "tcp.connection.closed" and r["process.pid"] in pids]


def expected_connections(truth: dict[str, Any]) -> list[dict[str, object]]:
    """Each connection seen from both ends: the client in the parent, the server child."""
    server = truth["server"]
    records = []
    for c in truth["connections"]:
        common = {"network.local.address": "127.0.0.1", "network.peer.address": "127.0.0.1",
                  "tcp.connection.outcome": "closed"}
        records.append({**common, "process.pid": truth["pid"], "tcp.connection.role": "client",
                        "network.local.port": c["client_port"],
                        "network.peer.port": server["port"],
                        "tcp.connection.bytes_sent": c["sent"],
                        "tcp.connection.bytes_received": c["received"]})
        records.append({**common, "process.pid": server["pid"], "tcp.connection.role": "server",
                        "network.local.port": server["port"],
                        "network.peer.port": c["client_port"],
                        "tcp.connection.bytes_sent": c["received"],
                        "tcp.connection.bytes_received": c["sent"]})
    return records


def check_against_ground_truth(traced: Traced, truth: dict[str, Any]) -> None:
    """Exact syscall counts for every process of the tree, every connection, the faults."""
    parent, server, worker = truth["pid"], truth["server"]["pid"], truth["worker"]["pid"]
    assert traced.syscalls(parent, "getppid") == truth["getppid"]
    assert traced.syscalls(server, "getppid") == truth["server"]["getppid"]
    assert traced.syscalls(worker, "getppid") == truth["worker"]["getppid"]
    assert traced.syscall_errors(parent, "close") == truth["close_ebadf"]
    assert traced.syscall_errors(parent, "getppid") == 0

    keys = list(expected_connections(truth)[0])
    got = [{k: r.get(k) for k in keys} for r in traced.connections({parent, server})]
    expected = expected_connections(truth)
    assert sorted(got, key=repr) == sorted(expected, key=repr)

    # The kernel's count (getrusage) covers the process's whole life, from
    # before tracing began; from the start of the work on, it is a lower bound.
    minor = minor_faults(traced, parent)
    assert truth["pages"] <= truth["minflt"] - truth["minflt_at_go"] <= minor <= truth["minflt"]


def minor_faults(traced: Traced, pid: int) -> int:
    faults = traced.value("process.paging.faults", pid, **{"process.paging.fault_type": "minor"})
    assert faults is not None, f"no page faults for pid {pid}"
    return faults


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["record", "--no-cpu"], "error: --no-cpu: nothing left to record; add --syscalls"),
    (["record", "--no-cpu", "--syscalls", "--format", "svg"],
     "error: --format svg: holds CPU samples only"),
    (["record", "--no-cpu", "--memory", "-o", "x.folded"],
     "error: -o x.folded: folded holds CPU samples only"),
    (["record", "--no-cpu", "--network", "-o", "a.otlp.jsonl", "-o", "b.pb.gz"],
     "error: -o b.pb.gz: pprof holds CPU samples only"),
    (["record", "--slow-syscall-ms", "5"], "error: --slow-syscall-ms: needs syscall tracing"),
    (["record", "--syscalls", "--slow-syscall-ms", "0"], "error: slow_syscall_ms: 0.0 is outside"),
    (["record", "--syscall-counts-only"], "error: --syscall-counts-only: needs syscall tracing"),
    (["record", "--syscalls", "--syscall-counts-only", "--slow-syscall-ms", "5"],
     "error: --slow-syscall-ms: needs syscall tracing with latency"),
    (["record", "--syscalls", "--slow-syscall-ms", "abc"],
     "error: Invalid value for '--slow-syscall-ms'"),
    (["record", "--no-cpu", "--syscalls", "--rate", "99"], "error: --rate: sets CPU sampling"),
    (["record", "--syscall"], "error: No such option '--syscall'. (Did you mean one of"),
    (["top", "--no-syscalls", "--no-network", "--no-memory"], "error: nothing to show"),
    (["top", "--pid", "4000000"], "error: pid 4000000: no such process"),
    (["top", "--duration", "0"], "error: --duration: 0 must be a positive number"),
    (["top", "--", "no-such-command-here"], "error: command not found: no-such-command-here"),
])
def test_bad_input_is_one_line_and_non_zero(args: list[str], message: str) -> None:
    result = run_cli(*args, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message), lines[0]


# -- the acceptance test --------------------------------------------------------------------


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_record_reports_the_workloads_exact_activity(trace_workload: Path,
                                                     tmp_path: Path) -> None:
    """On a fresh machine: nothing cached from earlier runs."""
    out = tmp_path / "out.jsonl"
    result = run_cli("record", *TRACE_ALL, "--format", "otlp-json", "-o", str(out),
                     "--", str(trace_workload),
                     env={**os.environ, "EBPF_STREAM_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    truth = ground_truth(result.stdout)
    check_against_ground_truth(Traced(out), truth)


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_no_cpu_writes_otlp_json_by_default(tmp_path: Path) -> None:
    result = run_cli("record", "--no-cpu", "--syscalls", "--", "true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["trace.otlp.jsonl"]
    assert b'"process.syscall.count"' in (tmp_path / "trace.otlp.jsonl").read_bytes()


# -- a running process tree, beside bcc's tools -----------------------------------------


class Output:
    """What a child writes to ``fd``, drained in a thread so the child never blocks."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # a pseudo-terminal whose child side closed
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.text, flags=re.M)) < count:
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.text!r}"
            time.sleep(0.05)

    def join(self) -> str:
        self._thread.join(timeout=30)
        return self.text


class Terminal(Output):
    """A pseudo-terminal for a child's stderr, so that it shows its progress line."""

    def __init__(self) -> None:
        master, self.slave = os.openpty()
        super().__init__(master)

    def close(self) -> None:
        os.close(self.slave)
        self.join()
        os.close(self.fd)


class BccTool:
    """A bcc tool, started and waited for until it says it is tracing."""

    def __init__(self, argv: list[str], ready: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=env)
        assert self.process.stdout is not None
        self.output = Output(self.process.stdout.fileno())
        self.output.wait_for(re.escape(ready))

    def stop(self) -> str:
        """Interrupt it (syscount prints its table then) and return everything it printed."""
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=30)
        return self.output.join()


def syscount_table(output: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", output, flags=re.M)}


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_record_pid_follows_descendants_and_agrees_with_bcc_tools(
        trace_workload: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.otlp.jsonl"
    workload = subprocess.Popen([str(trace_workload), "--wait"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    assert workload.stdin is not None and workload.stdout is not None
    tools: list[BccTool] = []
    terminal = Terminal()
    try:
        assert workload.stdout.readline().strip() == "ready"  # the server child is forked
        pid = str(workload.pid)
        cli = subprocess.Popen([EBPF_STREAM, "record", "--pid", pid, *TRACE_ALL, "-o", str(out)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=terminal.slave)
        tools = [BccTool(["syscount-bpfcc", "-T", "200", "-p", pid], "Tracing"),
                 BccTool(["syscount-bpfcc", "-x", "-T", "200", "-p", pid], "Tracing"),
                 BccTool(["tcplife-bpfcc", "-s"], "PID,COMM")]
        terminal.wait_for(r"recording .*pid \d+ and 1 descendant")
        workload.stdin.write("go\n")
        workload.stdin.flush()
        truth = ground_truth(workload.stdout.read())
        assert workload.wait(timeout=30) == 0
        assert cli.wait(timeout=60) == 0, terminal.text
        # tcplife prints from its poll loop, and drops what it has not printed at Ctrl-C.
        ends = rf"^({workload.pid}|{truth['server']['pid']}),"
        tools[2].output.wait_for(ends, count=2 * len(truth["connections"]), timeout=30)
        syscount, failures, tcplife = (tool.stop() for tool in tools)
    finally:
        workload.kill()
        for tool in tools:
            tool.process.kill()
        terminal.close()

    summary = terminal.text.strip().splitlines()[-1]
    assert re.search(r"\d+ records, \d+ dropped; syscalls [\d,]+ \(\d[\d,]* failed\), "
                     r"connections 10 \(.* out, .* in\), page faults [\d,]+; sent to ",
                     summary), summary
    traced = Traced(out)
    check_against_ground_truth(traced, truth)  # the server existed, the worker was forked
    # Attached while the process waited for "go": only the return from that
    # wait (a few first touches of code pages) is traced but not in the
    # kernel's count from "go" on.
    after_go = truth["minflt"] - truth["minflt_at_go"]
    assert after_go <= minor_faults(traced, truth["pid"]) <= after_go + 64

    # syscount counts the parent alone (its -p is one process).  A call in flight
    # when tracing began (the read that waits for "go") is the only one that may
    # be seen at its exit alone.
    ours = traced.syscall_names(truth["pid"])
    theirs = syscount_table(syscount)
    assert theirs["getppid"] == ours["getppid"] == truth["getppid"]
    common = set(ours) & set(theirs) - {"read"}
    assert {n: ours[n] for n in common} == {n: theirs[n] for n in common}
    assert syscount_table(failures)["close"] == traced.syscall_errors(truth["pid"], "close")

    # tcplife reads its byte counts through struct tcp_sock as the 6.1 headers lay it
    # out, which is not how 6.18 does: only its pids and ports can be compared.
    lives = {(int(f[0]), int(f[4]), int(f[6])) for f in
             (line.split(",") for line in tcplife.splitlines()) if len(f) == 10 and
             f[0].isdigit() and int(f[0]) in (truth["pid"], truth["server"]["pid"])}
    ends = {(r["process.pid"], r["network.local.port"], r["network.peer.port"])
            for r in traced.connections({truth["pid"], truth["server"]["pid"]})}
    assert lives == ends


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_interrupt_writes_traces_and_detaches(trace_workload: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.otlp.jsonl"
    cli = subprocess.Popen([EBPF_STREAM, "record", *TRACE_ALL, "-o", str(out), "--",
                            str(trace_workload), "--wait", "--hold"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    assert cli.stdin is not None and cli.stdout is not None
    try:
        assert cli.stdout.readline().strip() == "ready"  # the gate opens once attached
        ours = program_ids(cli.pid)
        cli.stdin.write("go\n")
        cli.stdin.flush()
        truth = ground_truth(cli.stdout.readline())  # done, and holding
        cli.send_signal(signal.SIGINT)
        _, stderr = cli.communicate(timeout=60)
    finally:
        cli.kill()
    assert cli.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert ours and not ours & loaded_programs()
    check_against_ground_truth(Traced(out), truth)


# -- top ----------------------------------------------------------------------------------


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_top_without_a_terminal_prints_frames_with_the_workload(trace_workload: Path) -> None:
    result = run_cli("top", "--", str(trace_workload), "2000", "300", "3", "500", "700", "500")
    assert result.returncode == 0, result.stderr
    frames = result.stdout.split("ebpf-stream top")
    assert len(frames) >= 2, result.stdout
    last = frames[-1]
    assert "trace_workload" in last
    # SYSCALL, CALLS/s, ERRORS/s, CALLS, ERRORS, p50, p99
    assert row(last, "getppid")[3:5] == ["3,200", "0"]  # 2000 + the server's 700 + the worker's 500
    assert row(last, "close")[4] == "300"


def row(frame: str, first: str) -> list[str]:
    """The cells of the table row that starts with ``first``."""
    for line in frame.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] == first:
            return cells
    raise AssertionError(f"no {first} row in {frame}")


def syscalls(pid: int, name: str, count: int, errors: int = 0,
             buckets: list[int] | None = None) -> SyscallTotals:
    return SyscallTotals(pid, "app", name, count, errors, 0, buckets or [0] * 8)


def test_rates_come_from_successive_cumulative_snapshots() -> None:
    rates = Rates(started=8.0)
    first = syscalls(1, "read", 100, 4)
    rates.update([first, NetworkTotals(1, "app", 10, 20, 0, 0, 0, 0, 0, 0)], now=10.0)
    assert rates.rate(first, "count") == 50  # grew from nothing since tracing began
    second = syscalls(1, "read", 300, 10)
    rates.update([second], now=12.0)
    assert rates.rate(second, "count") == 100 and rates.rate(second, "errors") == 3
    # A batch without network totals keeps their last state; one with syscall
    # totals that lack a process has forgotten it.
    assert any(isinstance(t, NetworkTotals) for t in rates.latest.values())
    newcomer = syscalls(2, "read", 5)
    rates.update([newcomer], now=13.0)
    assert [t.pid for t in rates.latest.values() if isinstance(t, SyscallTotals)] == [2]
    assert rates.rate(newcomer, "count") == 5  # since the last syscall snapshot


def test_percentiles_are_the_upper_edges_of_log2_buckets() -> None:
    assert percentile_ns([0, 0, 0], 0.5) is None
    buckets = [0] * 10 + [98] + [0] * 9 + [2]  # 98 calls of 1-2 µs, 2 of ~1-2 ms
    assert percentile_ns(buckets, 0.5) == 2048
    assert percentile_ns(buckets, 0.99) == 1 << 21


def test_top_view_renders_rates_latencies_and_connections() -> None:
    config = (EbpfConfig().with_syscall_tracing(True).with_network_tracing(True)
              .with_memory_tracing(True).with_cpu_profiling(False))
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    view = TopView(config, console)
    empty = Profile(period_ns=1, start_ns=0, end_ns=1_000_000_000)
    memory = MemoryTotals(7, "app", 10, 0, 8 << 20, 0, 0, 0, 0, 0, 0, 0, 0)
    view.take(Batch(empty, totals=[syscalls(7, "getppid", 1000, 0, [0] * 10 + [1000]), memory]),
              now=1.0)
    connection = TcpConnection(0, 2_000_000, 7, "server", "server", "closed", 4, "127.0.0.1",
                               80, "127.0.0.1", 5555, 1234, 4321, 0)
    view.take(Batch(empty, records=[connection],
                    totals=[syscalls(7, "getppid", 3000, 0, [0] * 10 + [3000]),
                            syscalls(7, "close", 50, 50, [0] * 8 + [50]),
                            memory]), now=3.0)
    console.print(view.render())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    # 2000 more getppid calls and 50 new failing closes in 2 s
    assert row(text, "7")[:4] == ["7", "app", "1,025", "25"]
    assert row(text, "getppid") == ["getppid", "1,000", "0", "3,000", "0", "2 µs", "2 µs"]
    assert row(text, "close") == ["close", "25", "25", "50", "50", "512 ns", "512 ns"]
    assert re.search(r"127.0.0.1:80\s+│ 127.0.0.1:5555\s+│\s+1.2 KiB │\s+4.2 KiB │\s+2 ms", text)
    assert "8.0 MiB" in text


def test_top_view_shows_the_last_seconds_cpu_by_route() -> None:
    config = EbpfConfig().with_cpu_profiling(True)
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    view = TopView(config, console)
    view.take(Batch(request_profile()), now=1.0)
    console.print(view.render())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "CPU by route" in text
    assert row(text, "app")[:3] == ["app", "GET /items/{id}", "5"]  # the busiest first
    assert re.search(r"│ app\s+│ \[no route\]\s+│\s+1 │\s+8.3 │", text)
    # The next second served no request: the table goes.
    view.take(Batch(request_profile_without_requests()), now=2.0)
    console.file = io.StringIO()
    console.print(view.render())
    assert "CPU by route" not in console.file.getvalue()


def request_profile_without_requests() -> Profile:
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=START + 1_000_000_000)
    for s in request_profile():
        p.add(s.pid, s.process, s.frames, s.count)
    return p
