"""A workload run with the profiler embedded in it, as a service embeds it.

    python embedded.py shares SECONDS OUT_DIR [--rate HZ] [--loop asyncio|uvloop]
    python embedded.py stalls OUT_DIR [--blocks K] [--mode sleep|cpu] [--loop asyncio|uvloop]

``shares`` runs ``shares.run(SECONDS)`` in a worker thread while the loop
idles; ``stalls`` runs ``stalls.main`` on the loop the profiler was entered
on.  The profiler (``Profiler()`` with its defaults for what the machine
refuses) writes OUT_DIR/profile.folded.  The last line of stdout is JSON:
the profiler's mode, stats and overhead, the workload's own report, and each
stall found (thread, busy since, duration, the Python function names of its
heaviest stack, root first).
"""

import argparse
import asyncio
import dataclasses
import json
import sys
import threading
from pathlib import Path

import anyio
import anyio.to_thread

sys.path.insert(0, str(Path(__file__).parent))

import shares
import stalls

from ebpf_stream import EbpfConfig, FrameKind, Profiler, Stall
from ebpf_stream.exporters import FoldedFileExporter, MemoryExporter


async def profiled(args):
    config = EbpfConfig().with_sample_rate(args.rate)
    memory = MemoryExporter()
    folded = FoldedFileExporter(Path(args.out) / "profile.folded")
    async with Profiler(config, [folded, memory]) as profiler:
        if args.workload == "shares":
            report = await anyio.to_thread.run_sync(shares.run, args.seconds)
        else:
            workload = argparse.Namespace(blocks=args.blocks, mode=args.mode, delay=0.3)
            report = {"loop_tid": threading.get_native_id(),
                      "blocks": await stalls.main(workload)}
    found = [r for r in memory.records if isinstance(r, Stall)]
    return {
        "mode": profiler.mode,
        "stats": dataclasses.asdict(profiler.stats),
        "overhead": dataclasses.asdict(profiler.get_overhead()),
        "report": report,
        "stalls": [{"tid": s.stall.tid, "busy_since": s.stall.busy_since,
                    "duration_ns": s.stall.duration_ns,
                    "names": [f.name for f in s.stacks[0].frames if f.kind is FrameKind.PYTHON]
                    if s.stacks else []} for s in found],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["shares", "stalls"])
    parser.add_argument("seconds", type=float, nargs="?", default=0.0)
    parser.add_argument("out")
    parser.add_argument("--rate", type=int, default=99)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--mode", choices=["sleep", "cpu"], default="sleep")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(profiled(args))
    else:
        result = asyncio.run(profiled(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
