"""``ebpf-stream top``: a live view of the busiest processes, endpoints, syscalls and
connections.

The view is an exporter: the engine hands it a batch every second, and it
redraws.  The kernel's totals are cumulative, so rates come from the
difference between successive snapshots of each counter.  On a terminal the
view redraws in place; elsewhere (a pipe, a file) each frame is printed.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import anyio
import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.rule import Rule
from rich.table import Table

from .._base.config import EbpfConfig
from .._base.errors import ConfigError
from .._model.batch import Batch
from .._model.events import (
    MemoryTotals,
    NetworkTotals,
    SyscallTotals,
    TcpConnection,
    Totals,
    endpoint,
    totals_key,
)
from .._outputs.base import ExportContext, Exporter
from .._profiler import Profiler
from .backend import backend_options
from .options import check_target, config_from_options, target_options, with_features
from .routes import RouteShares
from .runs import Show, human_bytes, run_traced

_ROWS = 10
_RECENT_CONNECTIONS = 10
_FRAME_WIDTH = 132  # when not on a terminal, which has no width of its own


@dataclass
class _ProcessRow:
    pid: int
    name: str = ""
    calls: float = 0.0  # per second, like every rate here
    errors: float = 0.0
    received: float = 0.0
    sent: float = 0.0
    faults: float = 0.0
    rss: int = 0
    cpu: float = 0.0  # share of one CPU


@dataclass
class _SyscallRow:
    name: str
    calls: float = 0.0
    errors: float = 0.0
    total: int = 0
    total_errors: int = 0
    buckets: list[int] = field(default_factory=list)  # this interval's latency histogram


def percentile_ns(buckets: Sequence[int], fraction: float) -> int | None:
    """The upper edge of the log2 bucket holding the ``fraction`` quantile, or None if empty.

    ``buckets[i]`` counts calls of ``[2**i, 2**(i+1))`` ns, so the answer
    is exact to within a factor of two, and never below the true value.
    """
    total = sum(buckets)
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank:
            return 1 << (i + 1)
    return 1 << len(buckets)


def human_duration(ns: float | None) -> str:
    if ns is None:
        return "-"
    for unit, scale in (("ns", 1), ("µs", 1e3), ("ms", 1e6)):
        if ns < 1000 * scale:
            return f"{ns / scale:.0f} {unit}"
    return f"{ns / 1e9:.1f} s"


class Rates:
    """Per-second rates of cumulative counters, from successive snapshots.

    A counter's rate is its growth since the snapshot before, over the time
    between the two; a counter new in a snapshot grew from zero since the
    previous snapshot of its kind (or since tracing began).  A kind of
    totals missing from a batch (its snapshot landed in the next one) keeps
    its previous rates rather than dropping to zero; a counter missing from
    a fresh snapshot (its process is gone) has none.
    """

    def __init__(self, started: float) -> None:
        self.latest: dict[tuple[str, int, str], Totals] = {}
        self._kind_seen_at: dict[str, float] = {}
        self._growth: dict[tuple[str, int, str], tuple[Totals | None, float]] = {}
        self._started = started

    def update(self, totals: Iterable[Totals], now: float) -> None:
        fresh = {totals_key(t): t for t in totals}
        kinds = {key[0] for key in fresh}
        for key in [k for k in self.latest if k[0] in kinds and k not in fresh]:
            del self.latest[key], self._growth[key]
        for key, t in fresh.items():
            since = self._kind_seen_at.get(key[0], self._started)
            self._growth[key] = (self.latest.get(key), now - since)
            self.latest[key] = t
        for kind in kinds:
            self._kind_seen_at[kind] = now

    def rate(self, totals: Totals, *fields: str) -> float:
        """How fast the sum of ``fields`` grew between this counter's last two snapshots."""
        before, elapsed = self._growth.get(totals_key(totals), (None, 0.0))
        if elapsed <= 0:
            return 0.0
        grown = sum(int(getattr(totals, f)) - (int(getattr(before, f)) if before else 0)
                    for f in fields)
        return max(0, grown) / elapsed

    def growth(self, totals: SyscallTotals) -> list[int]:
        """The latency buckets filled between this counter's last two snapshots."""
        before, _ = self._growth.get(totals_key(totals), (None, 0.0))
        if not isinstance(before, SyscallTotals):
            return list(totals.buckets)
        return [max(0, a - b) for a, b in zip(totals.buckets, before.buckets, strict=False)]


class TopView:
    """An exporter that shows each batch as tables of the top processes, syscalls and
    connections.

    Entered for the run (the engine enters exporters that are context
    managers), it keeps a ``rich.live.Live`` on a terminal; elsewhere each
    frame is printed in turn.
    """

    def __init__(self, config: EbpfConfig, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console(width=None if sys.stdout.isatty() else _FRAME_WIDTH)
        self.what = ""
        self.started = time.monotonic()
        self._rates = Rates(self.started)
        self._connections: collections.deque[TcpConnection] = collections.deque(
            maxlen=_RECENT_CONNECTIONS)
        self._connection_count = 0
        self._cpu: dict[int, float] = {}
        self._routes = RouteShares()  # the last batch's
        self._names: dict[int, str] = {}
        self._context: ExportContext | None = None
        self._live: Live | None = None

    def bind(self, context: ExportContext) -> None:
        self._context = context

    async def __aenter__(self) -> Self:
        if self.console.is_terminal:
            self._live = Live(console=self.console, auto_refresh=False, screen=False)
            self._live.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def watch(self) -> Show:
        """The task that names the target once the recording starts."""
        async def named(profiler: Profiler, started: float, what: str) -> None:
            self.what, self.started = what, started
            await anyio.sleep_forever()
        return named

    async def export(self, batch: Batch) -> None:
        self.take(batch, time.monotonic())
        frame = self.render()
        if self._live is not None:
            self._live.update(frame, refresh=True)
        else:
            self.console.print(frame)

    async def aclose(self) -> None:
        pass

    def take(self, batch: Batch, now: float) -> None:
        """Fold one batch into the view's state."""
        self._rates.update(batch.totals, now)
        for process in batch.profile.processes.values():
            self._names[process.pid] = process.name
        interval_ns = max(1, batch.profile.end_ns - batch.profile.start_ns)
        cpu: collections.Counter[int] = collections.Counter()
        for stack in batch.profile:
            cpu[stack.pid] += stack.count
        self._cpu = {pid: n * batch.profile.period_ns / interval_ns for pid, n in cpu.items()}
        self._routes = RouteShares()
        self._routes.add(batch.profile)
        for record in batch.records:
            if isinstance(record, TcpConnection):
                self._connections.appendleft(record)
                self._connection_count += 1

    # -- the tables ---------------------------------------------------------------

    def _processes(self) -> list[_ProcessRow]:
        rows: dict[int, _ProcessRow] = {}

        def row(pid: int, name: str) -> _ProcessRow:
            r = rows.setdefault(pid, _ProcessRow(pid, self._names.get(pid, "")))
            r.name = name or r.name
            return r

        rate = self._rates.rate
        for t in self._rates.latest.values():
            r = row(t.pid, t.comm)
            if isinstance(t, SyscallTotals):
                r.calls += rate(t, "count")
                r.errors += rate(t, "errors")
            elif isinstance(t, NetworkTotals):
                r.received += rate(t, "bytes_received")
                r.sent += rate(t, "bytes_sent")
            elif isinstance(t, MemoryTotals):
                r.faults += rate(t, "minor_faults", "major_faults")
                r.rss = t.rss_anon + t.rss_file + t.rss_shmem
        for pid, share in self._cpu.items():
            row(pid, "").cpu = share
        return sorted(rows.values(), key=lambda r: (r.cpu, r.calls, r.faults,
                                                    r.received + r.sent, r.rss), reverse=True)

    def _syscalls(self) -> list[_SyscallRow]:
        rows: dict[str, _SyscallRow] = {}
        for t in self._rates.latest.values():
            if not isinstance(t, SyscallTotals):
                continue
            r = rows.setdefault(t.syscall, _SyscallRow(t.syscall))
            r.calls += self._rates.rate(t, "count")
            r.errors += self._rates.rate(t, "errors")
            r.total += t.count
            r.total_errors += t.errors
            growth = self._rates.growth(t)
            r.buckets = [a + b for a, b in
                         zip(r.buckets or [0] * len(growth), growth, strict=False)]
        return sorted(rows.values(), key=lambda r: (r.calls, r.total), reverse=True)

    def _header(self) -> str:
        stats = self._context.stats if self._context else None
        dropped = f"  dropped {stats.dropped:,}" if stats else ""
        return (f"ebpf-stream top  {self.what}  {time.monotonic() - self.started:.0f}s  "
                f"connections closed {self._connection_count:,}{dropped}")

    def render(self) -> RenderableType:
        """One frame: the header, then a table per feature switched on."""
        parts: list[RenderableType] = [Rule(self._header(), align="left")]
        processes = Table(title="processes", title_justify="left", expand=False)
        columns = [("PID", True), ("COMMAND", False)]
        if self.config.cpu_profiling:
            columns.append(("CPU%", True))
        if self.config.syscall_tracing:
            columns += [("SYSCALLS/s", True), ("ERRORS/s", True)]
        if self.config.network_tracing:
            columns += [("RECV/s", True), ("SENT/s", True)]
        if self.config.memory_tracing:
            columns += [("FAULTS/s", True), ("RSS", True)]
        for name, numeric in columns:
            processes.add_column(name, justify="right" if numeric else "left")
        for p in self._processes()[:_ROWS]:
            cells = [str(p.pid), p.name]
            if self.config.cpu_profiling:
                cells.append(f"{100 * p.cpu:.1f}")
            if self.config.syscall_tracing:
                cells += [f"{p.calls:,.0f}", f"{p.errors:,.0f}"]
            if self.config.network_tracing:
                cells += [human_bytes(p.received), human_bytes(p.sent)]
            if self.config.memory_tracing:
                cells += [f"{p.faults:,.0f}", human_bytes(p.rss) if p.rss else "-"]
            processes.add_row(*cells)
        parts.append(processes)
        routes = self._routes.table()
        if routes is not None:
            parts.append(routes)
        if self.config.syscall_tracing:
            parts.append(self._syscall_table())
        if self.config.network_tracing:
            parts.append(self._connection_table())
        return Group(*parts)

    def _syscall_table(self) -> Table:
        table = Table(title="syscalls", title_justify="left")
        for name in ("SYSCALL", "CALLS/s", "ERRORS/s", "CALLS", "ERRORS", "p50", "p99"):
            table.add_column(name, justify="left" if name == "SYSCALL" else "right")
        for s in self._syscalls()[:_ROWS]:
            table.add_row(s.name, f"{s.calls:,.0f}", f"{s.errors:,.0f}", f"{s.total:,}",
                          f"{s.total_errors:,}", human_duration(percentile_ns(s.buckets, 0.5)),
                          human_duration(percentile_ns(s.buckets, 0.99)))
        return table

    def _connection_table(self) -> Table:
        table = Table(title="recent connections (closed)", title_justify="left")
        for name in ("PID", "COMMAND", "ROLE", "LOCAL", "PEER", "SENT", "RECV", "TIME",
                     "OUTCOME"):
            table.add_column(name, justify="right" if name in ("PID", "SENT", "RECV", "TIME")
                             else "left")
        for c in self._connections:
            table.add_row(str(c.pid), c.comm, c.role, endpoint(c.local_address, c.local_port),
                          endpoint(c.peer_address, c.peer_port), human_bytes(c.bytes_sent),
                          human_bytes(c.bytes_received), human_duration(c.end_ns - c.start_ns),
                          c.outcome)
        return table



@click.command(context_settings={"ignore_unknown_options": False})
@target_options
@click.option("--cpu", is_flag=True, help="Also sample CPU (off by default).")
@click.option("--syscalls/--no-syscalls", default=True, help="Syscall counts and latency.")
@click.option("--network/--no-network", default=True, help="TCP connections and bytes.")
@click.option("--memory/--no-memory", default=True, help="Page faults and RSS.")
def top(pids: tuple[int, ...], duration: float | None, env: str | None,
        command: tuple[str, ...], cpu: bool, syscalls: bool, network: bool,
        memory: bool) -> None:
    """Show the busiest processes, endpoints (with --cpu), syscalls and connections, every second.

    \b
    ebpf-stream top                       # every process
    ebpf-stream top --pid 1234 --cpu      # one process and its descendants, with CPU
    ebpf-stream top -- ./server --port 8080
    """
    check_target(pids, command, duration)
    if not (cpu or syscalls or network or memory):
        raise ConfigError("nothing to show: keep one of --syscalls, --network, --memory "
                          "or add --cpu")
    config = with_features(config_from_options(env, None, None, pids), cpu=cpu,
                           syscalls=syscalls, network=network, memory=memory,
                           slow_syscall_ms=None).with_export_interval(1.0)
    view = TopView(config)
    exporters: list[Exporter] = [view]
    anyio.run(run_traced, config, exporters, command, duration, view.watch(),
              backend_options=backend_options())

