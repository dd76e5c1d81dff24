"""OpenTelemetry's runtime context, wrapped to publish the current span.

Imported only when the app has OpenTelemetry.  The wrapper changes nothing
the app sees: ``get_current`` and what ``attach`` makes current are the
wrapped context's own; ``attach`` hands back a token that ``detach``
unwraps, and a token of the wrapped context (one attached before the
wrapping) is detached as before.  A failure to publish never fails the
app's ``attach``.
"""

from __future__ import annotations

from contextvars import Token
from typing import Any

from opentelemetry.context import Context
from opentelemetry.context.context import _RuntimeContext
from opentelemetry.trace.propagation import _SPAN_KEY

from .publisher import NONE, REQUEST, Publication


class _Tokens:
    """The wrapped context's token, and ours for the same attach."""

    __slots__ = ("ours", "theirs")

    def __init__(self, theirs: Token[Context], ours: Token[bytes]) -> None:
        self.theirs = theirs
        self.ours = ours


class PublishingContext(_RuntimeContext):
    """Publishes the span each ``attach`` makes current; otherwise ``inner`` itself."""

    def __init__(self, inner: _RuntimeContext, publication: Publication) -> None:
        self._inner = inner
        self._publication = publication

    def attach(self, context: Context) -> Any:
        token = self._inner.attach(context)
        span = context.get(_SPAN_KEY)
        if span is None:  # no span (baggage, a suppression flag): the request stays
            return token
        try:
            value = self._publication.span_value(span, REQUEST.get(NONE))
        except Exception:  # a span of unexpected shape: published as nothing
            return token
        return _Tokens(token, REQUEST.set(value))

    def get_current(self) -> Context:
        return self._inner.get_current()

    def detach(self, token: Any) -> None:
        if not isinstance(token, _Tokens):
            self._inner.detach(token)
            return
        try:
            self._inner.detach(token.theirs)
        finally:
            try:  # noqa: SIM105 (cheaper per span than contextlib.suppress)
                REQUEST.reset(token.ours)
            except ValueError:  # detached in another context: the wrapped one has said so
                pass
