"""Run the benchmark measurements directly, without asv, and print markdown tables.

asv stores one number per benchmark; this prints every figure of a run side
by side, with the machine it ran on, ready for bench/README.md.  Both call
the same measurement functions in ``benchmarks/``.

    sudo .venv/bin/python bench/run.py            # 30 s overhead windows
    sudo .venv/bin/python bench/run.py --quick    # 10 s windows, fewer rounds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

# Run as a script, this file's directory is on sys.path: the suite imports as asv sees it.
from benchmarks import (
    bench_config,
    bench_features,
    bench_otlp,
    bench_overhead,
    bench_python,
    bench_reader,
    bench_requests,
    bench_syscalls,
)
from benchmarks._support import bpf_unavailable, checkout_of

_MIB = 2**20


def code_version() -> str:
    """The commit of the ebpf_stream being measured, ``+dirty`` if it differs from it.

    That is the checkout ebpf_stream imports from, which PYTHONPATH may point
    at a pinned clone while the main tree keeps changing.
    """
    import ebpf_stream

    return checkout_of(Path(ebpf_stream.__file__).resolve().parents[1])


def machine_line() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{datetime.date.today().isoformat()}, {os.cpu_count()} vCPU {model}, "
            f"Linux {platform.release()}, Python {platform.python_version()}, "
            f"code {code_version()}")


def config_table(ns: dict[str, float]) -> str:
    rows = ["| operation | ns/op (median) |", "| --- | ---: |"]
    rows += [f"| `{name}` | {value:,.0f} |" for name, value in ns.items()]
    return "\n".join(rows)


def reader_table(r: bench_reader.ReaderFigures) -> str:
    rows = [
        f"Drain of a full ring, {r.records:,} records of {bench_reader.SAMPLE.itemsize} bytes, "
        f"median of {r.rounds} rounds:",
        "",
        "| consumer | events/s | CPU ns/event | ours is faster by |",
        "| --- | ---: | ---: | ---: |",
        f"| `RingBuffer.read_batch()` (ours) | {r.ours_events_per_s:,.0f} | "
        f"{r.ours_cpu_ns_per_event:.1f} | |",
        f"| bcc callback, decoding (`b[\"events\"].event(data)`) | {r.bcc_events_per_s:,.0f} | "
        f"{r.bcc_cpu_ns_per_event:.1f} | {r.speedup_vs_bcc:.1f}x |",
        f"| bcc callback, no-op | {r.bcc_noop_events_per_s:,.0f} | "
        f"{r.bcc_noop_cpu_ns_per_event:.1f} | {r.speedup_vs_bcc_noop:.1f}x |",
    ]
    return "\n".join(rows)


def overhead_table(run: bench_overhead.OverheadRun) -> str:
    rows = [
        "| tool | Hz | windows | samples/s | CPU % library (meter + BPF) "
        "| CPU % process (clock + BPF) [min-max] | CPU % process (/proc stat + BPF) "
        "| of which BPF % | BPF ns/run | memory MiB (anon + maps) | machine forks/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f, windows in run.rows():
        ours = f.tool == bench_overhead.OURS
        spread = [w.process_cpu_percent for w in windows]
        rows.append(
            f"| {f.tool} | {f.hz} | {len(windows)} | {f.samples_per_s:.1f} | "
            f"{f'{f.meter_cpu_percent:.3f}' if ours else 'n/a'} | "
            f"{f.process_cpu_percent:.3f} [{min(spread):.3f}-{max(spread):.3f}] | "
            f"{f.stat_cpu_percent:.3f} | {f.bpf_cpu_percent:.3f} | {f.bpf_ns_per_run:,.0f} | "
            f"{f.memory_bytes / _MIB:.1f} ({f.anon_rss_bytes / _MIB:.1f} + "
            f"{f.bpf_map_bytes / _MIB:.1f}) | {f.machine_forks_per_s:.1f} |"
        )
    return "\n".join(rows)


def otlp_encode_table(e: bench_otlp.EncodeFigures) -> str:
    rows = [
        f"One batch of {e.samples:,} samples over {e.stacks:,} stacks, median of {e.repeats} "
        "repeats:",
        "",
        "| stage | CPU ns/sample | CPU ms/batch |",
        "| --- | ---: | ---: |",
    ]
    rows += [f"| {name} | {ns:,.0f} | {ns * e.samples / 1e6:.1f} |"
             for name, ns in e.ns_per_sample.items()]
    rows += ["", "| encoding | bytes/batch | bytes/sample |", "| --- | ---: | ---: |"]
    rows += [f"| {name} | {size:,} | {size / e.samples:.1f} |"
             for name, size in e.bytes_per_batch.items()]
    return "\n".join(rows)


def otlp_delivery_table(d: bench_otlp.DeliveryFigures) -> str:
    rows = [
        f"{d.batches} batches of {d.samples_per_batch:,} samples per run, median of "
        f"{d.repeats} runs:",
        "",
        "| protocol | compression | samples/s [min-max] | payload MB/s | payload bytes/batch "
        "| exporter CPU ns/sample | receiver CPU ns/sample | other processes' CPU % |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows += [
        f"| {r['protocol']} | {r['compression']} | {r['samples_per_s']:,.0f} "
        f"[{r['min_samples_per_s']:,.0f}-{r['max_samples_per_s']:,.0f}] | "
        f"{r['payload_mb_per_s']:.1f} | {r['payload_bytes_per_batch']:,.0f} | "
        f"{r['exporter_cpu_ns_per_sample']:,.0f} | {r['receiver_cpu_ns_per_sample']:,.0f} | "
        f"{r['others_cpu_percent']:.1f} |"
        for r in d.rows
    ]
    return "\n".join(rows)


def features_table(rows: list[bench_features.FeatureFigures]) -> str:
    lines = [
        f"{bench_features.ROUNDS} rounds of `mixed_load` (each: "
        "20,000 getppid, one loopback TCP connection of 64 KiB each way, 256 fresh pages), "
        f"median of {bench_features.REPEATS} interleaved runs:",
        "",
        "| features on | workload ms | slowdown | tracer process CPU ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {f.feature} | {f.workload_ms:,.0f} | {f.slowdown:.3f}x | "
              f"{f.tracer_cpu_ms:,.1f} |" for f in rows]
    return "\n".join(lines)


def syscalls_table(f: bench_syscalls.SyscallLoadFigures) -> str:
    rows = [
        f"`getppid_loop` making {f.calls:,} getppid calls on one core, CPU ns per call, "
        f"median of {f.rounds} interleaved runs (counts checked exact on every traced run):",
        "",
        "| tracing | ns/call [min-max] | calls/s | slowdown vs off | vs floor |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rows += [f"| {mode} | {f.median_ns(mode):.1f} [{min(f.ns_per_call[mode]):.1f}-"
             f"{max(f.ns_per_call[mode]):.1f}] | {f.calls_per_s(mode) / 1e6:.2f} M | "
             f"{f.slowdown(mode):.2f}x | {f.median_ns(mode) / f.median_ns('floor'):.2f}x |"
             for mode in bench_syscalls.MODES]
    return "\n".join(rows)


def python_table(rows: list[bench_python.PythonFigures], repeats: int) -> str:
    groups = (bench_python.SAMPLING, bench_python.SCHED_SWITCH, bench_python.EPOLL)
    lines = [
        f"Medians of {repeats} interleaved runs; BPF figures from the kernel's run-time "
        "statistics (ns per run, and runs in the timed part):",
        "",
        "| workload | profiling | workload ms | slowdown | samples | BPF ns/sample "
        "| on_cpu_sample ns/run (runs) | sched_switch ns/run (runs) | epoll hooks ns/run (runs) "
        "| tracer CPU ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in rows:
        hooks = [f"{f.ns_per_run[g]:,.0f} ({f.runs[g]:,.0f})" if g in f.ns_per_run else ""
                 for g in groups]
        samples = f"{f.target_samples:,.0f} | {f.ns_per_sample:,.0f}" if f.runs else " | "
        lines.append(f"| {f.workload} | {f.config} | {f.workload_ms:,.0f} | {f.slowdown:.3f}x "
                     f"| {samples} | {' | '.join(hooks)} | {f.tracer_cpu_ms:,.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one 10 s window per rate, 3 reader rounds, fewer config calls")
    parser.add_argument("--window", type=float, help="overhead window in seconds (default 30)")
    parser.add_argument("--repeats", type=int,
                        help="overhead windows per rate, interleaved (default 3)")
    parser.add_argument("--rounds", type=int, help="reader rounds per consumer (default 7)")
    parser.add_argument("--only", action="append",
                        choices=["config", "reader", "overhead", "otlp", "features", "syscalls",
                                 "python", "requests"],
                        help="run only these parts (repeatable)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    parts = set(args.only or ["config", "reader", "overhead", "otlp", "features", "syscalls",
                              "python", "requests"])
    window = args.window or (10.0 if args.quick else bench_overhead.WINDOW_S)
    rounds = args.rounds or (3 if args.quick else 7)
    repeats = args.repeats or (1 if args.quick else bench_overhead.REPEATS)
    figures: dict[str, Any] = {"machine": machine_line()}

    print(f"Machine: {figures['machine']}\n")
    if "config" in parts:
        ns = bench_config.measure_ns_per_op(number=20_000 if args.quick else 200_000)
        figures["config_ns_per_op"] = ns
        print("## Config\n\n" + config_table(ns) + "\n", flush=True)
    unavailable = bpf_unavailable()
    if "requests" in parts:  # its per-span part needs no BPF
        spans, logged = bench_requests.measure_spans(3 if args.quick else
                                                     bench_requests.SPAN_ROUNDS)
        figures["request_spans"] = [dataclasses.asdict(f) | {"added_ns": f.added_ns}
                                    for f in spans]
        figures["request_spans_logged"] = logged
        print("## Linking samples to requests: cost per span\n\n"
              + bench_requests.spans_table(spans) + "\n", flush=True)
        if logged:
            print("Logged while timing:\n" + "\n".join(f"  {line}" for line in logged) + "\n")
    bpf_parts = {"reader", "overhead", "features", "syscalls", "python", "requests"}
    if unavailable and parts & bpf_parts:
        print(f"Skipping the BPF benchmarks: {unavailable}.")
        parts -= bpf_parts
    if "reader" in parts:
        reader = bench_reader.measure_reader(rounds)
        figures["reader"] = dataclasses.asdict(reader) | {
            "speedup_vs_bcc": reader.speedup_vs_bcc,
            "speedup_vs_bcc_noop": reader.speedup_vs_bcc_noop}
        print("## Reader throughput\n\n" + reader_table(reader) + "\n", flush=True)
    if "overhead" in parts:
        run = bench_overhead.measure_overhead(window_s=window, repeats=repeats)
        figures["overhead"] = dataclasses.asdict(run)
        print(f"## Steady-state overhead ({window:g} s windows after "
              f"{bench_overhead.WARMUP_S:g} s warm-up, both CPUs busy; "
              f"medians of {repeats} interleaved windows)\n\n"
              + overhead_table(run) + "\n", flush=True)
    if "otlp" in parts:
        encode = bench_otlp.measure_encode(repeats=5 if args.quick else bench_otlp.ENCODE_REPEATS)
        figures["otlp_encode"] = dataclasses.asdict(encode)
        print("## OTLP encode cost\n\n" + otlp_encode_table(encode) + "\n", flush=True)
        delivery = bench_otlp.measure_delivery(
            batches=10 if args.quick else bench_otlp.DELIVERY_BATCHES,
            repeats=3 if args.quick else bench_otlp.DELIVERY_REPEATS)
        figures["otlp_delivery"] = dataclasses.asdict(delivery)
        print("## OTLP delivery to a loopback receiver\n\n" + otlp_delivery_table(delivery)
              + "\n", flush=True)
    if "features" in parts:
        rows = bench_features.measure_features()
        figures["features"] = [dataclasses.asdict(f) for f in rows]
        print("## Cost of each feature on a fixed workload\n\n" + features_table(rows) + "\n",
              flush=True)
    if "syscalls" in parts:
        load = bench_syscalls.measure_syscall_load(
            rounds=3 if args.quick else bench_syscalls.ROUNDS)
        figures["syscalls"] = dataclasses.asdict(load)
        print("## Syscall tracing under load\n\n" + syscalls_table(load) + "\n", flush=True)
    if "python" in parts:
        python_repeats = 3 if args.quick else bench_python.REPEATS
        python_rows = bench_python.measure_python(python_repeats)
        figures["python"] = [dataclasses.asdict(f) for f in python_rows]
        print("## Cost of Python frames and stall detection\n\n"
              + python_table(python_rows, python_repeats) + "\n", flush=True)
    if "requests" in parts:
        window = 10.0 if args.quick else bench_requests.SAMPLE_WINDOW_S
        sample_runs = bench_requests.measure_samples(
            1 if args.quick else bench_requests.SAMPLE_RUNS, window)
        summary = bench_requests.summarize_samples(sample_runs, window)
        figures["request_samples"] = [dataclasses.asdict(f) for f in summary]
        print("## Linking samples to requests: cost per sample\n\n"
              + bench_requests.samples_table(summary) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if (after := machine_line()) != figures["machine"]:
        print(f"Warning: the code changed during the run; now {after}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
