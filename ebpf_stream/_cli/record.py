"""``ebpf-stream record``: profile processes, a command, or the whole system, into files."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path

import anyio
import click
from anyio.abc import TaskGroup
from rich.console import Console
from rich.live import Live
from rich.text import Text

from .._config import EbpfConfig, Environment, sample_rate_range
from .._errors import ConfigError
from .._exporters.base import Exporter
from .._exporters.formats import FORMATS, format_for_path
from .._exporters.otlp.exporter import OtlpExporter
from .._otlp.settings import Signal, endpoint_in_environment
from .._profiler import Profiler
from .launch import GatedCommand, start_gated

_DEFAULT_NAME = {"folded": "profile.folded", "pprof": "profile.pb.gz",
                 "speedscope": "profile.speedscope.json", "svg": "profile.svg",
                 "otlp-json": "profile.otlp.jsonl"}
_SHUTDOWN_MARGIN_S = 5.0  # beyond the OTLP flush timeout, for the last batch's conversion


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


def outputs_from_options(fmt: str | None, paths: Sequence[str],
                         otlp: bool = False) -> list[tuple[str, Path]]:
    """The files to write; none by default when the run exports OTLP."""
    if not paths and otlp and fmt is None:
        return []
    if not paths:
        name = _DEFAULT_NAME[fmt or "folded"]
        return [(fmt or "folded", Path(name))]
    outputs = []
    for p in paths:
        chosen = fmt or format_for_path(p)
        if chosen is None:
            raise ConfigError(f"-o {p}: cannot tell the format from the name; pass --format")
        outputs.append((chosen, Path(p)))
    return outputs


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


async def _show_progress(profiler: Profiler, started: float, what: str) -> None:
    console = Console(stderr=True)
    with Live(console=console, transient=True, refresh_per_second=4) as live:
        while True:
            s = profiler.stats
            live.update(Text.assemble(
                ("● recording ", "bold red"), f"{what}  ",
                (f"{time.monotonic() - started:6.1f}s", "bold"),
                f"  samples {s.received:,}  dropped {s.dropped:,}",
            ))
            await anyio.sleep(0.25)


async def _stop_when_any(tg: TaskGroup, *waits: Awaitable[object]) -> None:
    stop = anyio.Event()

    async def run(wait: Awaitable[object]) -> None:
        await wait
        stop.set()

    for w in waits:
        tg.start_soon(run, w)
    await stop.wait()
    tg.cancel_scope.cancel()


def otlp_from_options(endpoint: str | None, protocol: str | None) -> OtlpExporter | None:
    """The OTLP exporter the options and ``OTEL_*`` variables ask for, if any."""
    if endpoint is None and not endpoint_in_environment():
        if protocol is not None:
            raise ConfigError("--otlp-protocol: needs --otlp-endpoint or "
                              "OTEL_EXPORTER_OTLP_ENDPOINT")
        return None
    return OtlpExporter(endpoint, protocol=protocol, source="--otlp-endpoint")


async def run_record(config: EbpfConfig, outputs: list[tuple[str, Path]],
                     otlp: OtlpExporter | None, command: Sequence[str],
                     duration: float | None, progress: bool) -> Profiler:
    exporters: list[Exporter] = [FORMATS[fmt](path) for fmt, path in outputs]
    shutdown_timeout = 15.0
    if otlp is not None:
        exporters.append(otlp)
        shutdown_timeout = max(shutdown_timeout, otlp.flush_timeout_s + _SHUTDOWN_MARGIN_S)
    gated: GatedCommand | None = await start_gated(command) if command else None
    targets = [gated.pid] if gated else list(config.pids)
    profiler = Profiler(config.with_pids(targets), exporters,
                        system_wide=not targets, follow_children=gated is not None,
                        shutdown_timeout=shutdown_timeout)
    profiler._standalone = True
    what = (f"{command[0]} (pid {gated.pid})" if gated else
            f"pid {', '.join(map(str, targets))}" if targets else "all processes")
    try:
        async with profiler:
            started = time.monotonic()
            if gated:
                gated.release()
            async with anyio.create_task_group() as tg:
                waits: list[Awaitable[object]] = [_until_signal()]
                if gated:
                    waits.append(gated.process.wait())
                elif targets:
                    waits.append(_wait_for_exit(targets))
                if duration is not None:
                    waits.append(anyio.sleep(duration))
                if progress:
                    tg.start_soon(_show_progress, profiler, started, what)
                await _stop_when_any(tg, *waits)
    finally:
        if gated is not None and gated.process.returncode is None:
            await gated.abort()
    return profiler


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("-p", "--pid", "pids", type=int, multiple=True,
              help="Process to profile (repeatable). Default: every process.")
@click.option("-d", "--duration", type=float, help="Seconds to record. Default: until Ctrl-C "
              "or until the targets exit.")
@click.option("-r", "--rate", type=int, help="Samples per second per CPU.")
@click.option("--env", type=str, help="Preset: production, staging, development or debug. "
              "Default: $ENV, else production.")
@click.option("--max-samples", type=int, help="Most samples kept per export interval.")
@click.option("-f", "--format", "fmt", type=click.Choice(sorted(FORMATS)),
              help="Output format. Default: from each -o name's extension.")
@click.option("-o", "--output", "paths", multiple=True, help="Output file (repeatable).")
@click.option("--otlp-endpoint", metavar="URL", help="Export OTLP to this collector. "
              "Default: $OTEL_EXPORTER_OTLP_ENDPOINT, if set.")
@click.option("--otlp-protocol", type=click.Choice(["grpc", "http/protobuf"]),
              help="OTLP protocol. Default: $OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def record(pids: tuple[int, ...], duration: float | None, rate: int | None, env: str | None,
           max_samples: int | None, fmt: str | None, paths: tuple[str, ...],
           otlp_endpoint: str | None, otlp_protocol: str | None,
           command: tuple[str, ...]) -> None:
    """Record a CPU profile of --pid processes, of COMMAND, or of the whole system.

    Profiles go to the -o files, and over OTLP when --otlp-endpoint or
    OTEL_EXPORTER_OTLP_ENDPOINT is set (then no file is written unless asked).

    \b
    ebpf-stream record --pid 1234 --duration 10 -o app.svg
    ebpf-stream record -o build.folded -- make -j2
    ebpf-stream record --pid 1234 --otlp-endpoint http://collector:4317 --otlp-protocol grpc
    """
    if duration is not None and duration <= 0:
        raise ConfigError(f"--duration: {duration:g} must be a positive number of seconds")
    if pids and command:
        raise ConfigError("give either --pid or a command, not both")
    config = config_from_options(env, rate, max_samples, pids)
    otlp = otlp_from_options(otlp_endpoint, otlp_protocol)
    outputs = outputs_from_options(fmt, paths, otlp is not None)
    progress = sys.stderr.isatty()
    profiler = anyio.run(run_record, config, outputs, otlp, command, duration, progress,
                         backend_options={"use_uvloop": True})
    if progress:
        s = profiler.stats
        where = [str(p) for _, p in outputs]
        if otlp is not None:
            where.append(otlp.endpoints[Signal.PROFILES].display)
        click.echo(f"{s.received:,} samples, {s.dropped:,} dropped; sent to {', '.join(where)}",
                   err=True)
