"""``ebpf-stream record``: profile and trace processes, a command, or the whole system."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
from anyio.abc import TaskGroup
from rich.console import Console
from rich.live import Live
from rich.text import Text

from .._base.config import EbpfConfig, Environment, PythonFrames, sample_rate_range
from .._base.errors import ConfigError
from .._base.otlp_settings import Signal, endpoint_in_environment
from .._model.batch import Batch, Stall
from .._model.events import (
    MemoryTotals,
    NetworkTotals,
    SyscallTotals,
    TcpConnection,
    Totals,
    totals_key,
)
from .._model.labels import frame_label
from .._outputs.base import Exporter
from .._outputs.formats import FORMATS, format_for_path
from .._outputs.otlp.exporter import OtlpExporter
from .._profiler import Profiler
from .backend import backend_options, running_loop_name
from .launch import GatedCommand, start_gated

_log = logging.getLogger(__name__)
_DEFAULT_NAME = {"folded": "profile.folded", "pprof": "profile.pb.gz",
                 "speedscope": "profile.speedscope.json", "svg": "profile.svg",
                 "otlp-json": "profile.otlp.jsonl"}
_TRACE_DEFAULT_NAME = "trace.otlp.jsonl"  # with --no-cpu there is no profile in it
_TRACE_FORMATS = frozenset({"otlp-json"})  # the others hold CPU samples only
_SHUTDOWN_MARGIN_S = 5.0  # beyond the OTLP flush timeout, for the last batch's conversion

F = TypeVar("F", bound=Callable[..., object])
T = TypeVar("T", SyscallTotals, NetworkTotals, MemoryTotals)
# Runs beside the recording: (profiler, monotonic start, what is recorded).
Show = Callable[[Profiler, float, str], Coroutine[Any, Any, None]]


def config_from_options(env: str | None, rate: int | None, max_samples: int | None,
                        pids: Sequence[int]) -> EbpfConfig:
    """The config for a run: the preset of ``--env`` (or ``$ENV``), then the overrides."""
    environment = Environment.parse(env or os.environ.get("ENV") or "production")
    config = EbpfConfig.for_environment(environment)
    if rate is not None:
        config = config.with_sample_rate(rate)
        lo, hi = sample_rate_range(environment)
        if not lo <= rate <= hi:
            click.echo(f"note: {rate} Hz is outside the {lo}-{hi} Hz suggested for "
                       f"{environment.value}", err=True)
    if max_samples is not None:
        config = config.with_max_samples(max_samples)
    return config.with_pids(pids)


def with_features(config: EbpfConfig, *, cpu: bool, syscalls: bool, network: bool,
                  memory: bool, slow_syscall_ms: float | None,
                  syscall_latency: bool = True) -> EbpfConfig:
    """``config`` with the features the options switch on."""
    if slow_syscall_ms is not None:
        if not syscalls or not syscall_latency:
            raise ConfigError("--slow-syscall-ms: needs syscall tracing with latency "
                              "(--syscalls, without --syscall-counts-only)")
        config = config.with_slow_syscall_threshold(slow_syscall_ms)
    if not syscall_latency:
        if not syscalls:
            raise ConfigError("--syscall-counts-only: needs syscall tracing (--syscalls)")
        config = config.with_syscall_latency(False)
    # CPU last: each builder validates, and CPU may be the only feature on before.
    return (config.with_syscall_tracing(syscalls).with_network_tracing(network)
            .with_memory_tracing(memory).with_cpu_profiling(cpu))


def with_python(config: EbpfConfig, *, cpu: bool, python_frames: str | None,
                stall_threshold_ms: float | None) -> EbpfConfig:
    """``config`` with how Python stacks read and when an asyncio loop has stalled."""
    for option, value in (("--python-frames", python_frames),
                          ("--stall-threshold", stall_threshold_ms)):
        if value is not None and not cpu:
            raise ConfigError(f"{option}: works on CPU samples, which --no-cpu turns off")
    if python_frames is not None:
        config = config.with_python_frames(python_frames)
    if stall_threshold_ms is not None:
        if stall_threshold_ms and config.python_frames is PythonFrames.OFF:
            raise ConfigError("--stall-threshold: needs Python frames, which "
                              "--python-frames off turns off")
        config = config.with_stall_threshold(stall_threshold_ms)
    return config


def traces(config: EbpfConfig) -> bool:
    return config.syscall_tracing or config.network_tracing or config.memory_tracing


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


def with_descendants(pids: Iterable[int]) -> list[int]:
    """``pids`` and every process descended from them, as ``/proc`` shows them now.

    Children forked later are followed in the kernel; these are the ones
    that already exist.
    """
    children: defaultdict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited while we looked
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children[parent].append(int(entry.name))
    found = list(dict.fromkeys(pids))
    seen = set(found)
    for pid in found:  # grows as descendants are found: a breadth-first walk
        for child in children.get(pid, ()):
            if child not in seen:
                seen.add(child)
                found.append(child)
    return found


async def _wait_for_exit(pids: Sequence[int]) -> None:
    """Return once every pid has exited (pidfds become readable on exit)."""
    fds = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue
        for fd in fds:
            await anyio.wait_readable(fd)
    finally:
        for fd in fds:
            os.close(fd)


async def _until_signal() -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def _stop_when_any(tg: TaskGroup, *waits: Awaitable[object]) -> None:
    stop = anyio.Event()

    async def run(wait: Awaitable[object]) -> None:
        await wait
        stop.set()

    for w in waits:
        tg.start_soon(run, w)
    await stop.wait()
    tg.cancel_scope.cancel()


class Tally:
    """What a run has traced so far: an exporter that keeps the latest totals.

    Totals are cumulative per process, so the run's figures are the sums of
    the latest snapshot of each; a process that exited keeps its last one.
    """

    def __init__(self) -> None:
        self.cpu_samples = 0
        self.connections = 0
        self.stalls = 0
        self.longest_stall: Stall | None = None
        self.latest: dict[tuple[str, int, str], Totals] = {}

    async def export(self, batch: Batch) -> None:
        self.cpu_samples += batch.profile.sample_count
        self.connections += sum(isinstance(r, TcpConnection) for r in batch.records)
        for stall in (r for r in batch.records if isinstance(r, Stall)):
            self.stalls += 1
            if (self.longest_stall is None
                    or stall.stall.duration_ns > self.longest_stall.stall.duration_ns):
                self.longest_stall = stall
        for totals in batch.totals:
            self.latest[totals_key(totals)] = totals

    async def aclose(self) -> None:
        pass

    def of_kind(self, kind: type[T]) -> list[T]:
        return [t for t in self.latest.values() if isinstance(t, kind)]

    def describe(self, config: EbpfConfig) -> str:
        """The traced figures, for the features ``config`` switches on."""
        parts = []
        if config.syscall_tracing:
            calls = self.of_kind(SyscallTotals)
            parts.append(f"syscalls {sum(t.count for t in calls):,} "
                         f"({sum(t.errors for t in calls):,} failed)")
        if config.network_tracing:
            net = self.of_kind(NetworkTotals)
            parts.append(f"connections {self.connections:,} "
                         f"({human_bytes(sum(t.bytes_sent for t in net))} out, "
                         f"{human_bytes(sum(t.bytes_received for t in net))} in)")
        if config.memory_tracing:
            mem = self.of_kind(MemoryTotals)
            parts.append(f"page faults {sum(t.minor_faults + t.major_faults for t in mem):,}")
        if self.longest_stall is not None:
            culprit = self.longest_stall.culprit
            parts.append(f"loop stalls {self.stalls:,} (longest "
                         f"{self.longest_stall.stall.duration_ns / 1e6:,.0f} ms"
                         f"{' in ' + frame_label(culprit) if culprit else ''})")
        return ", ".join(parts)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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


def _and_descendants(n: int) -> str:
    return f" and {n} descendant{'s' * (n != 1)}" if n else ""


async def run_traced(config: EbpfConfig, exporters: list[Exporter], command: Sequence[str],
                     duration: float | None, show: Show | None = None,
                     shutdown_timeout: float = 15.0) -> Profiler:
    """Record ``command`` (started behind a gate), the config's pids, or every process.

    A target's descendants are recorded too: those alive now and those it
    forks later.  Ends on SIGINT/SIGTERM, after ``duration``, or when the
    command (or every pid given) has exited.
    """
    _log.info("event loop: %s", running_loop_name())
    gated: GatedCommand | None = await start_gated(command) if command else None
    named = [gated.pid] if gated else list(config.pids)
    targets = with_descendants(named)
    # Recording is the command's whole job: a machine that cannot is an error here.
    profiler = Profiler(config.with_pids(targets), exporters,
                        system_wide=not named, follow_children=True,
                        shutdown_timeout=shutdown_timeout, on_unavailable="raise",
                        standalone=True)
    what = (f"{command[0]} (pid {gated.pid})" if gated else
            f"pid {', '.join(map(str, named))}{_and_descendants(len(targets) - len(named))}"
            if named else "all processes")
    try:
        async with profiler:
            started = time.monotonic()
            if gated:
                gated.release()
            async with anyio.create_task_group() as tg:
                waits: list[Awaitable[object]] = [_until_signal()]
                if gated:
                    waits.append(gated.process.wait())
                elif named:
                    waits.append(_wait_for_exit(named))
                if duration is not None:
                    waits.append(anyio.sleep(duration))
                if show is not None:
                    tg.start_soon(show, profiler, started, what)
                await _stop_when_any(tg, *waits)
    finally:
        if gated is not None and gated.process.returncode is None:
            await gated.abort()
    return profiler


async def run_record(config: EbpfConfig, outputs: list[tuple[str, Path]],
                     otlp: OtlpExporter | None, command: Sequence[str],
                     duration: float | None, progress: bool,
                     tally: Tally | None = None) -> Profiler:
    """Record into the ``outputs`` files and ``otlp``; ``tally`` keeps the traced figures."""
    exporters: list[Exporter] = [FORMATS[fmt](path) for fmt, path in outputs]
    shutdown_timeout = 15.0
    if otlp is not None:
        exporters.append(otlp)
        shutdown_timeout = max(shutdown_timeout, otlp.flush_timeout_s + _SHUTDOWN_MARGIN_S)
    if tally is not None:
        exporters.append(tally)
    return await run_traced(config, exporters, command, duration,
                            _progress(tally) if progress else None, shutdown_timeout)


def target_options(f: F) -> F:
    """The options that choose what to record, shared by ``record`` and ``top``."""
    f = click.argument("command", nargs=-1, type=click.UNPROCESSED)(f)
    f = click.option("--env", type=str, help="Preset: production, staging, development or "
                     "debug. Default: $ENV, else production.")(f)
    f = click.option("-d", "--duration", type=float, help="Seconds to record. Default: until "
                     "Ctrl-C or until the targets exit.")(f)
    f = click.option("-p", "--pid", "pids", type=int, multiple=True,
                     help="Process to record, with its descendants (repeatable). "
                     "Default: every process.")(f)
    return f


def check_target(pids: Sequence[int], command: Sequence[str], duration: float | None) -> None:
    if duration is not None and duration <= 0:
        raise ConfigError(f"--duration: {duration:g} must be a positive number of seconds")
    if pids and command:
        raise ConfigError("give either --pid or a command, not both")


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
@click.option("-f", "--format", "fmt", type=click.Choice(sorted(FORMATS)),
              help="Output format. Default: from each -o name's extension.")
@click.option("-o", "--output", "paths", multiple=True, help="Output file (repeatable).")
@click.option("--otlp-endpoint", metavar="URL", help="Export OTLP to this collector. "
              "Default: $OTEL_EXPORTER_OTLP_ENDPOINT, if set.")
@click.option("--otlp-protocol", type=click.Choice(["grpc", "http/protobuf"]),
              help="OTLP protocol. Default: $OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf.")
def record(pids: tuple[int, ...], duration: float | None, env: str | None,
           command: tuple[str, ...], cpu: bool, syscalls: bool, network: bool, memory: bool,
           slow_syscall_ms: float | None, syscall_counts_only: bool, rate: int | None,
           max_samples: int | None, python_frames: str | None,
           stall_threshold_ms: float | None, fmt: str | None, paths: tuple[str, ...],
           otlp_endpoint: str | None,
           otlp_protocol: str | None) -> None:
    """Record --pid processes, COMMAND, or the whole system: CPU profile and traces.

    Profiles go to the -o files, and over OTLP when --otlp-endpoint or
    OTEL_EXPORTER_OTLP_ENDPOINT is set (then no file is written unless asked).
    Syscall, network and memory traces, and asyncio loop stalls, go to OTLP
    and otlp-json files.

    \b
    ebpf-stream record --pid 1234 --duration 10 -o app.svg
    ebpf-stream record --pid 1234 --stall-threshold 50 -o app.svg -o app.otlp.jsonl
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
    otlp = otlp_from_options(otlp_endpoint, otlp_protocol)
    outputs = outputs_from_options(fmt, paths, otlp is not None, cpu)
    if traces(config) and otlp is None and not any(f in _TRACE_FORMATS for f, _ in outputs):
        click.echo("note: only otlp-json files and OTLP hold the syscall, network and memory "
                   "traces; add -o trace.otlp.jsonl", err=True)
    progress = sys.stderr.isatty()
    tally = Tally()
    profiler = anyio.run(run_record, config, outputs, otlp, command, duration, progress, tally,
                         backend_options=backend_options())
    if progress:
        s = profiler.stats
        where = [str(p) for _, p in outputs]
        if otlp is not None:
            where.append(otlp.endpoints[Signal.PROFILES].display)
        traced = tally.describe(config)
        click.echo(f"{s.received:,} {counted_as(config)}, {s.dropped:,} dropped"
                   f"{'; ' + traced if traced else ''}; sent to {', '.join(where)}", err=True)
