"""The app's side: publishing which request each task is running.

The request lives in one context variable, ``REQUEST``, whose value is a
32-byte ``bytes`` (``region.VALUE``).  Context variables follow tasks:
asyncio runs each task in its own context, copies it into the tasks a
request starts and into ``run_in_executor`` and ``to_thread`` calls, so
the value is right wherever the request's code runs, and nothing happens
when the loop switches tasks.  The kernel reads it from the sampled
thread's running context (see ``layout``).

It is set where the current span changes: OpenTelemetry's runtime context
is wrapped, so each ``attach`` (a span made current) sets the value and
its ``detach`` puts the previous one back.  That costs a few microseconds
per span, and nothing per task switch or per sample.  Without OpenTelemetry,
the middleware of ``integrations`` sets route and method alone
(``request_scope``).
"""

from __future__ import annotations

import contextvars
import logging
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import layout, region

log = logging.getLogger("ebpf_stream")

REQUEST: contextvars.ContextVar[bytes] = contextvars.ContextVar("ebpf_stream.request")
NONE = bytes(region.VALUE_SIZE)

_ROUTE_KEYS = ("http.route",)
_METHOD_KEYS = ("http.request.method", "http.method")


class Publication:
    """This process's region: the header, and route and method names by offset."""

    def __init__(self, header: region.Header) -> None:
        fd = os.memfd_create(region.NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, region.SIZE)
            # Private: a forked child writes its names into its own copy.
            self._map = mmap.mmap(fd, region.SIZE, flags=mmap.MAP_PRIVATE)
        finally:
            os.close(fd)
        self._map[:region.HEADER_SIZE] = header.pack()
        self._names: dict[str, int] = {}
        self._end = region.NAMES_START
        self._lock = threading.Lock()
        self._full = False

    def name(self, text: str) -> int:
        """The offset of ``text`` in the region, written there the first time; 0
        once the region is full."""
        at = self._names.get(text)
        if at is not None:
            return at
        with self._lock:
            at = self._names.get(text)
            if at is not None:
                return at
            data = region.encode_name(text)
            if self._end + len(data) > region.SIZE:
                if not self._full:
                    self._full = True
                    log.warning("ebpf-stream: more routes than the context region holds; "
                                "later ones are not named")
                return 0
            at = self._end
            self._map[at:at + len(data)] = data
            self._end += len(data)
            self._names[text] = at
            return at

    def value(self, trace_id: int, span_id: int, route: str | None, method: str | None) -> bytes:
        return region.VALUE.pack(trace_id.to_bytes(16, "big"), span_id.to_bytes(8, "big"),
                                 self.name(route) if route else 0,
                                 self.name(method) if method else 0)

    def span_value(self, span: Any, previous: bytes) -> bytes:
        """The value for ``span`` made current where ``previous`` was.

        A span without a route (a child of the server span) takes its route
        from ``previous`` when that is the same trace's, or a route the
        middleware set before any span: that is its local root's route.
        """
        context = span.get_span_context()
        if not context.is_valid:
            return previous
        attributes = getattr(span, "attributes", None) or {}
        route = next((attributes[k] for k in _ROUTE_KEYS if k in attributes), None)
        method = next((attributes[k] for k in _METHOD_KEYS if k in attributes), None)
        trace = context.trace_id.to_bytes(16, "big")
        if route is None and previous[:16] in (trace, NONE[:16]):
            _, _, route_at, method_at = region.VALUE.unpack(previous)
            return region.VALUE.pack(trace, context.span_id.to_bytes(8, "big"), route_at,
                                     method_at)
        return region.VALUE.pack(trace, context.span_id.to_bytes(8, "big"),
                                 self.name(str(route)) if route is not None else 0,
                                 self.name(str(method)) if method is not None else 0)


_publication: Publication | None = None
_failed = False
_guard = threading.Lock()


def publish() -> Publication | None:
    """Publish this process's requests (idempotent); None where this interpreter
    cannot (one warning says why).  Never raises: the host runs on regardless."""
    global _publication, _failed
    with _guard:
        if _publication is None and not _failed:
            try:
                proven = layout.proven(REQUEST)
                _publication = Publication(region.Header(
                    id(REQUEST), layout.hamt_hash(REQUEST), *proven))
            except (layout.LayoutError, OSError, ValueError, AttributeError) as exc:
                _failed = True
                log.warning("ebpf-stream: samples cannot be linked to requests in this "
                            "process: %s", exc)
        if _publication is not None:
            _hook_opentelemetry(_publication)
        return _publication


@contextmanager
def request_scope(route: str | None, method: str | None) -> Iterator[None]:
    """Samples taken inside are for ``method route`` (the middleware's, without spans)."""
    publication = _publication or publish()
    if publication is None or not route:
        yield
        return
    token = REQUEST.set(publication.value(0, 0, route, method))
    try:
        yield
    finally:
        REQUEST.reset(token)


def _hook_opentelemetry(publication: Publication) -> None:
    """Wrap OpenTelemetry's runtime context, if the app has imported OpenTelemetry.

    Only then: importing it for an app that does not use it would cost
    that app some 15 ms and memory for nothing.  Apps set up their tracing
    before their lifespan starts a profiler, and every ``publish()`` looks
    again.
    """
    otel_context = sys.modules.get("opentelemetry.context")
    if otel_context is None:
        return
    from ._otel import PublishingContext

    current = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if current is None or isinstance(current, PublishingContext):
        return
    vars(otel_context)["_RUNTIME_CONTEXT"] = PublishingContext(current, publication)
