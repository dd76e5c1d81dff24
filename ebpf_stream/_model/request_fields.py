"""What a request adds to a sample or a stall, under the same names in every output.

OTLP profiles and stall records, and pprof labels, carry the request's
route and method under the semantic conventions' names, so a backend can
group CPU time by endpoint without a mapping per format.  The span goes
where each format keeps one: OTLP as binary ids (a profile's ``Link``, a log
record's ``trace_id`` and ``span_id``), pprof as hex labels, as trace
viewers print them.  An empty field is left out: it would only say nothing.
"""

from __future__ import annotations

from .dictionary import valid_utf8
from .profile import RequestContext

HTTP_ROUTE = "http.route"
HTTP_REQUEST_METHOD = "http.request.method"
TRACE_ID = "trace_id"
SPAN_ID = "span_id"


def request_attributes(context: RequestContext | None) -> dict[str, str]:
    """``http.route`` and ``http.request.method`` of ``context``, those it knows."""
    if context is None:
        return {}
    fields = ((HTTP_ROUTE, context.route), (HTTP_REQUEST_METHOD, context.method))
    return {key: valid_utf8(value) for key, value in fields if value}


def span_ids(context: RequestContext | None) -> tuple[bytes, bytes] | None:
    """The span of ``context`` as OTLP ids (16-byte trace, 8-byte span); None without one."""
    if context is None or not (context.trace_id and context.span_id):
        return None
    return bytes.fromhex(context.trace_id), bytes.fromhex(context.span_id)


def request_labels(context: RequestContext | None) -> dict[str, str]:
    """The span's hex ids, then the route and method: what a sample's text labels say."""
    if context is None:
        return {}
    ids = {TRACE_ID: context.trace_id, SPAN_ID: context.span_id} if span_ids(context) else {}
    return ids | request_attributes(context)
