"""aiohttp: profile the service for as long as the application runs.

``app.cleanup_ctx.append(ProfilingContext())``: aiohttp enters it at
startup, in each worker process, and leaves it at cleanup.  Contexts
appended after it start after it and are cleaned up before it, so their
work is profiled.

``web.Application(middlewares=[route_middleware])`` names each request's
route and method for its samples, in a service without OpenTelemetry
(whose spans name them otherwise).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Unpack

from .._context.publisher import request_scope
from .._profiler import Profiler
from ._service import ServiceProfiling
from ._settings import ProfilingOptions

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["ProfilingContext", "route_middleware"]


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


async def route_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                           ) -> web.StreamResponse:
    """aiohttp middleware: the samples of each request name its route and method.

    The route is the resource's canonical path (``/items/{item_id}``).
    """
    resource = request.match_info.route.resource
    with request_scope(resource.canonical if resource is not None else None, request.method):
        return await handler(request)


# What aiohttp's @web.middleware marks; set by hand so this module need not import aiohttp.
route_middleware.__middleware_version__ = 1  # type: ignore[attr-defined]
