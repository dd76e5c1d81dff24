"""Bounded channels between stages, with an overflow policy and loss accounting.

Every hop is an anyio memory object stream with a fixed capacity, so memory
never grows without bound.  When the consumer is slow the policy decides:
``block`` applies backpressure upstream (ultimately the kernel ring fills and
the kernel counts its drops), the drop policies keep the producer running and
count what they discard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio

from .._base.config import OverflowPolicy

if TYPE_CHECKING:  # anyio loads them with the first channel: a run's start, not an import
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")


class Channel(Generic[T]):
    """A bounded single-producer, single-consumer channel.

    ``weight`` says how many samples an item carries, so drops are counted in
    samples, not messages.
    """

    def __init__(
        self,
        capacity: int,
        policy: OverflowPolicy,
        *,
        weight: Callable[[T], int],
        on_drop: Callable[[int], None],
    ) -> None:
        self._send: MemoryObjectSendStream[T]
        self._receive: MemoryObjectReceiveStream[T]
        self._send, self._receive = anyio.create_memory_object_stream[T](capacity)
        self._policy = policy
        self._weight = weight
        self._on_drop = on_drop

    async def send(self, item: T) -> None:
        if self._policy is OverflowPolicy.BLOCK:
            await self._send.send(item)
            return
        try:
            self._send.send_nowait(item)
        except anyio.WouldBlock:
            if self._policy is OverflowPolicy.DROP_NEWEST:
                self._on_drop(self._weight(item))
                return
            oldest = self._receive.receive_nowait()
            self._on_drop(self._weight(oldest))
            self._send.send_nowait(item)

    async def receive(self) -> T:
        """The next item; raises ``anyio.EndOfStream`` once closed and drained."""
        return await self._receive.receive()

    def close(self) -> None:
        """No more items will be sent; the consumer drains what is queued."""
        self._send.close()

    async def __aiter__(self) -> AsyncIterator[T]:
        async for item in self._receive:
            yield item

    @property
    def queued(self) -> int:
        return self._send.statistics().current_buffer_used
