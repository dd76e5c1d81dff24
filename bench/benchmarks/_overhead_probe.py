"""The profiler process of the overhead benchmark (``python -m <package>._overhead_probe``).

It runs the production preset system-wide, as ``ebpf-stream record`` does, in
a process set up as the command sets up its own.  It prints one JSON object:
the library's ``Overhead`` and the kernel's view of this process (see
``_support.ProcessSnapshot``), both at the end of the warm-up and at the end of
the window, so the caller can take steady-state deltas that leave out
compiling and loading.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

import ebpf_stream
from ebpf_stream import EbpfConfig, Profiler
from ebpf_stream._outputs.files import FoldedFileExporter

from ._support import ProcessSnapshot


def _as_the_command() -> None:
    """Apply the process-wide tuning ``ebpf-stream`` applies to its own process.

    The command owns its process and trims malloc for it; without that the
    measured memory would be the embedded library's, not the command's.
    """
    from ebpf_stream import _cli

    tune = getattr(_cli, "_tune_malloc", None)
    if tune is not None:
        tune()


async def _observe(hz: int, warmup_s: float, window_s: float, out: Path) -> dict[str, Any]:
    config = EbpfConfig.for_environment("production").with_sample_rate(hz)
    exporters = [FoldedFileExporter(out)]
    try:  # the whole process's memory counts, as in the CLI
        profiler = Profiler(config, exporters=exporters, system_wide=True, standalone=True)
    except TypeError:  # a checkout from before ``standalone`` was an argument
        profiler = Profiler(config, exporters=exporters, system_wide=True)
        profiler._standalone = True
    points: list[dict[str, Any]] = []
    async with profiler:
        await anyio.sleep(warmup_s)
        for wait in (0.0, window_s):
            await anyio.sleep(wait)
            points.append({
                "overhead": dataclasses.asdict(profiler.get_overhead()),
                "process": dataclasses.asdict(ProcessSnapshot.take(os.getpid())),
                "stats": dataclasses.asdict(profiler.stats),
            })
    return {"hz": hz, "warm": points[0], "end": points[1], "ebpf_stream": ebpf_stream.__file__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hz", type=int, required=True)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args(argv)
    _as_the_command()
    with tempfile.TemporaryDirectory(prefix="ebpf-stream-bench-") as tmp:
        result = anyio.run(_observe, args.hz, args.warmup, args.window,
                           Path(tmp) / "profile.folded", backend_options={"use_uvloop": True})
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
