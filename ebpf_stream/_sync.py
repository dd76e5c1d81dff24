"""The synchronous API: ``EbpfCpuProfiler``, a ``Profiler`` run on a thread of its own.

Plain synchronous programs have no event loop to run the pipeline in, so
``start()`` starts one in a background thread (an anyio blocking portal)
and enters the ``Profiler`` there; ``stop()`` exits it and ends the thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Self

from ._base.config import EbpfConfig
from ._base.errors import EbpfStreamError
from ._base.overhead import Overhead
from ._base.stats import Stats
from ._outputs.base import Exporter
from ._profiler import Mode, Profiler

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal


class EbpfCpuProfiler:
    """The synchronous API: ``start()``, ``stop()``, ``get_overhead()``.

    The pipeline runs on its own event loop in a background thread, so plain
    synchronous programs can profile themselves (or ``config.pids``).  The
    options are ``Profiler``'s; like it, ``start()`` falls back to sampling
    in-process when the environment refuses BPF, unless ``on_unavailable``
    says otherwise.
    """

    def __init__(self, config: EbpfConfig | None = None, exporters: Sequence[Exporter] = (),
                 **profiler_options: Any) -> None:
        self._profiler = Profiler(config, exporters, **profiler_options)
        self._profiler._host_loop = False  # it runs on a loop of its own
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._profiler_cm: AbstractContextManager[Profiler] | None = None

    @property
    def stats(self) -> Stats:
        return self._profiler.stats

    @property
    def mode(self) -> Mode:
        return self._profiler.mode

    @property
    def unavailable(self) -> EbpfStreamError | None:
        return self._profiler.unavailable

    def start(self) -> None:
        if self._portal_cm is not None:
            raise RuntimeError("EbpfCpuProfiler is already started")
        from anyio.from_thread import start_blocking_portal

        self._portal_cm = start_blocking_portal("asyncio")
        portal = self._portal_cm.__enter__()
        self._profiler_cm = portal.wrap_async_context_manager(self._profiler)
        try:
            self._profiler_cm.__enter__()
        except BaseException:
            self._profiler_cm = None
            self._stop_portal()
            raise

    def stop(self) -> None:
        try:
            if self._profiler_cm is not None:
                cm, self._profiler_cm = self._profiler_cm, None
                cm.__exit__(None, None, None)
        finally:
            self._stop_portal()

    def _stop_portal(self) -> None:
        if self._portal_cm is not None:
            cm, self._portal_cm = self._portal_cm, None
            cm.__exit__(None, None, None)

    def get_overhead(self) -> Overhead:
        return self._profiler.get_overhead()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
