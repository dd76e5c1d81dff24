"""Delivering the OTLP exporter's queue: one sender, retries, and what is given up.

The exporter converts and queues; everything between the queue and the
receiver's answer is here, with the state it needs (which signals are
failing, the first failure, what is in flight), so that no sample is lost
without being counted in ``Stats.undelivered``.  The queue is bounded in
batches under the run's overflow policy.  A single sender delivers it in
order.  Retryable failures are retried with exponential backoff and jitter
(or after the delay the receiver asked for) for up to ``retry_for_s`` per
batch; after that, or on a final error, the request is given up.  A sample
travels in one request (CPU samples in the profiles, traced events in the
logs), so a request given up costs its own.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Mapping

import anyio
from google.protobuf.message import Message

from ..._base.config import OverflowPolicy
from ..._base.otlp_settings import Signal
from ..._base.stats import Stats
from ..._pipeline.channels import BoundedQueue
from .transport import DeliveryError, Transport

log = logging.getLogger("ebpf_stream")

_BACKOFF_FIRST_S = 0.25
_BACKOFF_MAX_S = 8.0


def backoff(attempt: int) -> float:
    """Delay before retry ``attempt`` (0-based): doubling, capped, with jitter.

    The jitter (a random 50-100% of the step) keeps many profilers that lost
    the same collector from retrying in lockstep when it comes back.
    """
    step = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** min(attempt, 16))
    return float(step * random.uniform(0.5, 1.0))


def _rejected(response: Message) -> tuple[int, str]:
    """(items rejected, the receiver's message) from a partial-success response."""
    partial = getattr(response, "partial_success", None)
    if partial is None:
        return 0, ""
    count = next((value for field, value in partial.ListFields()
                  if field.name.startswith("rejected_")), 0)
    return int(count), str(partial.error_message)


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    signal: Signal
    message: Message
    samples: int  # the samples it carries: lost with it if it is given up


@dataclasses.dataclass(slots=True)
class _Outgoing:
    """One batch's requests: what the queue holds, bounds and drops."""

    requests: list[Request]

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.requests)


class Delivery:
    """The queue of one run and the sender that empties it, with their accounting.

    ``run()`` is the sender; it sets ``idle`` once the queue is closed and
    delivered.  ``failure`` is the first request given up, for the error the
    exporter raises as it closes.
    """

    def __init__(self, transports: Mapping[Signal, Transport], stats: Stats, *,
                 queue_size: int, policy: OverflowPolicy, retry_for_s: float) -> None:
        self._transports = transports
        self._stats = stats
        self._retry_for = retry_for_s
        self.queue = BoundedQueue[_Outgoing](queue_size, policy,
                                             weight=lambda item: item.samples,
                                             on_drop=self._dropped)
        self.idle = anyio.Event()
        self.failure: tuple[Signal, str] | None = None
        self._failing: set[Signal] = set()
        self._last_error: tuple[Signal, str] | None = None
        self._queue_drops = 0
        self._in_flight_samples = 0

    async def put(self, *requests: Request) -> None:
        """Queue one batch's requests under the overflow policy."""
        item = _Outgoing(list(requests))
        try:
            await self.queue.put(item)
        except anyio.ClosedResourceError:  # closed while waiting for room: never sent
            self._stats.undelivered += item.samples

    def put_last(self, request: Request) -> None:
        """Queue ``request`` past the bound: closing must neither wait for room nor
        drop a batch of samples for it."""
        self.queue.append(_Outgoing([request]))

    def _dropped(self, samples: int) -> None:
        self._stats.undelivered += samples
        self._queue_drops += 1
        if self._queue_drops == 1:  # once: a slow receiver would otherwise flood the log
            log.warning("OTLP export queue full (%d batches); dropping batches until the "
                        "receiver catches up", self.queue.capacity)

    async def run(self) -> None:
        """Deliver the queue in order until it is closed and empty."""
        while True:
            try:
                item = await self.queue.get()
            except anyio.EndOfStream:
                self.idle.set()
                return
            self._in_flight_samples = item.samples
            # One retry budget per batch: once a down receiver has cost it, the batch's
            # other requests are not retried for as long again.
            give_up_at = time.monotonic() + self._retry_for
            for request in item.requests:
                delivered = await self._deliver(request.signal, request.message, give_up_at)
                self._in_flight_samples -= request.samples
                if not delivered:
                    self._stats.undelivered += request.samples

    def abandon(self, why: str) -> None:
        """Give up what is still queued or being sent (the sender was stopped)."""
        lost = sum(item.samples for item in self.queue.take_all()) + self._in_flight_samples
        signal, reason = self._last_error or (Signal.PROFILES, "no response")
        # Quiet: the exporter raises it as it closes, so logging it too would say it twice.
        self._give_up(signal, lost, f"{reason} ({why})", quiet=True)

    async def _deliver(self, signal: Signal, request: Message, give_up_at: float) -> bool:
        """Send with retries until ``give_up_at``; True once delivered, False once given up."""
        if not request.ListFields():
            return True  # nothing in it: a batch without samples, say
        transport = self._transports[signal]
        attempt = 0
        while True:
            try:
                response = await transport.send(request)
            except DeliveryError as exc:
                self._last_error = (signal, str(exc))
                delay = exc.retry_after if exc.retry_after is not None else backoff(attempt)
                if not exc.retryable or time.monotonic() + delay > give_up_at:
                    self._give_up(signal, 0, str(exc))
                    return False
                if signal not in self._failing:
                    self._failing.add(signal)
                    log.warning("OTLP export to %s failed (%s); retrying",
                                transport.endpoint.display, exc)
                attempt += 1
                await anyio.sleep(delay)
                continue
            if signal in self._failing:
                self._failing.discard(signal)
                log.info("OTLP export to %s recovered", transport.endpoint.display)
            count, message = _rejected(response)
            if count or message:
                self._stats.rejected += count
                log.warning("OTLP receiver %s rejected %d %s: %s", transport.endpoint.display,
                            count, signal.value, message or "no reason given")
            return True

    def _give_up(self, signal: Signal, samples: int, reason: str, *, quiet: bool = False) -> None:
        """Count ``samples`` as undelivered and the failure; the first one is raised at close."""
        self._stats.undelivered += samples
        self._stats.export_errors += 1
        if self.failure is None:
            self.failure = (signal, reason)
        if not quiet:
            log.error("OTLP export to %s failed: %s",
                      self._transports[signal].endpoint.display, reason)
