"""``ebpf-stream demo``: profile a bundled workload and write a flame graph and folded stacks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import click

from .._base.errors import TargetError
from .backend import backend_options
from .options import config_from_options
from .record import run_record

_SOURCE = Path(__file__).resolve().parent.parent / "_demo" / "demo_workload.c"


def build_demo(directory: Path) -> Path:
    """Compile the demo workload so that its stacks unwind fully.

    -O0 keeps a frame pointer in every function: optimised builds drop it in
    leaf functions even with -fno-omit-frame-pointer, hiding their callers.
    """
    binary = directory / "demo_workload"
    if binary.exists() and binary.stat().st_mtime >= _SOURCE.stat().st_mtime:
        return binary
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise TargetError("no C compiler found to build the demo workload: apt-get install gcc")
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [cc, "-O0", "-g", "-fno-omit-frame-pointer", "-o", str(binary), str(_SOURCE)],
        capture_output=True, text=True, check=False)
    if result.returncode:
        raise TargetError(f"building the demo workload failed: {result.stderr.strip()}")
    return binary


@click.command()
@click.option("-d", "--duration", type=float, default=5.0, show_default=True,
              help="Seconds the demo workload runs.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("out"), show_default=True, help="Directory for the outputs.")
@click.option("-r", "--rate", type=int, default=99, show_default=True,
              help="Samples per second per CPU.")
def demo(duration: float, out_dir: Path, rate: int) -> None:
    """Profile the bundled demo workload; write out/demo.svg and out/demo.folded."""
    binary = build_demo(out_dir / "build")
    outputs = [("svg", out_dir / "demo.svg"), ("folded", out_dir / "demo.folded")]
    config = config_from_options("development", rate, None, ())
    profiler = anyio.run(run_record, config, outputs, None, [str(binary), f"{duration:g}"], None,
                         sys.stderr.isatty(), backend_options=backend_options())
    s = profiler.stats
    click.echo(f"profiled the demo workload: {s.received:,} samples, {s.dropped:,} dropped")
    for _, path in outputs:
        click.echo(f"  wrote {path}")
