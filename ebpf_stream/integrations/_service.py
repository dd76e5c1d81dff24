"""A service's own profiler: built from its settings, started without delaying it,
stopped without failing it.

The rules a service needs, whatever its framework:

- It serves at once: the probes come up in the background
  (``start_in_background``), and a machine that cannot run BPF costs one
  warning line, never the service.
- A configuration mistake stops it at startup, with one line: a bad value,
  a malformed endpoint, an output directory that is missing or read-only.
- Its shutdown always completes: whatever the profiler's exit raises (an
  exporter that failed, a collector that never answered) is one warning line.
- Several processes never write one file (see ``_claims``): a path claimed
  by another live process is written under this process's own name instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Unpack

from .._base.errors import ConfigError, EbpfStreamError
from .._context.publisher import publish
from .._outputs.base import Exporter
from .._profiler import Profiler
from ._claims import Claim, claim, holder
from ._settings import ProfilingOptions, Settings, read_settings

log = logging.getLogger("ebpf_stream")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, EbpfStreamError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def per_process_path(path: Path, pid: int) -> Path:
    """``path`` with ``pid`` before its format's suffix: ``cpu.pb.gz`` -> ``cpu.4242.pb.gz``."""
    from .._outputs.formats import format_suffix

    name = path.name
    stem = name[: len(name) - len(format_suffix(name))]
    return path.with_name(f"{stem}.{pid}{name[len(stem):]}")


class ServiceProfiling:
    """Profile this process for as long as the service runs, as its settings say.

    ``async with ServiceProfiling(**options) as profiler:`` around the
    service's life (the framework helpers do this in its lifespan).
    Settings come from the ``EBPF_STREAM_*`` and ``OTEL_*`` variables,
    overridden by ``options`` (see ``ProfilingOptions``).  Unless disabled,
    entering publishes which request each task runs, for this profiler or
    one outside the process (``ebpf-stream record --pid``).  Entering returns
    at once with the running ``Profiler`` (its ``mode`` is ``"starting"``
    until the probes are up), or None when nothing says where profiles go
    or profiling is disabled (one info line says which).

    Entering raises ``ConfigError``, naming the variable or argument, for a
    malformed value or an output that cannot be written.  Exiting never
    raises an ``Exception``: a failure of the profiler's exit is logged as
    one warning line.  With ``on_unavailable="raise"`` the start is waited
    for, and a machine that cannot run BPF raises on entering instead.
    """

    def __init__(self, **options: Unpack[ProfilingOptions]) -> None:
        self._options = options
        self._profiler: Profiler | None = None
        self._claims: list[Claim] = []
        self._running = False

    @property
    def profiler(self) -> Profiler | None:
        """The current (or last) run's profiler; None when it did not profile."""
        return self._profiler

    async def __aenter__(self) -> Profiler | None:
        if self._running:
            raise RuntimeError("this ServiceProfiling is already running")
        self._profiler = None
        settings = read_settings(self._options)
        if settings.publish:
            publish()
        if settings.off is not None:
            log.info("ebpf-stream: %s", settings.off)
            return None
        if settings.ignored:
            log.info("ebpf-stream: the code overrides %s", ", ".join(settings.ignored))
        try:
            exporters = self._exporters(settings)
            if not exporters:
                log.warning("ebpf-stream: profiling is off: every output is written by "
                            "another process")
                self._release()
                return None
            profiler = Profiler(settings.config, exporters,
                                on_unavailable=settings.on_unavailable,
                                start_in_background=settings.on_unavailable != "raise")
            await profiler.__aenter__()
        except BaseException:
            self._release()
            raise
        self._profiler = profiler
        self._running = True
        log.info("ebpf-stream: profiling pid %d at %d Hz into %s", os.getpid(),
                 settings.config.sample_rate_hz, ", ".join(_describe(e) for e in exporters))
        return profiler

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        profiler = self._profiler if self._running else None
        self._running = False
        try:
            if profiler is not None:
                await profiler.__aexit__(exc_type, exc, tb)
        except Exception as failure:
            # The service is shutting down cleanly: this must not turn it into a failure.
            log.warning("ebpf-stream: profiling ended with an error: %s", _one_line(failure))
        finally:
            self._release()

    def _release(self) -> None:
        claims, self._claims = self._claims, []
        for taken in claims:
            taken.release()

    def _exporters(self, settings: Settings) -> list[Exporter]:
        """The run's exporters: the files claimed for this process, the code's, then OTLP."""
        from .._outputs.files import writable_path
        from .._outputs.formats import FORMATS

        exporters: list[Exporter] = []
        pid = os.getpid()
        for output in settings.outputs:
            try:
                path = self._claim(writable_path(output.path.replace("{pid}", str(pid))), pid,
                                   settings.source)
                if path is not None:
                    exporters.append(FORMATS[output.format](path))
            except ConfigError as exc:
                raise ConfigError(f"{settings.source}: {exc}") from None
        for exporter in settings.exporters:
            path = getattr(exporter, "path", None)
            if isinstance(path, Path):
                taken = claim(path)
                if taken is None:
                    log.warning("ebpf-stream: %s is written by %s; this process (pid %d) leaves "
                                "its %s out (name files with outputs= or EBPF_STREAM_OUTPUT "
                                "for one per process)", path, _holder(path), pid,
                                type(exporter).__name__)
                    continue
                self._claims.append(taken)
            exporters.append(exporter)
        if settings.otlp:
            from .._outputs.otlp.exporter import OtlpExporter

            exporters.append(OtlpExporter(environ=self._options.get("environ")))
        return exporters

    def _claim(self, path: Path, pid: int, source: str) -> Path | None:
        """``path``, or this process's own name for it when another process writes it."""
        taken = claim(path)
        if taken is None:
            mine = per_process_path(path, pid)
            taken = claim(mine)
            if taken is None:
                log.warning("ebpf-stream: %s and %s are written by other processes; this "
                            "process (pid %d) leaves them out", path, mine, pid)
                return None
            log.warning("ebpf-stream: %s is written by %s; this process (pid %d) writes %s "
                        "(put {pid} in %s to name each process's file)",
                        path, _holder(path), pid, mine, source)
        self._claims.append(taken)
        return taken.path


def _holder(path: Path) -> str:
    pid = holder(path)
    return "another process" if pid is None else f"pid {pid}"


def _describe(exporter: Exporter) -> str:
    path = getattr(exporter, "path", None)
    if isinstance(path, Path):
        return str(path)
    endpoints = getattr(exporter, "endpoints", None)
    if isinstance(endpoints, dict) and endpoints:
        return f"OTLP {next(iter(endpoints.values())).display}"
    return type(exporter).__name__
