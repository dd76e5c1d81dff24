"""The asynchronous entry point, ``Profiler`` (``_sync`` runs it for synchronous code).

``Profiler`` wires the stages (probe readers -> events channel -> symbolize
and batch -> batches channel -> exporters; see ``_pipeline``) as tasks in
the caller's event loop.  A failing stage never cancels the host's code:
the failure is logged, the pipeline winds down, and the error is raised
when the ``async with`` block exits.
Shutdown always runs shielded and within a deadline, and the kernel side is
detached whatever happened.

A machine that cannot run BPF (no privileges, no headers, a kernel that
refuses a program) is the host's environment, not its bug: by default the
profiler says so in one warning and the host runs on unprofiled, so that a
profiler never takes a service down.  A configuration mistake is the
caller's to fix, and is raised at once.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, get_args

import anyio
from anyio.abc import TaskGroup

from ._base.config import EbpfConfig, validate_config
from ._base.errors import (
    ConfigError,
    EbpfStreamError,
    EnvironmentCheckError,
    ExportError,
    ProbeError,
    TargetError,
)
from ._base.overhead import (
    CpuMeter,
    Overhead,
    OverheadMonitor,
    Resident,
    bind_meter,
    release_freed_memory,
    run_sync,
)
from ._base.stats import Stats
from ._context.publisher import publish
from ._fallback import open_fallback
from ._outputs.base import ExportContext, Exporter
from ._outputs.defaults import exporters_from_environment
from ._pipeline.channels import Channel
from ._pipeline.reading import open_probes
from ._probes import probes_for

if TYPE_CHECKING:
    from ._model.batch import Batch
    from ._pipeline.reading import Readers
    from ._probes.base import Probe

log = logging.getLogger("ebpf_stream")

Mode = Literal["starting", "bpf", "fallback", "off"]
"""How a run profiles: still starting in the background, with BPF probes, with the
in-process sampler (the environment refused BPF), or not at all."""
OnUnavailable = Literal["fallback", "off", "raise"]
"""What a start does when the environment refuses BPF: sample in-process, run
unprofiled, or raise."""


def _import_pipeline(config: EbpfConfig) -> None:
    """Import what a run of ``config`` needs: the tracers (and numpy) only if switched on."""
    families = {"cpu": config.cpu_profiling, "syscalls": config.syscall_tracing,
                "network": config.network_tracing, "memory": config.memory_tracing}
    names = ["._pipeline.stages", "._symbols", "._outputs.fanout",
             *(f"._probes.{family}" for family, enabled in families.items() if enabled)]
    for name in names:
        importlib.import_module(name, __package__)


def check_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        if not os.path.exists(f"/proc/{pid}"):
            raise TargetError(f"pid {pid}: no such process")


class Profiler:
    """Profile and trace while the ``async with`` block runs; export every interval and at exit.

    The config's features choose the probes: CPU profiling, syscall,
    network and memory tracing, each its own kernel program feeding the
    same channel, batch stage and exporters.

    With no ``pids`` in the config the target is the host process itself;
    ``system_wide=True`` samples every process instead.  ``follow_children``
    also samples the targets' descendants from their fork on.

    With no ``exporters`` and ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its
    profiles form) set, the profiler exports OTLP as that environment says.

    When the environment does not allow BPF (privileges, capabilities,
    kernel, headers, tracefs, a program the kernel refuses), entering logs
    one warning naming the problem and its fix, and the run falls back to
    sampling its own process from a thread: ``mode`` is ``"fallback"``,
    ``unavailable`` holds the reason, and the outputs are those of BPF mode
    with Python frames only (no native or kernel frames; stalls still
    reported).  Syscall, network and memory tracing need BPF and are off in
    that mode, and so is a run that targets other processes.  With
    ``on_unavailable="off"`` the block runs unprofiled instead (``mode`` is
    ``"off"``, nothing is exported); with ``on_unavailable="raise"`` the
    reason is raised (an ``EnvironmentCheckError`` or ``ProbeError``).  Configuration mistakes
    (``ConfigError``) and missing targets (``TargetError``) are always raised.

    With ``start_in_background=True`` entering returns at once (``mode`` is
    ``"starting"``) and the probes load in a task of the run, so a service
    serves meanwhile; ``wait_started()`` waits for the start.  A refusal that
    ``on_unavailable="raise"`` asks for is then logged when it happens and
    raised when the block exits.

    ``standalone=True`` says the profiler is its process's whole job (as in
    ``ebpf-stream record``): ``get_overhead()`` then counts all of the
    process's memory, not only what the run adds.

    A profiler may run again once it has stopped: each run starts with
    fresh counters, overhead and exporters' state (see ``Exporter``), and
    knows nothing of an earlier run's failure.  Entering one that is
    running raises ``RuntimeError``.
    """

    def __init__(
        self,
        config: EbpfConfig | None = None,
        exporters: Sequence[Exporter] = (),
        *,
        system_wide: bool = False,
        follow_children: bool = False,
        shutdown_timeout: float = 15.0,
        on_unavailable: OnUnavailable = "fallback",
        start_in_background: bool = False,
        standalone: bool = False,
    ) -> None:
        if on_unavailable not in get_args(OnUnavailable):
            raise ConfigError(f"on_unavailable: {on_unavailable!r} is not one of "
                              f"{', '.join(get_args(OnUnavailable))}")
        self.config = config or EbpfConfig()
        self.on_unavailable = on_unavailable
        self._exporters = list(exporters)
        self._system_wide = system_wide
        self._follow = follow_children
        self._shutdown_timeout = shutdown_timeout
        self._background = start_in_background
        self._standalone = standalone
        self._host_loop = True  # entered on the host's event loop, whose stalls count
        self._running = False
        self._new_run()

    def _new_run(self) -> None:
        """The state of one run, as it is before the run starts."""
        self._stats = Stats()
        self._meter = CpuMeter()
        self._run_exporters: list[Exporter] = []
        self._probes: list[Probe] = []
        self._readers: Readers | None = None
        self._monitor: OverheadMonitor | None = None
        self._final_overhead: Overhead | None = None
        self._task_group: TaskGroup | None = None
        self._stopping = False
        self._scopes: list[anyio.CancelScope] = []
        self._deadline = math.inf  # for the shutdown, set when the run exits
        self._failure: Exception | None = None
        self._mode: Mode = "off"
        self._unavailable: EbpfStreamError | None = None
        self._opening: anyio.CancelScope | None = None  # a background start under way
        self._started: anyio.Event | None = None  # set when the run's start has ended
        self._baseline = Resident()  # before the run loaded anything

    @property
    def mode(self) -> Mode:
        """How the current (or last) run profiles: ``"bpf"``; ``"fallback"`` or
        ``"off"`` when the environment refused BPF (``"off"`` also before the
        first run); ``"starting"`` while a background start is under way."""
        return self._mode

    async def wait_started(self) -> Mode:
        """Wait until the run's start has ended, however it ended; return ``mode``.

        Returns at once after a foreground start, which ends before
        ``async with`` enters its block.
        """
        if self._started is not None:
            await self._started.wait()
        return self._mode

    @property
    def unavailable(self) -> EbpfStreamError | None:
        """Why the current (or last) run does not profile, None when it does."""
        return self._unavailable

    @property
    def stats(self) -> Stats:
        """A snapshot of the received, dropped and exported counters."""
        self._read_kernel_drops()
        return self._stats.snapshot()

    def _read_kernel_drops(self) -> None:
        """Bring ``dropped_kernel`` up to date: the kernel counts it, not a stage."""
        if self._probes:
            self._stats.dropped_kernel = sum(probe.kernel_drops() for probe in self._probes)

    def get_overhead(self) -> Overhead:
        """Measured CPU and memory cost since start (see ``Overhead``)."""
        if self._monitor is not None:
            overhead = self._monitor.measure()
        elif self._final_overhead is not None:
            overhead = self._final_overhead
        else:
            overhead = Overhead(0.0, 0)
        return dataclasses.replace(overhead, mode=self._mode)

    def _targets(self) -> list[int] | None:
        if self.config.pids:
            return list(self.config.pids)
        return None if self._system_wide else [os.getpid()]

    async def __aenter__(self) -> Self:
        if self._running:
            raise RuntimeError("this Profiler is already running; "
                               "make another one to profile alongside it")
        config = self.config
        validate_config(config)
        check_pids(config.pids)
        publish()  # this process's requests, for its samples to name
        self._new_run()
        self._run_exporters = list(self._exporters) or exporters_from_environment()
        self._running = True
        started = self._started = anyio.Event()
        self._baseline = Resident.now()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        if self._background:
            self._mode = "starting"
            self._task_group.start_soon(self._start_in_background, config)
            return self
        try:
            await self._start_run(config)
        except BaseException:
            self._close_kernel_side()
            await self._task_group.__aexit__(None, None, None)
            self._task_group = None
            self._running = False
            raise
        started.set()
        return self

    async def _start_in_background(self, config: EbpfConfig) -> None:
        """``_start_run`` as a task of the run, so that entering returns at once.

        Shielded from the host's cancellation, like the pipeline: only the
        run's exit stops it.  A failure the caller asked to have raised is
        logged now and raised when the block exits.
        """
        with anyio.CancelScope(shield=True) as self._opening:
            if self._stopping:
                self._opening.cancel()
            try:
                await self._start_run(config)
            except Exception as exc:
                log.error("ebpf-stream: profiling did not start: %s", exc)
                self._failure = exc
                self._close_kernel_side()
            finally:
                if self._mode == "starting":  # refused, failed, or cancelled by the run's exit
                    self._mode = "off"
                if self._started is not None:
                    self._started.set()
        self._opening = None

    async def _start_run(self, config: EbpfConfig) -> None:
        """Open the probes, then start the pipeline's tasks in the run's task group."""
        # Loaded at start, not at import, since they pull in the symbolizer
        # (and the tracers numpy); and in a worker thread, so that the host's
        # loop (a service finishing its own start, say) keeps running meanwhile.
        await anyio.to_thread.run_sync(_import_pipeline, self.config)
        from ._pipeline.stages import Stages
        from ._symbols import Symbolizer

        probes = probes_for(config, self._stats, targets=self._targets(),
                            follow_children=self._follow)
        # Parsed as the probes open, not once they sample: the kernel's stack
        # maps fill from the first sample until a reader turns their generation.
        symbolizer = Symbolizer()
        try:
            await open_probes(probes, meanwhile=symbolizer.load_kernel_symbols)
            self._probes = probes
            mode: Mode = "bpf"
        except (EnvironmentCheckError, ProbeError) as exc:
            if self.on_unavailable == "raise":
                raise
            self._unavailable = exc
            if (self.on_unavailable != "fallback" or not config.cpu_profiling
                    or self._targets() != [os.getpid()]):
                log.warning("ebpf-stream: profiling is off: %s", exc)
                return
            self._probes = [await open_fallback(config, exc, self._stats, self._meter,
                                                watch_loop=self._host_loop)]
            mode = "fallback"
            symbolizer = Symbolizer()  # no kernel stacks: the table would only take memory
            config = config.with_python_frames("python")  # its samples have no native stacks
        from ._bpf.syscalls import enable_run_time_stats, fdinfo  # with the run, not the import

        self._monitor = OverheadMonitor(
            self._meter, lambda: [fd for p in self._probes for fd in p.program_fds()],
            lambda: [fd for p in self._probes for fd in p.map_fds()],
            fdinfo, enable_run_time_stats,
            whole_process=self._standalone, baseline=self._baseline)
        stages = Stages(config, self._probes, symbolizer, self._stats, self._count_drop,
                        native_stacks=mode == "bpf")
        self._readers = stages.readers
        if self._stopping:  # the run is exiting already: the readers only drain
            self._readers.stop()
            self._readers.set_deadline(self._deadline)
        for task in stages.tasks():
            self._start(task)
        self._start(self._export, stages.batches, mode)
        self._mode = mode
        await anyio.to_thread.run_sync(release_freed_memory)

    def _stop_reading(self) -> None:
        self._stopping = True
        if self._opening is not None:
            self._opening.cancel()
        if self._readers is not None:
            self._readers.stop()

    def _count_drop(self, samples: int) -> None:
        self._stats.dropped_user += samples

    def _start(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        assert self._task_group is not None

        # Shielded: cancelling the host's code must not cut the pipeline off
        # mid-flush; the pipeline stops through ``_stop_reading`` and its deadline.
        async def guarded() -> None:
            bind_meter(self._meter)
            with anyio.CancelScope(shield=True) as scope:
                self._scopes.append(scope)
                try:
                    await self._meter.run(fn(*args))
                except Exception as exc:
                    if not isinstance(exc, ExportError):  # exporters fail at the end: raised then
                        log.error("profiling stopped: %s", exc)
                    if self._failure is None:
                        self._failure = exc
                    self._stop_reading()

        self._task_group.start_soon(guarded)

    async def _export(self, batches: Channel[Batch], mode: str) -> None:
        from ._outputs.fanout import FanOut

        context = ExportContext(self.config, self._stats, self.get_overhead, mode)
        async with FanOut(self._run_exporters, self._stats, context) as fanout:
            async for batch in batches:
                self._read_kernel_drops()  # for the counters sent with the batch
                await fanout.export(batch)
                # What rendering and converting the batch freed goes back to the
                # system, not into the host's resident memory.
                await run_sync(release_freed_memory)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._deadline = anyio.current_time() + self._shutdown_timeout
            for scope in self._scopes:
                scope.deadline = self._deadline
            if self._readers is not None:
                self._readers.set_deadline(self._deadline)
            self._stop_reading()
            if self._task_group is not None:
                await self._task_group.__aexit__(None, None, None)
            if any(scope.cancelled_caught for scope in self._scopes):
                # Whatever was still queued is lost: count it, never lose it silently.
                s = self._stats
                unexported = s.received - s.exported - s.dropped_user
                s.dropped_user += unexported
                log.error("profiling shutdown exceeded %.0fs; %d samples were not exported",
                          self._shutdown_timeout, unexported)
        finally:
            self._close_kernel_side()
            self._running = False
        if exc_type is None and self._failure is not None:
            raise self._failure

    def _close_kernel_side(self) -> None:
        self._read_kernel_drops()
        if self._monitor is not None:
            self._final_overhead = self._monitor.measure()
            self._monitor.close()
            self._monitor = None
        for probe in self._probes:
            probe.close()
        self._probes = []


def map_usage(profiler: Profiler) -> dict[str, tuple[int, int]]:
    """``{name: (entries, max_entries)}`` of the running probes' hash-type BPF maps.

    For a health report (``ebpf-stream agent``): a map at its maximum loses
    what comes next.  Empty when no probe is open.  Walks every key, so call
    it from a worker thread.
    """
    from ._bpf.syscalls import hash_map_usage  # with the run, not the import

    return hash_map_usage(fd for probe in profiler._probes for fd in probe.map_fds())
