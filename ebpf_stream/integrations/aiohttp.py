"""aiohttp: profile the service for as long as the application runs.

``app.cleanup_ctx.append(ProfilingContext())``: aiohttp enters it at
startup, in each worker process, and leaves it at cleanup.  Contexts
appended after it start after it and are cleaned up before it, so their
work is profiled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Unpack

from .._profiler import Profiler
from ._service import ServiceProfiling
from ._settings import ProfilingOptions

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["ProfilingContext"]


class ProfilingContext:
    """A cleanup context that runs ``ServiceProfiling(**options)`` while the app runs.

    ``options`` override the environment (see ``ProfilingOptions``).
    """

    def __init__(self, **options: Unpack[ProfilingOptions]) -> None:
        self._options = options
        self._current: ServiceProfiling | None = None

    @property
    def profiler(self) -> Profiler | None:
        """The running (or last) profiler; None when the service is not profiled."""
        return None if self._current is None else self._current.profiler

    async def __call__(self, app: web.Application) -> AsyncIterator[None]:
        self._current = ServiceProfiling(**self._options)
        async with self._current:
            yield
