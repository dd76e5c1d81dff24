"""Naming the request a sample was taken for.

A sample carries what its process published for the running task: trace
and span ids, and where in the process's region the route and method
names are (see ``_context``).  The names are read from the process once
each, while it is alive, like its symbols.
"""

from __future__ import annotations

from .._base.lru import Lru
from .._context import region
from .._context.reader import Names, find_published
from .._model.profile import RequestContext

_CONTEXTS_PER_PROCESS = 4096  # distinct requests kept named per process
_PROCESSES = 1024  # processes kept, most recently sampled first


class _Process:
    __slots__ = ("contexts", "names")

    def __init__(self, pid: int) -> None:
        published = find_published(pid)
        self.names = None if published is None else Names(pid, published.address)
        self.contexts: Lru[bytes, RequestContext] = Lru(_CONTEXTS_PER_PROCESS)


class Requests:
    """``RequestContext`` of raw published values, per process."""

    def __init__(self) -> None:
        self._processes: Lru[int, _Process] = Lru(_PROCESSES)

    def context(self, pid: int, raw: bytes) -> RequestContext | None:
        """The request ``raw`` names in ``pid``; None for no request."""
        if len(raw) != region.VALUE_SIZE or raw == region.NO_VALUE:
            return None
        process = self._processes.get(pid)
        if process is None:
            process = _Process(pid)
            self._processes.put(pid, process)
        context = process.contexts.get(raw)
        if context is None:
            trace, span, route, method = region.VALUE.unpack(raw)
            names = process.names
            context = RequestContext(
                trace.hex() if any(trace) else "", span.hex() if any(span) else "",
                names(route) if names else "", names(method) if names else "")
            process.contexts.put(raw, context)
        return context

    def forget(self, pid: int) -> None:
        """``pid`` exec'ed: its region is gone, or another."""
        self._processes.pop(pid)
