"""Frames and timings shared by the tests that build profiles by hand."""

from __future__ import annotations

from ebpf_stream._model.profile import Frame, FrameKind

PERIOD = 10_000_000  # 100 Hz
START = 1_700_000_000_000_000_000


def native(name: str, module: str = "/usr/bin/app", address: int = 0x1000) -> Frame:
    return Frame(name, module, FrameKind.NATIVE, address)


def kernel(name: str, module: str = "[kernel.kallsyms]", address: int = 0) -> Frame:
    return Frame(name, module, FrameKind.KERNEL, address)


def python(qualname: str, path: str, line: int) -> Frame:
    return Frame(qualname, path, FrameKind.PYTHON, 0, line)


MAIN = native("main", address=0x1100)
WORK = native("work", address=0x1200)
READ = kernel("vfs_read", address=0xFFFF_FFFF_8120_0000)
EXT4 = kernel("ext4_file_read_iter", module="ext4", address=0xFFFF_FFFF_C030_0000)
DB_MAIN = native("main", module="/usr/bin/db", address=0x2000)
# An asyncio service: the loop runs the handler's coroutine, which blocks in line 3.
ASYNCIO = "/usr/lib/python3.11/asyncio"
RUN_ONCE = python("BaseEventLoop._run_once", f"{ASYNCIO}/base_events.py", 1922)
HANDLE_RUN = python("Handle._run", f"{ASYNCIO}/events.py", 80)
HANDLER = python("handler", "/srv/app.py", 3)
HANDLER_LATER = python("handler", "/srv/app.py", 4)  # the same function, another line
EVAL = native("_PyEval_EvalFrameDefault", module="/usr/bin/python3.11", address=0x5000)
