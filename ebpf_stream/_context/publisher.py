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
import struct
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import layout, region

log = logging.getLogger("ebpf_stream")

REQUEST: contextvars.ContextVar[bytes] = contextvars.ContextVar("ebpf_stream.request")
NONE = region.NO_VALUE

_ROUTE = "http.route"
_METHOD = "http.request.method"
_OLD_METHOD = "http.method"  # before the stable HTTP conventions


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

        A local root (no parent, or a remote one) names its own route and
        method.  Any other span takes its local root's from ``previous``,
        the value of the span it was started under; so does a root without
        a route, from a route the middleware set before any span.  Children
        skip the attribute lookups: they are most of the spans a request
        makes, and their cost is paid per span.
        """
        context = span.get_span_context()
        if not context.is_valid:
            return previous
        ids: bytes = context.trace_id.to_bytes(16, "big") + context.span_id.to_bytes(8, "big")
        parent = getattr(span, "parent", None)
        if parent is not None and not parent.is_remote:  # a local child
            return ids + (previous[24:] if previous[:16] == ids[:16] else _NO_NAMES)
        attributes: Any = getattr(span, "attributes", None)
        route = attributes.get(_ROUTE) if attributes else None
        if route is None:
            return ids + (previous[24:] if previous[:16] == NONE[:16] else _NO_NAMES)
        method = attributes.get(_METHOD) or attributes.get(_OLD_METHOD)
        return ids + _NAMES.pack(self.name(str(route)),
                                 self.name(str(method)) if method is not None else 0)


_NAMES = struct.Struct("<II")  # the route's and the method's offsets, as region.VALUE ends
_NO_NAMES = bytes(_NAMES.size)


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
