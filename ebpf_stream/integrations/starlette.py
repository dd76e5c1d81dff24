"""FastAPI and Starlette: profile the service for as long as its lifespan runs.

``FastAPI(lifespan=ProfilingLifespan())``, or ``ProfilingLifespan(lifespan)``
to wrap the app's own lifespan.  The profiler starts before the app's
lifespan and stops after it, so the app's own startup and shutdown are
profiled too; whatever state the app's lifespan yields is passed on as is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Unpack

from .._profiler import Profiler
from ._service import ServiceProfiling
from ._settings import ProfilingOptions

__all__ = ["ProfilingLifespan"]


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
