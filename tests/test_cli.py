"""The ebpf-stream command, end to end, as a user runs it."""

from __future__ import annotations

import gzip
import io
import json
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import anyio
import pytest
from _support import bpf_fds, cpu_seconds, loaded_programs, program_ids, sampling, start_ready
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from otlp_json_decode import decode_otlp_json
from otlp_stacks import resource_attributes
from rich.console import Console
from sample_frames import HANDLER, RUN_ONCE, START
from sample_profiles import CHECKOUT, ITEM, empty_profile, request_profile, sample_profile

from ebpf_stream._base.config import EbpfConfig
from ebpf_stream._cli.record import Tally
from ebpf_stream._model.batch import Batch, Stall, StallStack
from ebpf_stream._model.events import LoopStall

CLI = [sys.executable, "-m", "ebpf_stream._cli"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def folded(path: Path) -> dict[str, int]:
    lines = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        lines[stack] = int(count)
    return lines


@pytest.mark.parametrize(("args", "message"), [
    (["record", "--rate", "0"], "error: sample_rate_hz: 0 is outside the allowed range 1..1000"),
    (["record", "--rate", "5000"], "error: sample_rate_hz: 5000 is outside"),
    (["record", "--pid", "4000000"], "error: pid 4000000: no such process"),
    (["record", "--duration", "-1"], "error: --duration: -1 must be a positive number"),
    (["record", "--format", "flame"], "error: Invalid value for '-f' / '--format'"),
    (["record", "-o", "out.xyz"], "error: -o out.xyz: cannot tell the format"),
    (["record", "--", "no-such-command-here"], "error: command not found: no-such-command-here"),
    (["record", "--env", "prod"], "error: environment: 'prod' is not one of"),
    (["record", "--pid", "abc"], "error: Invalid value for '-p' / '--pid'"),
    (["record", "--python-frames", "native"],
     "error: Invalid value for '--python-frames': 'native' is not one of 'merged', 'python', "
     "'off'"),
    (["record", "--stall-threshold", "soon"], "error: Invalid value for '--stall-threshold'"),
    (["record", "--stall-threshold", "-5"],
     "error: loop_stall_ms: -5.0 is outside the allowed range"),
    (["record", "--no-cpu", "--syscalls", "--python-frames", "python"],
     "error: --python-frames: works on CPU samples, which --no-cpu turns off"),
    (["record", "--no-cpu", "--syscalls", "--stall-threshold", "50"],
     "error: --stall-threshold: works on CPU samples, which --no-cpu turns off"),
    (["record", "--python-frames", "off", "--stall-threshold", "50"],
     "error: --stall-threshold: needs Python frames"),
    (["record", "--off-cpu-threshold", "5"],
     "error: --off-cpu-threshold: works on waits off the CPU, which need --off-cpu"),
    (["record", "--idle-loops"], "error: --idle-loops: works on waits off the CPU"),
    (["record", "--no-cpu", "--syscalls", "--off-cpu"],
     "error: --off-cpu: records with the CPU samples, which --no-cpu turns off"),
    (["record", "--off-cpu", "--off-cpu-threshold", "0"],
     "error: off_cpu_threshold_ms: 0.0 is outside the allowed range"),
    (["record", "--profile", "wall", "-o", "out.svg"],
     "error: --profile wall: holds waits off the CPU, which need --off-cpu"),
    (["record", "--profile", "idle"], "error: Invalid value for '--profile'"),
    (["record", "--by-route", "-o", "out.pb.gz"],
     "error: --by-route: roots the stacks of folded, speedscope, svg files at their endpoints, "
     "and no output is one"),
])
def test_bad_input_is_one_line_and_non_zero(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message), lines[0]


def test_an_output_directory_that_does_not_exist_is_refused_before_recording() -> None:
    # Refused at start: a check at the first export would come after the 30 s.
    result = run_cli("record", "--duration", "30", "-o", "/nonexistent-dir/cpu.pb.gz",
                     timeout=20)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: cannot write /nonexistent-dir/cpu.pb.gz: directory /nonexistent-dir "
        "does not exist"]


def test_env_variable_selects_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENV", "staging-ish")
    result = run_cli("record", "--duration", "1")
    assert result.returncode == 1
    assert "environment: 'staging-ish'" in result.stderr


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_record_pid_yields_most_expected_samples_root_first(
        running: subprocess.Popen[str], tmp_path: Path) -> None:
    out = tmp_path / "out.folded"
    cpu = cpu_seconds(running.pid)
    result = run_cli("record", "--pid", str(running.pid), "--duration", "5", "--rate", "99",
                     "--format", "folded", "-o", str(out))
    cpu = cpu_seconds(running.pid) - cpu  # includes the CLI's startup: an upper bound
    assert result.returncode == 0, result.stderr
    stacks = folded(out)
    total = sum(stacks.values())
    assert total >= 0.85 * min(cpu, 5) * 99, (total, cpu)
    top = max(stacks, key=stacks.__getitem__)
    frames = top.split(";")
    assert frames[0] == "hot_native"
    assert frames[-4:] == ["main", "outer", "middle", "hot_leaf"]
    assert stacks[top] / total > 0.8


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_record_command_follows_children_and_ends_with_it(
        hot_native: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.folded"
    started = time.monotonic()
    # The shell forks the workload rather than exec'ing it, so only following
    # children finds it.
    result = run_cli("record", "--rate", "99", "--duration", "30", "-o", str(out), "--",
                     "sh", "-c", f"{hot_native} 1.5; true")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 20, "recording must end when the command exits"
    stacks = folded(out)
    hot = sum(n for s, n in stacks.items() if s.startswith("hot_native;") and
              s.endswith(";hot_leaf"))
    assert hot >= 50, stacks


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_record_writes_every_format(running: subprocess.Popen[str], tmp_path: Path) -> None:
    paths = [tmp_path / n for n in ("p.pb.gz", "p.speedscope.json", "p.svg", "p.folded")]
    args = [a for p in paths for a in ("-o", str(p))]
    result = run_cli("record", "--pid", str(running.pid), "--duration", "1.5", "--rate", "99",
                     *args)
    assert result.returncode == 0, result.stderr
    from ebpf_stream._convert import pprof_pb2 as _pprof_pb2

    profile = _pprof_pb2.Profile.FromString(gzip.decompress(paths[0].read_bytes()))
    strings = list(profile.string_table)
    total = sum(folded(paths[3]).values())
    # How many samples a loaded machine lets the workload earn varies; that
    # every format holds the same ones does not.
    assert total > 0 and "hot_leaf" in paths[3].read_text()
    assert "hot_leaf" in strings and sum(s.value[0] for s in profile.sample) == total
    speedscope = json.loads(paths[1].read_text())
    assert any(f["name"] == "hot_leaf" for f in speedscope["shared"]["frames"])
    cpu_ns = sum(s.value[1] for s in profile.sample)  # speedscope weighs in nanoseconds
    assert sum(sum(p["weights"]) for p in speedscope["profiles"]) == cpu_ns
    svg = ET.parse(paths[2]).getroot()
    assert "hot_leaf" in ET.tostring(svg, encoding="unicode")


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_record_whole_system_sees_every_busy_process(
        running: subprocess.Popen[str], syscall_heavy: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.folded"
    other = start_ready([str(syscall_heavy), "30"])
    try:
        result = run_cli("record", "--duration", "1.5", "--rate", "49", "-o", str(out))
    finally:
        other.kill()
        other.wait()
    assert result.returncode == 0, result.stderr
    processes = {s.split(";")[0] for s in folded(out)}
    assert {"hot_native", "syscall_heavy"} <= processes


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_writes_what_was_collected_and_detaches(
        running: subprocess.Popen[str], tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "out.folded"
    proc = subprocess.Popen([*CLI, "record", "--pid", str(running.pid), "--rate", "99",
                             "-o", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sampling(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        ours = program_ids(proc.pid)
        time.sleep(1.5)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert sum(folded(out).values()) > 100
    assert ours and not ours & loaded_programs()


STALLING_APP = """\
import asyncio
import time


def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def blocker():
    time.sleep(0.3)  # blocks the loop


async def main():
    for _ in range(2):
        await asyncio.sleep(0.1)
        await blocker()
    for _ in range(50):  # 0.5 s of CPU in 10 ms callbacks: no stall
        spin(0.01)
        await asyncio.sleep(0)
    await asyncio.sleep(0.5)  # alive while the last stall's frames are named


asyncio.run(main())
"""


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_record_a_python_command_shows_its_functions_and_loop_stalls(tmp_path: Path) -> None:
    app = tmp_path / "stalling_app.py"
    app.write_text(STALLING_APP)
    sleep_line = STALLING_APP.splitlines().index("    time.sleep(0.3)  # blocks the loop") + 1
    out, jsonl = tmp_path / "out.folded", tmp_path / "out.otlp.jsonl"
    result = run_cli("record", "--rate", "99", "--stall-threshold", "100", "-o", str(out),
                     "-o", str(jsonl), "--", sys.executable, str(app))
    assert result.returncode == 0, result.stderr

    spinning = sum(n for stack, n in folded(out).items()
                   if ";main (stalling_app.py:" in stack and ";spin (stalling_app.py:" in stack)
    assert spinning >= 25, folded(out)  # about 50 at 99 Hz

    lines = jsonl.read_bytes().splitlines()
    stalls = [r for line in lines if b'"resourceLogs"' in line
              for rl in decode_otlp_json(line, ExportLogsServiceRequest).resource_logs
              for sl in rl.scope_logs for r in sl.log_records
              if r.event_name == "asyncio.loop.stall"]
    assert len(stalls) == 2, [r.body.string_value for r in stalls]
    for record in stalls:
        attributes = resource_attributes(record)
        assert attributes["asyncio.loop.stall.duration"] == pytest.approx(0.3, rel=0.1)
        assert (attributes["code.function.name"], attributes["code.file.path"],
                attributes["code.line.number"]) == ("blocker", str(app), sleep_line)
        assert record.body.string_value.endswith(f" ms in blocker (stalling_app.py:{sleep_line})")

    last = [decode_otlp_json(line, ExportMetricsServiceRequest) for line in lines
            if b'"asyncio.loop.busy.duration"' in line][-1]
    (busy,) = [m for rm in last.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
               if m.name == "asyncio.loop.busy.duration"]
    (point,) = busy.histogram.data_points
    # The two 300 ms blocks, in [2**28, 2**29) ns; every other busy period is far shorter.
    assert sum(point.bucket_counts[28:]) == point.bucket_counts[28] == 2


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_doctor_passes_every_check_here() -> None:
    result = run_cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("CAP_BPF", "CAP_PERFMON", "kernel", "btf", "tracefs", "bcc",
                  "kernel headers", "compile cache"):
        assert check in result.stdout
    assert "FAIL" not in result.stdout
    # Which Python compiles, and which bcc it imports, proven by importing it.
    text = " ".join(result.stdout.replace("│", " ").split())  # the table wraps cells
    assert re.search(r"bcc \d+\.\d+\.\d+ at \S+bcc.*compiled by \S+python3\S* "
                     r"\(Python 3\.\d+\.\d+\)", text), result.stdout


def test_no_fds_leak_into_the_test_process() -> None:
    assert bpf_fds() == []


# -- the summary, without recording ------------------------------------------


def test_the_summary_names_the_longest_stalls_culprit_request_and_trace() -> None:
    tally = Tally()
    short = Stall(LoopStall(START, 10, 10, "app", 1, 150_000_000),
                  (StallStack((RUN_ONCE, HANDLER), 1, 0, CHECKOUT),))
    longest = Stall(LoopStall(START + 1, 10, 10, "app", 2, 301_000_000),
                    (StallStack((RUN_ONCE, HANDLER), 3, 300_000_000, ITEM),))
    anyio.run(tally.export, Batch(empty_profile(), records=[short, longest]))
    assert tally.describe(EbpfConfig()) == (
        "loop stalls 2 (longest 301 ms in handler (app.py:3) "
        f"during GET /items/{{id}}, trace {ITEM.trace_id})")
    anyio.run(tally.export, Batch(empty_profile(), records=[
        Stall(LoopStall(START + 2, 10, 10, "app", 3, 400_000_000),
              (StallStack((RUN_ONCE, HANDLER), 3, 0, CHECKOUT),))]))
    assert tally.describe(EbpfConfig()) == (
        "loop stalls 3 (longest 400 ms in handler (app.py:3) during POST /checkout)")


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the tables rich printed in ``text``."""
    return [[cell.strip() for cell in line.strip("│ \n").split("│")]
            for line in text.splitlines() if line.startswith("│")]


def test_the_summary_shows_cpu_by_route_when_samples_name_one() -> None:
    tally = Tally()
    anyio.run(tally.export, Batch(request_profile()))
    anyio.run(tally.export, Batch(sample_profile()))  # other processes, without requests
    table = tally.routes.table()
    assert table is not None
    console = Console(file=io.StringIO(), width=120)
    console.print(table)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert text.startswith("CPU by route")
    # "app" had 12 samples of requests and 9 more without (sample_profile's pids 10 and
    # 11); "db" served none and is left out.
    assert table_rows(text) == [
        ["app", "[no route]", "10", "47.6"],
        ["app", "GET /items/{id}", "5", "23.8"],
        ["app", "POST /checkout", "4", "19.0"],
        ["app", "/health", "2", "9.5"],
    ]


def test_the_summary_shows_no_routes_when_no_sample_names_one() -> None:
    tally = Tally()
    anyio.run(tally.export, Batch(sample_profile()))
    assert tally.routes.table() is None
