"""Bounded queues with an overflow policy and loss accounting.

Every hop between stages is a ``Channel`` of fixed capacity, so memory never
grows without bound, and so is the OTLP sender's queue of requests.  When
the consumer is slow the policy decides: ``block`` applies backpressure
upstream (ultimately the kernel ring fills and the kernel counts its drops),
the drop policies keep the producer running and count what they discard.
``BoundedQueue`` is the one place that decision is made.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel

from .._base.config import OverflowPolicy

T = TypeVar("T")


class BoundedQueue(Generic[T]):
    """A FIFO of at most ``capacity`` items, for one producer and one consumer.

    ``weight`` says how many samples an item carries, so drops are counted in
    samples, not items.  ``items`` is the queue itself, for a consumer that
    looks before it takes.
    """

    def __init__(self, capacity: int, policy: OverflowPolicy, *,
                 weight: Callable[[T], int], on_drop: Callable[[int], None]) -> None:
        self.items: collections.deque[T] = collections.deque()
        self.capacity = capacity
        self.closed = False
        self._policy = policy
        self._weight = weight
        self._on_drop = on_drop
        # Made when first waited on: an anyio.Event needs the running loop.
        self._space: anyio.Event | None = None
        self._ready: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self.items)

    async def put(self, item: T) -> None:
        """Queue ``item``; when full, wait (``block``) or drop the newest or oldest."""
        await anyio.lowlevel.checkpoint()  # a producer that never waits still lets others run
        while len(self.items) >= self.capacity:
            if self._policy is OverflowPolicy.BLOCK:
                self._space = anyio.Event()
                await self._space.wait()
            elif self._policy is OverflowPolicy.DROP_NEWEST:
                self._on_drop(self._weight(item))
                return
            else:
                self._on_drop(self._weight(self.items.popleft()))
        self.append(item)

    def append(self, item: T) -> None:
        """Queue ``item`` even past the bound (what must neither wait nor be lost)."""
        self.items.append(item)
        if self._ready is not None:
            self._ready.set()

    def take(self) -> T:
        """The oldest item; the queue must not be empty."""
        item = self.items.popleft()
        if self._space is not None:
            self._space.set()
        return item

    async def wait(self) -> None:
        """Return once an item is queued or the queue is closed."""
        while not self.items and not self.closed:
            self._ready = anyio.Event()
            await self._ready.wait()

    def close(self) -> None:
        """No more items will be put; the consumer drains what is queued."""
        self.closed = True
        if self._ready is not None:
            self._ready.set()


class Channel(Generic[T]):
    """A bounded single-producer, single-consumer channel between two stages."""

    def __init__(
        self,
        capacity: int,
        policy: OverflowPolicy,
        *,
        weight: Callable[[T], int],
        on_drop: Callable[[int], None],
    ) -> None:
        self._queue = BoundedQueue[T](capacity, policy, weight=weight, on_drop=on_drop)

    async def send(self, item: T) -> None:
        if self._queue.closed:
            raise anyio.ClosedResourceError
        await self._queue.put(item)

    async def receive(self) -> T:
        """The next item; raises ``anyio.EndOfStream`` once closed and drained."""
        await anyio.lowlevel.checkpoint()
        await self._queue.wait()
        if not self._queue.items:
            raise anyio.EndOfStream
        return self._queue.take()

    def close(self) -> None:
        """No more items will be sent; the consumer drains what is queued."""
        self._queue.close()

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            try:
                yield await self.receive()
            except anyio.EndOfStream:
                return

    @property
    def queued(self) -> int:
        return len(self._queue)
