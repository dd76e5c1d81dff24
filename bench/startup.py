"""How long a profiler takes to start, and what the host's event loop sees meanwhile.

Each run is a fresh interpreter, as a service's start is: it enters
``Profiler`` with the production preset (folded and OTLP/JSON outputs)
while its own loop keeps a 5 ms ticker and a task that keeps it about
half busy, and reports:

* ``enter``: how long ``async with Profiler(...)`` took to enter its block;
* ``sampling``: from the start of entering to the profiler's first CPU
  sample (the sample's own kernel timestamp), the figure the compile
  cache is for;
* ``started``: to the end of the start (``wait_started()``);
* ``loop_gap``: the host loop's longest gap between ticks meanwhile.

Cold runs start with an empty compile cache, warm ones with the cache the
run before filled.  Modes are interleaved round by round; medians are
printed, and every run with ``--json``.  Root (it loads BPF):

    .venv/bin/python bench/startup.py                  # 5 rounds, about a minute
    .venv/bin/python bench/startup.py --rounds 9 --json /tmp/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CHILD = r"""
import json, os, sys, time
t0_ns = time.time_ns()
t0 = time.monotonic()
import anyio
from ebpf_stream import EbpfConfig, Profiler
from ebpf_stream.exporters import FoldedFileExporter, OtlpJsonFileExporter


class FirstSample:
    first_ns = None

    async def export(self, batch):
        stamps = [t for s in batch.profile for t in s.timestamps_ns]
        if stamps and self.first_ns is None:
            self.first_ns = min(stamps)

    async def aclose(self):
        pass


async def main():
    gaps, first = [], FirstSample()
    out = sys.argv[2]
    exporters = [first, FoldedFileExporter(os.path.join(out, "cpu.folded")),
                 OtlpJsonFileExporter(os.path.join(out, "cpu.otlp.jsonl"))]
    config = EbpfConfig.for_environment("production").with_export_interval(0.5)

    async def ticker():
        last = time.monotonic()
        while True:
            await anyio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def busy():  # half the loop's time: a service under load
        while True:
            sum(range(10_000))
            await anyio.sleep(0.0005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(busy)
        await anyio.sleep(0.05)
        begin_ns, begin = time.time_ns(), time.monotonic()
        background = {"start_in_background": True} if sys.argv[1] == "background" else {}
        profiler = Profiler(config, exporters, **background)
        async with profiler:
            enter = time.monotonic() - begin
            mode = await profiler.wait_started() if background else profiler.mode
            started = time.monotonic() - begin
            gap = max(gaps)
            await anyio.sleep(1.2)
        tg.cancel_scope.cancel()
    print(json.dumps({"mode": mode, "enter": enter, "started": started, "loop_gap": gap,
                      "sampling": (first.first_ns - begin_ns) / 1e9 if first.first_ns else None}))

anyio.run(main)
"""

FIGURES = ("enter", "sampling", "started", "loop_gap")


def run_once(start: str, cache: Path) -> dict[str, Any]:
    out = tempfile.mkdtemp(prefix="ebpf-stream-startup-")
    try:
        env = dict(os.environ, EBPF_STREAM_CACHE=str(cache))
        result = subprocess.run([sys.executable, "-c", CHILD, start, out], env=env,
                                capture_output=True, text=True, timeout=120, check=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"the profiled child failed: {result.stderr.strip()}")
    figures: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    if figures["mode"] != "bpf":
        raise SystemExit(f"the profiler did not start ({figures['mode']}): {result.stderr}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--starts", nargs="+", choices=("foreground", "background"),
                        default=["foreground", "background"],
                        help="foreground alone measures a checkout older than the background start")
    parser.add_argument("--cold-only", action="store_true",
                        help="every start compiles, as before the compile cache")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("loading BPF programs needs root")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    import ebpf_stream

    print(f"ebpf_stream from {Path(ebpf_stream.__file__).parent}, commit {commit}")
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="ebpf-stream-cache-") as tmp:
        cache = Path(tmp) / "cache"
        for round_ in range(args.rounds):
            for start in args.starts:
                shutil.rmtree(cache, ignore_errors=True)
                runs.setdefault(f"cold {start}", []).append(run_once(start, cache))
                if not args.cold_only:
                    runs.setdefault(f"warm {start}", []).append(run_once(start, cache))
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{'mode':18s}" + "".join(f"{f:>10s}" for f in FIGURES) + "   (seconds, medians)")
    for mode, figures in runs.items():
        medians = [statistics.median(r[f] for r in figures if r[f] is not None)
                   for f in FIGURES]
        print(f"{mode:18s}" + "".join(f"{m:10.3f}" for m in medians))
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
