"""asyncio loop stalls on real interpreters, against what the workload says it did.

``stalls.py`` blocks its loop in a ``culprit`` coroutine at moments it
records; each block must come out as exactly one stall that spans it, lasts
as long, and names the culprit, and nothing else may.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _support import build
from test_probe_python import STALLS, python_names, run_stalls
from test_python_accuracy import ECLI
from test_python_runtime import available

from ebpf_stream import LoopTotals, Stall
from ebpf_stream.exporters import MemoryExporter

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]

BLOCK_NS = 300_000_000  # stalls.py's BLOCK_S
TOLERANCE = 0.1
SAMPLES_PER_BLOCK = 0.3 * 99  # at config_for's 99 Hz


def stalls(memory: MemoryExporter) -> list[Stall]:
    return [r for r in memory.records if isinstance(r, Stall)]


def loop_totals(memory: MemoryExporter) -> list[LoopTotals]:
    return [t for t in memory.totals if isinstance(t, LoopTotals)]


def check_one_stall_per_block(found: list[Stall], told: dict[str, Any]) -> None:
    """Each block is one stall of the loop's thread that spans it and lasts as long."""
    blocks = told["blocks"]
    assert len(found) == len(blocks), [s.stall for s in found]
    for stall, (start, end) in zip(sorted(found, key=lambda s: s.stall.busy_since), blocks,
                                   strict=True):
        event = stall.stall
        assert (event.pid, event.tid) == (told["pid"], told["loop_tid"])
        assert abs(event.duration_ns - BLOCK_NS) <= TOLERANCE * BLOCK_NS, event
        assert event.busy_since <= start and end <= event.busy_since + event.duration_ns
        assert stall.stacks, f"no stack came with {event}"
        assert "culprit" in python_names(stall.stacks[0].frames), stall.stacks[0]


@pytest.mark.parametrize(("name", "loop"), [
    ("venv-3.11", "asyncio"), ("venv-3.11", "uvloop"), ("debian-3.11", "asyncio"),
    ("pyenv-3.12", "asyncio"), ("pyenv-3.13", "asyncio")])
@pytest.mark.anyio
async def test_each_blocking_sleep_is_one_stall(name: str, loop: str) -> None:
    """A selector polled by another thread, with long gaps between polls,
    is no asyncio loop: it yields no stall."""
    memory, told = await run_stalls(available(name), "--blocks", "3", "--loop", loop,
                                    "--poller")
    found = stalls(memory)
    check_one_stall_per_block(found, told)
    for stall in found:
        # The thread slept in the culprit for the whole block.
        slept = stall.stacks[0].slept_ns
        assert abs(slept - BLOCK_NS) <= TOLERANCE * BLOCK_NS, stall.stacks[0]
        assert stall.culprit is not None and stall.culprit.name == "culprit", stall.culprit
    totals = loop_totals(memory)
    assert [(t.pid, t.tid) for t in totals] == [(told["pid"], told["loop_tid"])]
    assert totals[0].count == sum(totals[0].buckets) > 0
    assert totals[0].duration_ns >= 3 * BLOCK_NS


@pytest.mark.anyio
async def test_a_stall_burning_cpu_is_found_in_its_samples() -> None:
    memory, told = await run_stalls(available("venv-3.11"), "--blocks", "2", "--mode", "cpu")
    found = stalls(memory)
    check_one_stall_per_block(found, told)
    for stall in found:
        sampled = sum(s.samples for s in stall.stacks)
        in_culprit = sum(s.samples for s in stall.stacks if "culprit" in python_names(s.frames))
        assert sampled >= 0.5 * SAMPLES_PER_BLOCK, stall
        assert in_culprit >= 0.9 * sampled, stall


@pytest.mark.anyio
async def test_threshold_zero_turns_stall_detection_off() -> None:
    memory, _ = await run_stalls(available("venv-3.11"), "--blocks", "2", "--mode", "cpu",
                                 loop_stall_ms=0.0)
    assert stalls(memory) == [] and loop_totals(memory) == []
    assert memory.profile is not None
    culprit = sum(s.count for s in memory.profile if "culprit" in python_names(s.frames))
    assert culprit >= SAMPLES_PER_BLOCK, "Python frames stay on"


def cli_has_stall_threshold() -> bool:
    help_text = subprocess.run([str(ECLI), "record", "--help"], capture_output=True, text=True,
                               check=False).stdout
    return "--stall-threshold" in help_text


@pytest.mark.skipif(not cli_has_stall_threshold(), reason="record has no --stall-threshold")
@pytest.mark.parametrize("threshold_ms", ["100", "0"])
def test_cli_writes_a_stall_log_per_block(tmp_path: Path, threshold_ms: str) -> None:
    """``record --stall-threshold`` on a launched asyncio app: one OTLP log
    record naming the culprit per block, or none with 0."""
    out = tmp_path / "out.otlp.jsonl"
    result = subprocess.run(
        [str(ECLI), "record", "--stall-threshold", threshold_ms, "-o", str(out), "--",
         available("venv-3.11"), str(STALLS), "--blocks", "2", "--delay", "1"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    told = json.loads(result.stdout.splitlines()[-1])
    logs = [record for line in out.read_text().splitlines()
            for resource in json.loads(line).get("resourceLogs", [])
            for scope in resource["scopeLogs"] for record in scope["logRecords"]]
    stall_logs = [r for r in logs if r.get("eventName") == "asyncio.loop.stall"]
    assert len(stall_logs) == (len(told["blocks"]) if threshold_ms != "0" else 0), logs
    for record in stall_logs:
        attributes = {a["key"]: a["value"] for a in record["attributes"]}
        assert attributes["code.function.name"] == {"stringValue": "culprit"}
        assert attributes["code.file.path"] == {"stringValue": str(STALLS)}
        duration_s = attributes["asyncio.loop.stall.duration"]["doubleValue"]
        assert abs(duration_s * 1e9 - BLOCK_NS) <= TOLERANCE * BLOCK_NS


STARTUP_BLOCKS = 3
# Imports little besides asyncio, so it waits in epoll soon after its exec,
# first outside asyncio (a startup check polling a socket), then blocks its
# loop from its first callback on.  The load it starts there (two CPU-bound
# processes and argv[1], a syscall-heavy one) runs while it is recorded,
# not while the probes compile, and ends with it.
STARTUP_STALLS = f"""\
import asyncio
import selectors
import socket
import subprocess
import sys
import time

BUSY = "import time\\nend = time.monotonic() + 30\\nwhile time.monotonic() < end: pass"


async def block():
    time.sleep(0.3)  # blocks the loop


async def main():
    load = [subprocess.Popen(argv) for argv in
            [[sys.executable, "-S", "-c", BUSY]] * 2 + [[sys.argv[1], "30"]]]
    for _ in range({STARTUP_BLOCKS}):
        await block()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # alive while the last stall's frames are named
    for process in load:
        process.kill()
        process.wait()


reader, writer = socket.socketpair()
with selectors.DefaultSelector() as selector:
    selector.register(reader, selectors.EVENT_READ)
    selector.select(timeout=0.01)
reader.close()
writer.close()
asyncio.run(main())
print("done")
"""


@pytest.mark.parametrize("tracers", [
    [], ["--syscalls", "--slow-syscall-ms", "50"],
    ["--syscalls", "--slow-syscall-ms", "50", "--network", "--memory"]], ids=" ".join)
def test_record_reports_every_stall_from_the_first_callback_on(
        tmp_path: Path, workload_dir: Path, tracers: list[str]) -> None:
    """A launched app that blocks at once, on a loaded machine: each block is
    one stall, with any tracers.

    The loop is watched from the app's exec, however late the profiler finds
    its interpreter, which the load slows; and each stall is told asyncio's
    by its own wait, whatever the thread's first wait was.
    """
    app = tmp_path / "startup_stalls.py"
    app.write_text(STARTUP_STALLS)
    out = tmp_path / "out.otlp.jsonl"
    result = subprocess.run(
        [str(ECLI), "record", *tracers, "--stall-threshold", "200", "-o", str(out), "--",
         sys.executable, "-I", "-S", str(app), str(build("syscall_heavy", workload_dir))],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr
    stalls = [record for line in out.read_text().splitlines()
              for resource in json.loads(line).get("resourceLogs", [])
              for scope in resource["scopeLogs"] for record in scope["logRecords"]
              if record.get("eventName") == "asyncio.loop.stall"]
    durations = [{a["key"]: a["value"] for a in r["attributes"]}
                 ["asyncio.loop.stall.duration"]["doubleValue"] for r in stalls]
    assert len(stalls) == STARTUP_BLOCKS, [r["body"] for r in stalls]
    assert all(d >= 0.29 for d in durations), durations
