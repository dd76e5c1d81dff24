"""Running a recording command: its targets, the profiler, and when it stops."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .._base.config import EbpfConfig
from .._outputs.base import Exporter
from .._profiler import Profiler
from .backend import running_loop_name
from .launch import GatedCommand, start_gated

_log = logging.getLogger(__name__)


# Runs beside the recording: (profiler, monotonic start, what is recorded).
Show = Callable[[Profiler, float, str], Coroutine[Any, Any, None]]


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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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

