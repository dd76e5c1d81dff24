"""What off-CPU profiling costs a process that switches hundreds of thousands of times a second.

The workload is a ping-pong (tests/workloads/pingpong.c): two threads of
one process bounce a byte over two pipes, pinned to one CPU, so every round
is two blocking reads, two wakeups and two context switches.  Each run is
a fresh ping-pong of ``--seconds`` under one mode:

* ``none``: nothing attached;
* ``floor``: an empty BPF program on ``sched_switch`` (a BTF tracepoint,
  the kind the off-CPU hook is), the least any switch hook costs;
* ``cpu``: the profiler at the production preset, CPU samples only;
* ``off-cpu/T``: the same with ``--off-cpu`` at threshold T ms.

Modes are interleaved round by round.  Printed per mode: the median rounds
a second, the slowdown against ``none`` (median of the per-round ratios),
for off-CPU the waits recorded a second, and for the profiler the kernel's
count of its BPF programs' run time and runs per round, and the CPU its
own process spent, in milliseconds a second.  Root (it loads BPF):

    .venv/bin/python bench/off_cpu.py                  # 5 rounds of 2 s, about 2 minutes
    .venv/bin/python bench/off_cpu.py --rounds 9 --json /tmp/off_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from ebpf_stream import EbpfConfig, Profiler
from ebpf_stream._bpf.syscalls import attach_raw_tracepoint, load_program
from ebpf_stream.exporters import MemoryExporter

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS_MS = (0.1, 1.0, 10.0)
_TRACING, _TRACE_RAW_TP = 26, 23
_RETURN_0 = bytes.fromhex("b700000000000000" "9500000000000000")  # r0 = 0; exit


@contextlib.contextmanager
def empty_switch_hook() -> Any:
    """An empty BTF tracepoint program on sched_switch, attached for the block."""
    libbpf = ctypes.CDLL("libbpf.so.1")
    libbpf.libbpf_find_vmlinux_btf_id.argtypes = [ctypes.c_char_p, ctypes.c_int]
    btf_id = libbpf.libbpf_find_vmlinux_btf_id(b"sched_switch", _TRACE_RAW_TP)
    fd = load_program("floor", _TRACING, _RETURN_0, "GPL", 0, attach_type=_TRACE_RAW_TP,
                      attach_btf_id=btf_id)
    try:
        link = attach_raw_tracepoint(fd, None)
        try:
            yield
        finally:
            os.close(link)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def mode_active(mode: str, pid: int, memory: MemoryExporter,
                      bpf: dict[str, int]) -> AsyncIterator[None]:
    """``mode`` on for the block; ``bpf`` gets the profiler's BPF run time and runs."""
    if mode == "none":
        yield
    elif mode == "floor":
        with empty_switch_hook():
            yield
    else:
        config = EbpfConfig.for_environment("production").with_pids([pid])
        if mode.startswith("off-cpu/"):
            config = config.with_off_cpu(threshold_ms=float(mode.partition("/")[2]))
        async with Profiler(config, [memory]) as profiler:
            before = profiler.get_overhead()
            yield
            after = profiler.get_overhead()
        bpf["ns"] = after.bpf_cpu_ns - before.bpf_cpu_ns
        bpf["runs"] = after.bpf_run_count - before.bpf_run_count
        bpf["user_ns"] = after.user_cpu_ns - before.user_cpu_ns


async def run_once(binary: Path, mode: str, seconds: float) -> dict[str, Any]:
    proc = subprocess.Popen(["taskset", "-c", "0", str(binary), str(seconds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        memory, bpf = MemoryExporter(), {"ns": 0, "runs": 0, "user_ns": 0}
        async with mode_active(mode, proc.pid, memory, bpf):
            out, _ = await anyio.to_thread.run_sync(proc.communicate, "go\n")
    finally:
        proc.kill()
        proc.wait()
    waits = sum(s.count for s in memory.profile.off_cpu.values()) if memory.profile else 0
    rounds = float(out.split()[-1])
    return {"mode": mode, "rounds_per_s": rounds, "waits_per_s": waits / seconds,
            "bpf_ns_per_round": bpf["ns"] / (rounds * seconds),
            "bpf_runs_per_round": bpf["runs"] / (rounds * seconds),
            "user_ms_per_s": bpf["user_ns"] / 1e6 / seconds}


def build(directory: Path) -> Path:
    binary = directory / "pingpong"
    subprocess.run(["cc", "-O2", "-g", "-fno-omit-frame-pointer", "-o", str(binary),
                    str(ROOT / "tests" / "workloads" / "pingpong.c")], check=True)
    return binary


async def bench(rounds: int, seconds: float) -> list[dict[str, Any]]:
    modes = ["none", "floor", "cpu", *(f"off-cpu/{t:g}" for t in THRESHOLDS_MS)]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(Path(tmp))
        for r in range(rounds):
            for mode in modes:
                runs.append({"round": r, **await run_once(binary, mode, seconds)})
    return runs


def report(runs: list[dict[str, Any]]) -> None:
    base = {r["round"]: r["rounds_per_s"] for r in runs if r["mode"] == "none"}
    print(f"{'mode':12s} {'rounds/s':>10s} {'slowdown':>9s} {'waits/s':>9s} "
          f"{'BPF ns/round':>13s} {'BPF runs/round':>15s} {'ours ms/s':>10s}")
    for mode in dict.fromkeys(r["mode"] for r in runs):
        mine = [r for r in runs if r["mode"] == mode]
        rate = statistics.median(r["rounds_per_s"] for r in mine)
        slowdown = statistics.median(1 - r["rounds_per_s"] / base[r["round"]] for r in mine)
        waits, ns, n, user = (statistics.median(r[k] for r in mine) for k in (
            "waits_per_s", "bpf_ns_per_round", "bpf_runs_per_round", "user_ms_per_s"))
        print(f"{mode:12s} {rate:10,.0f} {100 * slowdown:8.1f}% {waits:9,.0f} {ns:13,.0f} "
              f"{n:15.1f} {user:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = anyio.run(bench, args.rounds, args.seconds)
    report(runs)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
