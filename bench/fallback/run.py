"""The fallback's cost and accuracy, against py-spy and pyroscope-io on the same host.

``host.py`` is a service-like process of 20 threads (see its docstring).

**Cost.** Each round runs the host once per mode, in an order rotated from
round to round: ``none``; ``fallback`` (ebpf-stream embedded at 19 Hz, the
host started as root without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN, so the
profiler falls back); ``pyroscope`` (pyroscope-io embedded, 100 Hz);
``py-spy`` (``py-spy record --rate 100 --nonblocking`` attached from
outside).  Per run, over the host's measured window: the host's CPU as a
share of one core; for ``fallback`` the profiler's own CPU, as
``get_overhead()`` measures it (its sampling thread and its pipeline); for
``py-spy`` py-spy's own CPU.  The host and py-spy are pinned to different
CPUs.

**Accuracy.** The host runs in fallback mode at 99 Hz, with five times the
work per request (for samples enough in the window), while ebpf-stream's
BPF mode (``ebpf-stream record --pid --python-frames python``) and py-spy
sample the same process from outside over the same window; each function's
inclusive share of the samples is compared.

    sudo .venv/bin/python bench/fallback/run.py                      # 5 rounds, 3 accuracy runs
    sudo .venv/bin/python bench/fallback/run.py --rounds 1 --accuracy-runs 1 --seconds 5
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HOST = HERE / "host.py"
PY_SPY = Path(sys.executable).with_name("py-spy")
ECLI = Path(sys.executable).with_name("ebpf-stream")
NO_BPF_CAPS = ["setpriv", "--inh-caps=-bpf,-perfmon,-sys_admin",
               "--bounding-set=-bpf,-perfmon,-sys_admin"]
MODES = ("none", "fallback", "pyroscope", "py-spy")
FUNCTIONS = ("serve", "pool_worker", "handle_request", "alpha", "delta")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_host(mode: str, seconds: float, rate: int, out: Path,
               unit: int = 6000) -> subprocess.Popen[str]:
    prefix = [*NO_BPF_CAPS] if mode == "fallback" else []
    host_mode = {"py-spy": "external"}.get(mode, mode)
    argv = ["taskset", "-c", "1", *prefix, sys.executable, str(HOST), "--mode", host_mode,
            "--seconds", str(seconds), "--rate", str(rate), "--out", str(out),
            "--unit", str(unit)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=out.parent)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        errors = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"{mode}: the host did not start: {line}{errors}")
    return proc


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"the host failed: {err}")
    return dict(json.loads(out.splitlines()[-1]))


def cost_run(mode: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    proc = start_host(mode, args.seconds, 19, scratch / f"{mode}.folded")
    spy = None
    if mode == "py-spy":
        spy = subprocess.Popen(["taskset", "-c", "0", str(PY_SPY), "record", "--rate", "100",
                                "--nonblocking", "--format", "raw", "-o",
                                str(scratch / "py-spy.txt"), "--pid", str(proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = finish(proc)
    if spy is not None:
        # py-spy ends with the host: its CPU over its whole life, attaching included.
        _, _, usage = os.wait4(spy.pid, 0)
        spy.returncode = 0
        result["tool_cpu_s"] = usage.ru_utime + usage.ru_stime
    wall = result["wall_s"]
    result["host_core_percent"] = 100 * result["cpu_s"] / wall
    if "profiler_cpu_s" in result:
        result["profiler_core_percent"] = 100 * result["profiler_cpu_s"] / wall
    if result.get("tool_cpu_s") is not None:
        result["tool_core_percent"] = 100 * result["tool_cpu_s"] / wall
    return result


def inclusive_shares(stacks: dict[tuple[str, ...], int]) -> dict[str, float]:
    total = sum(stacks.values()) or 1
    counts: collections.Counter[str] = collections.Counter()
    for names, count in stacks.items():
        for name in set(names):
            counts[name] += count
    return {f: counts[f] / total for f in FUNCTIONS}


def folded_names(path: Path) -> dict[tuple[str, ...], int]:
    """Each stack's function names (``name (file:line)`` labels, or py-spy's)."""
    stacks: dict[tuple[str, ...], int] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        names = tuple(label.split(" (", 1)[0] for label in stack.split(";"))
        stacks[names] += int(count)
    return stacks


def accuracy_run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    fallback_file = scratch / "fallback99.folded"
    # A busier loop (five times the work per request), for enough samples in the window.
    proc = start_host("fallback", args.seconds, 99, fallback_file, unit=30000)
    pid = str(proc.pid)
    window = str(max(1, int(args.seconds) - 2))
    bpf = subprocess.Popen([str(ECLI), "record", "--pid", pid, "--duration", window, "--rate",
                            "99", "--python-frames", "python", "-o", str(scratch / "bpf.folded")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    spy = subprocess.run(["taskset", "-c", "0", str(PY_SPY), "record", "--pid", pid,
                          "--duration", window, "--rate", "99", "--format", "raw",
                          "--nonblocking", "-o", str(scratch / "py-spy99.txt")],
                         capture_output=True, text=True, check=False)
    _, bpf_err = bpf.communicate(timeout=120)
    host = finish(proc)
    if bpf.returncode != 0 or spy.returncode != 0 or host.get("mode") != "fallback":
        raise RuntimeError(f"accuracy run failed: {bpf_err} {spy.stderr} {host}")
    shares = {name: inclusive_shares(folded_names(path)) for name, path in (
        ("fallback", fallback_file), ("bpf", scratch / "bpf.folded"),
        ("py-spy", scratch / "py-spy99.txt"))}
    return {"shares": shares,
            "fallback_vs_bpf_max_points": 100 * max(
                abs(shares["fallback"][f] - shares["bpf"][f]) for f in FUNCTIONS),
            "py_spy_vs_bpf_max_points": 100 * max(
                abs(shares["py-spy"][f] - shares["bpf"][f]) for f in FUNCTIONS)}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--accuracy-runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not PY_SPY.exists():
        print("needs root, setpriv and py-spy", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, {args.rounds} rounds of {args.seconds:g} s")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        scratch.chmod(0o777)
        for n in range(args.rounds):
            order = MODES[n % len(MODES):] + MODES[:n % len(MODES)]
            for mode in order:
                result = cost_run(mode, args, scratch)
                runs[mode].append(result)
                print(f"round {n + 1} {mode}: host {result['host_core_percent']:.2f}% of a core"
                      + (f", profiler {result['profiler_core_percent']:.3f}%"
                         if "profiler_core_percent" in result else "")
                      + (f", py-spy {result['tool_core_percent']:.2f}%"
                         if result.get("tool_core_percent") is not None else ""), flush=True)
        accuracy = []
        for n in range(args.accuracy_runs):
            accuracy.append(accuracy_run(args, scratch))
            print(f"accuracy {n + 1}: fallback vs BPF at most "
                  f"{accuracy[-1]['fallback_vs_bpf_max_points']:.2f} points, py-spy vs BPF "
                  f"{accuracy[-1]['py_spy_vs_bpf_max_points']:.2f}", flush=True)
    none = median([r["host_core_percent"] for r in runs["none"]])
    summary = {
        "commit": commit, "rounds": args.rounds, "seconds": args.seconds,
        "threads": runs["fallback"][0]["threads"] if runs["fallback"] else None,
        "host_core_percent": {m: median([r["host_core_percent"] for r in runs[m]])
                              for m in MODES},
        "host_added_core_points": {m: median([r["host_core_percent"] for r in runs[m]])
                                   - none for m in MODES if none is not None and runs[m]},
        "fallback_profiler_core_percent": median(
            [r["profiler_core_percent"] for r in runs["fallback"]]),
        "py_spy_core_percent": median([r["tool_core_percent"] for r in runs["py-spy"]
                                       if r.get("tool_core_percent") is not None]),
        "fallback_vs_bpf_max_points": median(
            [a["fallback_vs_bpf_max_points"] for a in accuracy]),
        "py_spy_vs_bpf_max_points": median([a["py_spy_vs_bpf_max_points"] for a in accuracy]),
        "accuracy_runs": accuracy,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "accuracy_runs"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
