"""Bounded queues with an overflow policy and loss accounting.

Every hop between stages is a ``Channel`` of fixed capacity, and so is the
OTLP exporter's queue of requests, so memory never grows without bound.
When the consumer is slow the policy decides: ``block`` applies backpressure
upstream (ultimately the kernel ring fills and the kernel counts its drops),
the drop policies keep the producer running and count what they discard.
``BoundedQueue`` is the one place that decision is made.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel

from .._base.config import OverflowPolicy

T = TypeVar("T")


@dataclasses.dataclass(eq=False, slots=True)
class _Blocked(Generic[T]):
    """A producer waiting for room, with the item it is sending."""

    item: T
    woken: anyio.Event
    queued: bool = False  # the consumer moved ``item`` in; else close() turned it away


class BoundedQueue(Generic[T]):
    """A FIFO of at most ``capacity`` items, for any number of producers and one consumer.

    Under ``block`` the producers that find it full wait in line, each with
    its item (the run's channel has one producer per probe).  Each item the
    consumer takes lets the first one's item in and wakes that producer
    alone, so every blocked producer gets through in turn and a newcomer
    cannot overtake them.  This is how anyio's memory streams hand over.

    ``weight`` says how many samples an item carries, so drops are counted in
    samples, not items.
    """

    def __init__(self, capacity: int, policy: OverflowPolicy, *,
                 weight: Callable[[T], int], on_drop: Callable[[int], None]) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.closed = False
        self._items: collections.deque[T] = collections.deque()
        self._blocked: collections.deque[_Blocked[T]] = collections.deque()
        self._policy = policy
        self._weight = weight
        self._on_drop = on_drop
        self._ready: anyio.Event | None = None  # made when waited on: it needs the running loop

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: T) -> None:
        """Queue ``item``; when full, wait (``block``) or drop the newest or oldest.

        Raises ``anyio.ClosedResourceError`` once the queue is closed, also in
        a producer blocked when it closes: its item was not queued.  A
        producer cancelled while blocked leaves the line with its item not
        queued, unless the consumer had already let it in: then it is queued
        once, as with a cancelled send on an anyio stream.
        """
        if self._policy is OverflowPolicy.BLOCK:
            # Yield on every send, as anyio's streams do: a producer that never finds
            # the queue full still lets the consumer run.
            await anyio.lowlevel.checkpoint()
        if self.closed:
            raise anyio.ClosedResourceError
        if len(self._items) < self.capacity:
            self._push(item)
        elif self._policy is OverflowPolicy.DROP_NEWEST:
            self._on_drop(self._weight(item))
        elif self._policy is OverflowPolicy.DROP_OLDEST:
            self._on_drop(self._weight(self._items.popleft()))
            self._push(item)
        else:
            await self._wait_in_line(item)

    async def _wait_in_line(self, item: T) -> None:
        blocked = _Blocked(item, anyio.Event())
        self._blocked.append(blocked)
        try:
            await blocked.woken.wait()
        finally:
            if blocked in self._blocked:  # cancelled while waiting: no one may let it in
                self._blocked.remove(blocked)
        if not blocked.queued:
            raise anyio.ClosedResourceError

    def append(self, item: T) -> None:
        """Queue ``item`` past the bound: for what must neither wait nor be dropped."""
        if self.closed:
            raise anyio.ClosedResourceError
        self._push(item)

    def _push(self, item: T) -> None:
        self._items.append(item)
        if self._ready is not None:
            self._ready.set()

    async def get(self) -> T:
        """The oldest item, once there is one; ``anyio.EndOfStream`` once closed and drained."""
        await anyio.lowlevel.checkpoint()
        while not self._items:
            if self.closed:
                raise anyio.EndOfStream
            if self._ready is None or self._ready.is_set():
                self._ready = anyio.Event()
            await self._ready.wait()
        item = self._items.popleft()
        if self._blocked:
            blocked = self._blocked.popleft()
            blocked.queued = True
            self._push(blocked.item)
            blocked.woken.set()
        return item

    def take_all(self) -> list[T]:
        """Empty the queue, returning what it held (to count it as lost)."""
        items = list(self._items)
        self._items.clear()
        return items

    def close(self) -> None:
        """Accept no more items: blocked producers are turned away at once, and the
        consumer drains what is queued."""
        self.closed = True
        for blocked in self._blocked:
            blocked.woken.set()
        self._blocked.clear()
        if self._ready is not None:
            self._ready.set()


class Channel(Generic[T]):
    """A bounded channel between stages: any number of producers send, one stage receives."""

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
        """Send ``item`` under the overflow policy; ``anyio.ClosedResourceError`` once closed."""
        await self._queue.put(item)

    async def receive(self) -> T:
        """The next item; raises ``anyio.EndOfStream`` once closed and drained."""
        return await self._queue.get()

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
