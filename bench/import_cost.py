"""What importing ebpf-stream, and starting a profiler, adds to a host process.

Each figure comes from a fresh interpreter, measured against itself before
the statement: resident memory (VmRSS), entries in ``sys.modules``, wall time,
and which heavy packages got loaded.  The median of ``--runs`` interpreters.

    .venv/bin/python bench/import_cost.py            # the imports; no root needed
    .venv/bin/python bench/import_cost.py --started  # and a running profiler (root, BPF)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

HEAVY = ("numpy", "google.protobuf", "grpc", "httpx", "rich", "click", "uvloop", "msgspec",
         "ebpf_stream._convert.pprof_pb2")

IMPORTS = (
    "import ebpf_stream",
    "from ebpf_stream import Profiler, EbpfConfig",
    "import ebpf_stream.exporters",
)

# The production preset writing folded stacks and OTLP/JSON, kept busy for 3 s.
STARTED = """
import os, tempfile, time, anyio
from ebpf_stream import EbpfConfig, Profiler
from ebpf_stream.exporters import FoldedFileExporter, OtlpJsonFileExporter

async def main():
    out = tempfile.mkdtemp()
    outputs = [FoldedFileExporter(os.path.join(out, "cpu.folded")),
               OtlpJsonFileExporter(os.path.join(out, "cpu.otlp.jsonl"))]
    async with Profiler(EbpfConfig.for_environment("production"), outputs):
        end = time.monotonic() + 3
        while time.monotonic() < end:
            sum(range(100_000))
            await anyio.sleep(0)
        measure()

anyio.run(main)
"""

CHILD = """
import json, sys, time

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

def measure():
    print(json.dumps({"rss_mib": rss_mib() - rss0, "modules": len(sys.modules) - modules0,
                      "ms": 1000 * (time.perf_counter() - t0),
                      "heavy": [m for m in HEAVY if m in sys.modules]}))

HEAVY = %r
rss0, modules0, t0 = rss_mib(), len(sys.modules), time.perf_counter()
%s
"""


def measure(code: str, runs: int) -> dict[str, Any]:
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", CHILD % (HEAVY, code)], check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.splitlines()[-1]))
    return {key: statistics.median(r[key] for r in results) for key in ("rss_mib", "modules", "ms")
            } | {"heavy": results[0]["heavy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--started", action="store_true", help="also start a profiler")
    args = parser.parse_args()
    cases = [(statement, f"{statement}\nmeasure()") for statement in IMPORTS]
    if args.started:
        cases.append(("profiler started: production, folded + OTLP/JSON", STARTED))
    for name, code in cases:
        r = measure(code, args.runs)
        print(f"{name}: +{r['rss_mib']:.1f} MiB, +{r['modules']:.0f} modules, "
              f"{r['ms']:.0f} ms; loaded {', '.join(r['heavy']) or 'none'}")


if __name__ == "__main__":
    main()
