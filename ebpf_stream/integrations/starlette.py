"""FastAPI and Starlette: profile the service for as long as its lifespan runs.

``FastAPI(lifespan=ProfilingLifespan())``, or ``ProfilingLifespan(lifespan)``
to wrap the app's own lifespan.  The profiler starts before the app's
lifespan and stops after it, so the app's own startup and shutdown are
profiled too; whatever state the app's lifespan yields is passed on as is.

``app.add_middleware(RouteMiddleware)`` names each request's route and
method for its samples, in a service without OpenTelemetry (whose spans
name them otherwise).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Unpack

from .._context.publisher import publish, request_scope
from .._profiler import Profiler
from ._service import ServiceProfiling
from ._settings import ProfilingOptions

__all__ = ["ProfilingLifespan", "RouteMiddleware"]

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class ProfilingLifespan:
    """A lifespan that runs ``ServiceProfiling(**options)`` around ``lifespan`` (if any).

    Starlette starts it in each worker process, so each worker profiles
    itself.  ``options`` override the environment (see ``ProfilingOptions``).
    """

    def __init__(self, lifespan: Callable[[Any], AbstractAsyncContextManager[Any]] | None = None,
                 **options: Unpack[ProfilingOptions]) -> None:
        self._lifespan = lifespan
        self._options = options
        self._current: ServiceProfiling | None = None

    @property
    def profiler(self) -> Profiler | None:
        """The running (or last) profiler; None when the service is not profiled."""
        return None if self._current is None else self._current.profiler

    def __call__(self, app: Any) -> AbstractAsyncContextManager[Any]:
        return self._run(app)

    @asynccontextmanager
    async def _run(self, app: Any) -> AsyncIterator[Any]:
        self._current = ServiceProfiling(**self._options)
        async with self._current:
            if self._lifespan is None:
                yield None
            else:
                async with self._lifespan(app) as state:
                    yield state


class RouteMiddleware:
    """ASGI middleware: the samples of each HTTP request name its route and method.

    The route is the template the app matched (``/items/{item_id}``), found
    as Starlette's router finds it, so an endpoint's requests add up
    whatever their parameters.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        publish()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        router = getattr(scope.get("app"), "router", None)
        route = _route(getattr(router, "routes", ()), scope, "")
        with request_scope(route, scope.get("method")):
            await self.app(scope, receive, send)


def _route(routes: Iterable[Any], scope: Scope, prefix: str) -> str | None:
    """The path template ``routes`` match ``scope`` with, mounts followed."""
    from starlette.routing import Match, Mount

    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        path = prefix + getattr(route, "path", "")
        if isinstance(route, Mount):
            inner = _route(route.routes, {**scope, **child}, path)
            if inner is not None:
                return inner
        if match is Match.FULL:
            return path
        partial = partial or path  # the path matched but not the method
    return partial
