"""The fallback on real processes that may not use BPF: profiles and stalls from inside.

``embedded.py`` runs a workload with the profiler embedded, as uid 65534 with
no capabilities (Debian's python3, with this checkout and this environment's
packages), or as root with the BPF capabilities dropped.  Either way the
environment refuses BPF, and the profiler samples its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _support import DROPS_PRIVILEGES, NO_BPF_CAPS
from test_python_accuracy import FUNCTIONS, read_stacks, shares

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "tests" / "workloads" / "python" / "embedded.py"
FALLBACK = "ebpf-stream: profiling in fallback mode (in-process sampling, Python frames only"
TOLERANCE = 0.03  # shares, against the workload's own thread CPU time
BLOCK_NS = 300_000_000  # stalls.py's BLOCK_S

pytestmark = DROPS_PRIVILEGES




def embedded(prefix: list[str], workdir: Path, *args: str) -> tuple[dict[str, Any], list[str]]:
    """Run embedded.py; what it reported, and the profiler's log lines."""
    result = subprocess.run([*prefix, str(EMBEDDED), *args], cwd=workdir, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stderr.splitlines()


def check_fallback(ran: dict[str, Any], log: list[str], *named: str) -> None:
    """The run profiled in fallback mode, and said so, and why, in one line."""
    assert ran["mode"] == "fallback" and ran["overhead"]["mode"] == "fallback", ran
    assert len(log) == 1 and log[0].startswith(FALLBACK), log
    for words in named:
        assert words in log[0], log[0]
    assert ran["stats"]["received"] > 0 and ran["stats"]["exported"] > 0, ran["stats"]
    assert ran["overhead"]["user_cpu_ns"] > 0, "the sampling thread is the profiler's CPU"


def check_stalls(ran: dict[str, Any], tolerance_ns: int, exact: bool = True) -> None:
    """Each block of stalls.py is one stall that spans it, lasts as long, names ``culprit``;
    unless ``exact``, other stalls may be found besides (a polled loop's)."""
    blocks = ran["report"]["blocks"]
    found = sorted(ran["stalls"], key=lambda s: s["busy_since"])
    if not exact:
        found = [s for s in found if any(
            s["busy_since"] < end and start < s["busy_since"] + s["duration_ns"]
            for start, end in blocks)]
    assert len(found) == len(blocks), found
    for stall, (start, end) in zip(found, blocks, strict=True):
        assert stall["tid"] == ran["report"]["loop_tid"]
        assert abs(stall["duration_ns"] - BLOCK_NS) <= tolerance_ns, stall
        assert stall["busy_since"] <= start + tolerance_ns
        assert end <= stall["busy_since"] + stall["duration_ns"] + tolerance_ns
        assert "culprit" in stall["names"], stall


def check_loop_stalls(ran: dict[str, Any], loop: str) -> None:
    """check_stalls, as closely as each loop is watched.

    asyncio's selector times each wait exactly.  uvloop's are polled every tick (10 ms at
    99 Hz), so each end of a stall is known to a tick or two; and on a loaded machine a
    loop kept off the CPU between its short bursts may look busy (a stall of its own).
    """
    if loop == "asyncio":
        check_stalls(ran, BLOCK_NS // 10)
    else:
        check_stalls(ran, BLOCK_NS // 6, exact=False)


def check_shares(ran: dict[str, Any], folded: Path) -> None:
    """Each function's share of ``folded`` is within TOLERANCE of the workload's own clocks."""
    truth = ran["report"]
    total = truth["alpha"] + truth["beta"] + truth["delta"]
    leaf, inclusive = shares(read_stacks(folded, has_process=True))
    report = f"leaf {leaf}, inclusive {inclusive}, truth {truth}"
    expected_leaf = {"alpha": truth["alpha"], "beta": truth["beta"] - truth["gamma"],
                     "gamma": truth["gamma"], "delta": truth["delta"]}
    for function in FUNCTIONS:
        assert abs(leaf[function] - expected_leaf[function] / total) <= TOLERANCE, report
    assert abs(inclusive["beta"] - truth["beta"] / total) <= TOLERANCE, report


def test_shares_match_the_workloads_own_clock_unprivileged(as_nobody: list[str],
                                                           workdir: Path) -> None:
    ran, log = embedded(as_nobody, workdir, "shares", "12", str(workdir))
    check_fallback(ran, log, "uid 65534", "CAP_BPF", "fix: ")
    check_shares(ran, workdir / "profile.folded")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("mode", ["sleep", "cpu"])
def test_each_block_is_one_stall_unprivileged(as_nobody: list[str], workdir: Path, loop: str,
                                              mode: str) -> None:
    ran, log = embedded(as_nobody, workdir, "stalls", str(workdir), "--loop", loop, "--mode", mode)
    check_fallback(ran, log)
    check_loop_stalls(ran, loop)


def test_root_without_the_bpf_capabilities_falls_back_too(workdir: Path) -> None:
    ran, log = embedded([*NO_BPF_CAPS, sys.executable], workdir, "stalls", str(workdir))
    check_fallback(ran, log, "uid 0 (root) lacks CAP_BPF")
    check_stalls(ran, BLOCK_NS // 10)


def test_tracers_are_off_in_fallback_and_say_so(as_nobody: list[str], workdir: Path) -> None:
    result = subprocess.run([*as_nobody, "-c", """
import anyio
from ebpf_stream import EbpfConfig, Profiler

async def main():
    config = EbpfConfig().with_syscall_tracing(True).with_network_tracing(True)
    async with Profiler(config) as profiler:
        await anyio.sleep(0.3)
    print(profiler.mode)

anyio.run(main)
"""], cwd=workdir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(FALLBACK + "; syscall, network tracing needs BPF and is off): "), line
    assert result.stdout.split() == ["fallback"]


def test_the_sync_api_falls_back_too(as_nobody: list[str], workdir: Path) -> None:
    result = subprocess.run([*as_nobody, "-c", """
import time
from ebpf_stream import EbpfConfig, EbpfCpuProfiler
from ebpf_stream.exporters import FoldedFileExporter

profiler = EbpfCpuProfiler(EbpfConfig().with_sample_rate(99), [FoldedFileExporter("p.folded")])
profiler.start()
deadline = time.monotonic() + 1.5
while time.monotonic() < deadline:
    sum(i * i for i in range(10_000))
profiler.stop()
print(profiler.mode, profiler.stats.received > 50)
"""], cwd=workdir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fallback", "True"], result.stdout
    assert "<module>" in (workdir / "p.folded").read_text()
