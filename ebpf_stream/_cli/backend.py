"""The event loop the commands run on: uvloop when installed, else asyncio.

uvloop is an optional extra (``pip install 'ebpf-stream[uvloop]'``) so that
installing the library never changes the loop a host service picks; a
command owns its process, so it takes uvloop's faster loop when it is there.
"""

from __future__ import annotations

import asyncio
import importlib.util


def backend_options() -> dict[str, object]:
    """``anyio.run`` options for the asyncio backend: uvloop when it is importable."""
    if importlib.util.find_spec("uvloop") is None:
        return {}
    return {"use_uvloop": True}


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the package of the loop running the caller."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
