"""The ``ebpf-stream`` command line.

Errors a user can fix are printed as one line and exit non-zero; tracebacks
are for bugs only.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import click

from .._base.errors import EbpfStreamError
from .agent import agent
from .demo import demo
from .doctor import doctor
from .record import record
from .top import top


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except EbpfStreamError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what the engine does.")
def cli(verbose: bool) -> None:
    """Continuous profiling with eBPF, streamed into OpenTelemetry."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )


cli.add_command(record)
cli.add_command(top)
cli.add_command(doctor)
cli.add_command(demo)
cli.add_command(agent)


def _tune_malloc() -> None:
    """Keep the command's heap compact; it owns its process, unlike the library.

    One malloc arena instead of one per worker thread, and large temporary
    buffers (kallsyms, ring batches) mmap'ed so that freeing returns them,
    together save several MB of resident memory.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_arena_max, m_mmap_threshold = -8, -3
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_threshold, 128 * 1024)


def main() -> None:
    _tune_malloc()
    try:
        cli.main(prog_name="ebpf-stream", standalone_mode=False)
    except click.UsageError as exc:
        # One line, like every other error; --help shows the usage.
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except (click.Abort, KeyboardInterrupt):  # interrupted before recording began
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
