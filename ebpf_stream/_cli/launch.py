"""Starting a command so that probes are attached before its first instruction.

The command is started behind a gate: a tiny interpreter that blocks on a
pipe, then execs the command.  The profiler targets the gate's pid (which
the command keeps across exec), attaches, and only then opens the gate.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

import anyio
from anyio.abc import Process

from .._base.errors import TargetError

_GATE = (
    "import os, sys\n"
    "os.read(int(sys.argv[1]), 1)\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n"
    "    sys.exit(f'error: cannot run {sys.argv[2]}: {e.strerror}')\n"
)


def resolve_command(argv: Sequence[str]) -> str:
    path = shutil.which(argv[0])
    if path is None:
        raise TargetError(f"command not found: {argv[0]}")
    return path


class GatedCommand:
    """A started but not yet running command."""

    def __init__(self, process: Process, gate_fd: int) -> None:
        self.process = process
        self._gate_fd: int | None = gate_fd

    @property
    def pid(self) -> int:
        return self.process.pid

    def release(self) -> None:
        """Let the command run."""
        if self._gate_fd is not None:
            os.write(self._gate_fd, b"x")
            self._close_gate()

    def _close_gate(self) -> None:
        if self._gate_fd is not None:
            os.close(self._gate_fd)
            self._gate_fd = None

    async def abort(self) -> None:
        """Stop a command that never ran (closing the gate ends it before exec)."""
        self._close_gate()
        if self.process.returncode is None:
            self.process.kill()
        with anyio.CancelScope(shield=True):
            await self.process.wait()


async def start_gated(argv: Sequence[str]) -> GatedCommand:
    resolve_command(argv)
    read_fd, write_fd = os.pipe()
    try:
        process = await anyio.open_process(
            [sys.executable, "-S", "-c", _GATE, str(read_fd), *argv],
            stdin=None, stdout=None, stderr=None, pass_fds=(read_fd,),
        )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return GatedCommand(process, write_fd)
