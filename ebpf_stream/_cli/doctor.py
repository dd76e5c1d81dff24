"""``ebpf-stream doctor``: every environment check, with its fix.

The checks run as the user who runs the command, with its capabilities, so
running it the way the service runs (same user, same container) shows what
the service will meet.  A check that cannot look at something fails; the
command itself never does.
"""

from __future__ import annotations

import os

import click
from rich.console import Console
from rich.table import Table

from .._bpf.environment import environment_checks, held_capabilities


@click.command()
def doctor() -> None:
    """Check that this machine can run the profiler, and say how to fix what is missing."""
    checks = environment_checks()
    console = Console(soft_wrap=True)
    held = held_capabilities()
    console.print(f"checked as uid {os.geteuid()}, holding "
                  f"{', '.join(held) if held else 'none of CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN'}")
    table = Table(show_header=True, header_style="bold")
    for column in ("check", "result", "detail", "fix"):
        table.add_column(column)
    for c in checks:
        table.add_row(c.name, "[green]pass[/]" if c.ok else "[red]FAIL[/]", c.detail, c.fix)
    console.print(table)
    if not all(c.ok for c in checks):
        console.print("a profiler started this way runs in fallback mode: it samples its own "
                      "process in-process, with Python frames only, and traces nothing")
        raise SystemExit(1)
    console.print("a profiler started this way runs in bpf mode")
