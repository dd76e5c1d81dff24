"""What linking samples to requests costs, per span and per sample.

Runs the two parts of ``benchmarks/bench_requests.py`` and prints their
tables (``run.py --only requests`` runs the same functions):

* ``spans``: OpenTelemetry SDK spans with and without the wrapper that
  publishes the current span, interleaved in one process (no root needed);
* ``samples``: ``on_cpu_sample``'s run time per sample (``kernel.bpf_stats_enabled``,
  restored afterwards) while a workload of asyncio tasks busy inside
  spans is profiled at 99 Hz, publishing its requests or not (root): one
  workload at a time, alternated, and both at once, one profiler each.

    .venv/bin/python bench/requests.py                         # about 5 minutes
    .venv/bin/python bench/requests.py --parts spans           # seconds, no root
    .venv/bin/python bench/requests.py --runs 3 --window 20 --json /tmp/requests.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

# bench/, for the suite, last: this file must not stand in for the ``requests`` library.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(_HERE)] + [_HERE]
from benchmarks import bench_requests  # noqa: E402
from benchmarks._support import bpf_unavailable  # noqa: E402
from run import machine_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("spans", "samples"),
                        default=["spans", "samples"])
    parser.add_argument("--rounds", type=int, default=bench_requests.SPAN_ROUNDS,
                        help="interleaved rounds of the span timings")
    parser.add_argument("--runs", type=int, default=bench_requests.SAMPLE_RUNS,
                        help="profiled windows of each mode, alternated")
    parser.add_argument("--window", type=float, default=bench_requests.SAMPLE_WINDOW_S,
                        help="seconds of each profiled window")
    parser.add_argument("--designs", nargs="+",
                        choices=(bench_requests.ALTERNATED, bench_requests.SIDE_BY_SIDE),
                        default=[bench_requests.ALTERNATED, bench_requests.SIDE_BY_SIDE],
                        help="per sample: one workload at a time, or both at once "
                             "(quote \"side by side\")")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"machine": machine_line()}
    print(f"Machine: {figures['machine']}\n", flush=True)
    if "spans" in args.parts:
        spans, logged = bench_requests.measure_spans(args.rounds)
        figures["spans"] = [dataclasses.asdict(f) | {"added_ns": f.added_ns} for f in spans]
        figures["spans_logged"] = logged
        print("## Per span\n\n" + bench_requests.spans_table(spans) + "\n", flush=True)
        if logged:
            print("Logged while timing:\n" + "\n".join(f"  {line}" for line in logged) + "\n")
    if "samples" in args.parts:
        if unavailable := bpf_unavailable():
            print(f"Skipping the per-sample part: {unavailable}.")
        else:
            runs = bench_requests.measure_samples(args.runs, args.window,
                                                  designs=tuple(args.designs))
            summary = bench_requests.summarize_samples(runs, args.window)
            figures["sample_runs"] = [dataclasses.asdict(r) for r in runs]
            figures["samples"] = [dataclasses.asdict(f) for f in summary]
            print("## Per sample\n\n" + bench_requests.samples_table(summary) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if (after := machine_line()) != figures["machine"]:
        print(f"Warning: the code changed during the run; now {after}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
