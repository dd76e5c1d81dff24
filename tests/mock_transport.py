"""A transport that answers from the test: ``handler`` plays the receiver."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from google.protobuf.message import Message

from ebpf_stream._base.otlp_settings import Endpoint


class MockTransport:
    """A transport that hands each request to ``handler``, for tests of the exporter.

    ``handler`` returns the response or raises ``DeliveryError``, the way
    a real receiver would answer.
    """

    def __init__(self, endpoint: Endpoint,
                 handler: Callable[[Message], Awaitable[Message]]) -> None:
        self.endpoint = endpoint
        self._handler = handler

    async def send(self, request: Message) -> Message:
        return await self._handler(request)

    async def aclose(self) -> None:
        pass
