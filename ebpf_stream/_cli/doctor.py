"""``ebpf-stream doctor``: every environment check, with its fix."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from .._loader import environment_checks


@click.command()
def doctor() -> None:
    """Check that this machine can run the profiler, and say how to fix what is missing."""
    checks = environment_checks()
    table = Table(show_header=True, header_style="bold")
    for column in ("check", "result", "detail", "fix"):
        table.add_column(column)
    for c in checks:
        table.add_row(c.name, "[green]pass[/]" if c.ok else "[red]FAIL[/]", c.detail, c.fix)
    Console(soft_wrap=True).print(table)
    if not all(c.ok for c in checks):
        raise SystemExit(1)
