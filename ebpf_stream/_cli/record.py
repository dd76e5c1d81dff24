"""``ebpf-stream record``: profile and trace processes, a command, or the whole system."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import click
from rich.console import Console
from rich.live import Live
from rich.text import Text

from .._base.config import EbpfConfig, PythonFrames
from .._base.errors import ConfigError
from .._base.otlp_settings import Signal, endpoint_in_environment
from .._model.batch import Batch, Stall
from .._model.events import LatestTotals, MemoryTotals, NetworkTotals, SyscallTotals, TcpConnection
from .._model.labels import stall_place
from .._model.profile import ProfileKind
from .._outputs.base import Exporter
from .._outputs.formats import FORMATS, ROUTE_FORMATS, exporter_for, format_for_path
from .._outputs.otlp.exporter import OtlpExporter
from .._profiler import Profiler
from .backend import backend_options
from .options import (
    check_target,
    config_from_options,
    target_options,
    traces,
    with_features,
    with_off_cpu,
    with_python,
)
from .routes import RouteShares
from .runs import Show, human_bytes, run_traced

_DEFAULT_NAME = {"folded": "profile.folded", "pprof": "profile.pb.gz",
                 "speedscope": "profile.speedscope.json", "svg": "profile.svg",
                 "otlp-json": "profile.otlp.jsonl"}
_TRACE_DEFAULT_NAME = "trace.otlp.jsonl"  # with --no-cpu there is no profile in it
_TRACE_FORMATS = frozenset({"otlp-json"})  # the others hold CPU samples only
_SHUTDOWN_MARGIN_S = 5.0  # beyond the OTLP flush timeout, for the last batch's conversion


def outputs_from_options(fmt: str | None, paths: Sequence[str], otlp: bool = False,
                         cpu: bool = True) -> list[tuple[str, Path]]:
    """The files to write; none by default when the run exports OTLP.

    Without CPU profiling only OTLP/JSON has anything to hold, so it is the
    default and the profile formats are refused.
    """
    if not paths and otlp and fmt is None:
        return []
    if not paths:
        chosen = fmt or ("folded" if cpu else "otlp-json")
        if not cpu and chosen not in _TRACE_FORMATS:
            raise ConfigError(f"--format {chosen}: holds CPU samples only, and --no-cpu "
                              "turns them off; use --format otlp-json")
        return [(chosen, Path(_DEFAULT_NAME[chosen] if cpu else _TRACE_DEFAULT_NAME))]
    outputs = []
    for p in paths:
        implied = fmt or format_for_path(p)
        if implied is None:
            raise ConfigError(f"-o {p}: cannot tell the format from the name; pass --format")
        if not cpu and implied not in _TRACE_FORMATS:
            raise ConfigError(f"-o {p}: {implied} holds CPU samples only, and --no-cpu turns "
                              "them off; write otlp-json (.otlp.jsonl) instead")
        outputs.append((implied, Path(p)))
    return outputs


class Tally:
    """What a run has traced so far: an exporter that keeps the latest totals and
    running counts, never the batches (a recording may run for days), and the
    CPU samples by endpoint."""

    def __init__(self) -> None:
        self.cpu_samples = 0
        self.routes = RouteShares()
        self.connections = 0
        self.stalls = 0
        self.longest_stall: Stall | None = None
        self.latest = LatestTotals()

    async def export(self, batch: Batch) -> None:
        self.cpu_samples += batch.profile.sample_count
        self.routes.add(batch.profile)
        self.connections += sum(isinstance(r, TcpConnection) for r in batch.records)
        for stall in (r for r in batch.records if isinstance(r, Stall)):
            self.stalls += 1
            if (self.longest_stall is None
                    or stall.stall.duration_ns > self.longest_stall.stall.duration_ns):
                self.longest_stall = stall
        self.latest.update(batch.totals)

    async def aclose(self) -> None:
        pass

    def describe(self, config: EbpfConfig) -> str:
        """The traced figures, for the features ``config`` switches on."""
        parts = []
        if config.syscall_tracing:
            calls = self.latest.of_kind(SyscallTotals)
            parts.append(f"syscalls {sum(t.count for t in calls):,} "
                         f"({sum(t.errors for t in calls):,} failed)")
        if config.network_tracing:
            net = self.latest.of_kind(NetworkTotals)
            parts.append(f"connections {self.connections:,} "
                         f"({human_bytes(sum(t.bytes_sent for t in net))} out, "
                         f"{human_bytes(sum(t.bytes_received for t in net))} in)")
        if config.memory_tracing:
            mem = self.latest.of_kind(MemoryTotals)
            parts.append(f"page faults {sum(t.minor_faults + t.major_faults for t in mem):,}")
        if self.longest_stall is not None:
            where = stall_place(self.longest_stall)
            parts.append(f"loop stalls {self.stalls:,} (longest "
                         f"{self.longest_stall.stall.duration_ns / 1e6:,.0f} ms"
                         f"{' ' + where if where else ''})")
        return ", ".join(parts)


def counted_as(config: EbpfConfig) -> str:
    """What ``Stats.received`` counts in this run: CPU samples, trace records, or both."""
    if not traces(config):
        return "samples"
    return "samples+records" if config.cpu_profiling else "records"


def _progress(tally: Tally | None) -> Show:
    async def show(profiler: Profiler, started: float, what: str) -> None:
        console = Console(stderr=True)
        counted = counted_as(profiler.config)
        with Live(console=console, transient=True, refresh_per_second=4) as live:
            while True:
                s = profiler.stats
                traced = tally.describe(profiler.config) if tally else ""
                live.update(Text.assemble(
                    ("● recording ", "bold red"), f"{what}  ",
                    (f"{time.monotonic() - started:6.1f}s", "bold"),
                    f"  {counted} {s.received:,}  dropped {s.dropped:,}",
                    f"  │ {traced}" if traced else "",
                ))
                await anyio.sleep(0.25)
    return show


def otlp_from_options(endpoint: str | None, protocol: str | None) -> OtlpExporter | None:
    """The OTLP exporter the options and ``OTEL_*`` variables ask for, if any."""
    if endpoint is None and not endpoint_in_environment():
        if protocol is not None:
            raise ConfigError("--otlp-protocol: needs --otlp-endpoint or "
                              "OTEL_EXPORTER_OTLP_ENDPOINT")
        return None
    return OtlpExporter(endpoint, protocol=protocol, source="--otlp-endpoint")


def check_by_route(outputs: list[tuple[str, Path]]) -> None:
    """Refuse ``--by-route`` when no output is a flame graph to root at endpoints."""
    if not any(fmt in ROUTE_FORMATS for fmt, _ in outputs):
        raise ConfigError(f"--by-route: roots the stacks of {', '.join(sorted(ROUTE_FORMATS))} "
                          "files at their endpoints, and no output is one")


async def run_record(config: EbpfConfig, outputs: list[tuple[str, Path]],
                     otlp: OtlpExporter | None, command: Sequence[str],
                     duration: float | None, progress: bool,
                     tally: Tally | None = None, by_route: bool = False,
                     kind: str = "on-cpu") -> Profiler:
    """Record into the ``outputs`` files and ``otlp``; ``tally`` keeps the traced figures;
    the flame-graph files hold the ``kind`` of time."""
    exporters: list[Exporter] = [exporter_for(fmt, path, by_route=by_route, kind=kind)
                                 for fmt, path in outputs]
    shutdown_timeout = 15.0
    if otlp is not None:
        exporters.append(otlp)
        shutdown_timeout = max(shutdown_timeout, otlp.flush_timeout_s + _SHUTDOWN_MARGIN_S)
    if tally is not None:
        exporters.append(tally)
    return await run_traced(config, exporters, command, duration,
                            _progress(tally) if progress else None, shutdown_timeout)


@click.command(context_settings={"ignore_unknown_options": False})
@target_options
@click.option("--cpu/--no-cpu", default=True, help="CPU profiling (on by default).")
@click.option("--syscalls", is_flag=True, help="Trace syscalls: counts, errors, latency.")
@click.option("--network", is_flag=True, help="Trace TCP connections and bytes.")
@click.option("--memory", is_flag=True, help="Trace page faults, RSS, mmap and OOM kills.")
@click.option("--slow-syscall-ms", type=float, metavar="MS",
              help="With --syscalls: report each call that takes at least MS, with its stack.")
@click.option("--syscall-counts-only", is_flag=True,
              help="With --syscalls: exact counts and errors only, no latency; the cheapest.")
@click.option("-r", "--rate", type=int, help="Samples per second per CPU.")
@click.option("--max-samples", type=int, help="Most samples kept per export interval.")
@click.option("--python-frames", type=click.Choice([m.value for m in PythonFrames]),
              help="Python processes' stacks: Python frames spliced into the native ones "
              "(merged), Python frames alone (python), or native frames only (off). "
              "Default: merged.")
@click.option("--stall-threshold", "stall_threshold_ms", type=float, metavar="MS",
              help="Report an asyncio loop that runs callbacks for MS without waiting, with "
              "the stacks it ran; 0 turns stall detection off. Default: 100.")
@click.option("--off-cpu", is_flag=True, help="Record where threads wait, off the CPU, "
              "weighted by the time waited: its own profile in OTLP and pprof; see --profile.")
@click.option("--off-cpu-threshold", "off_cpu_threshold_ms", type=float, metavar="MS",
              help="With --off-cpu: record each wait of at least MS; shorter ones are sampled "
              "in proportion to their length. Default: 1.")
@click.option("--idle-loops", is_flag=True, help="With --off-cpu: count a Python event "
              "loop's waits in epoll too (idle, not blocked, so left out by default).")
@click.option("--profile", "kind", type=click.Choice([k.value for k in ProfileKind]),
              default=ProfileKind.ON_CPU.value, show_default=True,
              help="What folded, speedscope and SVG files hold: CPU samples, waits off the "
              "CPU (--off-cpu), or both (wall); the last two in microseconds.")
@click.option("-f", "--format", "fmt", type=click.Choice(sorted(FORMATS)),
              help="Output format. Default: from each -o name's extension.")
@click.option("-o", "--output", "paths", multiple=True, help="Output file (repeatable).")
@click.option("--by-route", is_flag=True, help="Root the stacks of folded, speedscope and SVG "
              "files at their request's endpoint (GET /items/{id}, or [no route]).")
@click.option("--otlp-endpoint", metavar="URL", help="Export OTLP to this collector. "
              "Default: $OTEL_EXPORTER_OTLP_ENDPOINT, if set.")
@click.option("--otlp-protocol", type=click.Choice(["grpc", "http/protobuf"]),
              help="OTLP protocol. Default: $OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf.")
def record(pids: tuple[int, ...], duration: float | None, env: str | None,
           command: tuple[str, ...], cpu: bool, syscalls: bool, network: bool, memory: bool,
           slow_syscall_ms: float | None, syscall_counts_only: bool, rate: int | None,
           max_samples: int | None, python_frames: str | None,
           stall_threshold_ms: float | None, off_cpu: bool, off_cpu_threshold_ms: float | None,
           idle_loops: bool, kind: str, fmt: str | None, paths: tuple[str, ...],
           by_route: bool, otlp_endpoint: str | None,
           otlp_protocol: str | None) -> None:
    """Record --pid processes, COMMAND, or the whole system: CPU profile and traces.

    Profiles go to the -o files, and over OTLP when --otlp-endpoint or
    OTEL_EXPORTER_OTLP_ENDPOINT is set (then no file is written unless asked).
    Syscall, network and memory traces, and asyncio loop stalls, go to OTLP
    and otlp-json files.

    \b
    ebpf-stream record --pid 1234 --duration 10 -o app.svg
    ebpf-stream record --pid 1234 --stall-threshold 50 -o app.svg -o app.otlp.jsonl
    ebpf-stream record --pid 1234 --by-route -o endpoints.svg
    ebpf-stream record --pid 1234 --off-cpu --profile off-cpu -o waits.svg
    ebpf-stream record -o build.folded -- make -j2
    ebpf-stream record --no-cpu --syscalls --network -o trace.otlp.jsonl -- ./server
    ebpf-stream record --pid 1234 --otlp-endpoint http://collector:4317 --otlp-protocol grpc
    """
    check_target(pids, command, duration)
    if not (cpu or syscalls or network or memory):
        raise ConfigError("--no-cpu: nothing left to record; add --syscalls, --network "
                          "or --memory")
    if rate is not None and not cpu:
        raise ConfigError("--rate: sets CPU sampling, which --no-cpu turns off")
    config = with_features(config_from_options(env, rate, max_samples, pids), cpu=cpu,
                           syscalls=syscalls, network=network, memory=memory,
                           slow_syscall_ms=slow_syscall_ms,
                           syscall_latency=not syscall_counts_only)
    config = with_python(config, cpu=cpu, python_frames=python_frames,
                         stall_threshold_ms=stall_threshold_ms)
    config = with_off_cpu(config, cpu=cpu, off_cpu=off_cpu, threshold_ms=off_cpu_threshold_ms,
                          idle_loops=idle_loops)
    if kind != ProfileKind.ON_CPU and not off_cpu:
        raise ConfigError(f"--profile {kind}: holds waits off the CPU, which need --off-cpu")
    otlp = otlp_from_options(otlp_endpoint, otlp_protocol)
    outputs = outputs_from_options(fmt, paths, otlp is not None, cpu)
    if by_route:
        check_by_route(outputs)
    if traces(config) and otlp is None and not any(f in _TRACE_FORMATS for f, _ in outputs):
        click.echo("note: only otlp-json files and OTLP hold the syscall, network and memory "
                   "traces; add -o trace.otlp.jsonl", err=True)
    progress = sys.stderr.isatty()
    tally = Tally()
    profiler = anyio.run(run_record, config, outputs, otlp, command, duration, progress, tally,
                         by_route, kind, backend_options=backend_options())
    if progress:
        s = profiler.stats
        where = [str(p) for _, p in outputs]
        if otlp is not None:
            where.append(otlp.endpoints[Signal.PROFILES].display)
        traced = tally.describe(config)
        click.echo(f"{s.received:,} {counted_as(config)}, {s.dropped:,} dropped"
                   f"{'; ' + traced if traced else ''}; sent to {', '.join(where)}", err=True)
        routes = tally.routes.table()
        if routes is not None:
            Console(stderr=True).print(routes)
