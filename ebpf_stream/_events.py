"""Events that cross the channels between stages, and their wire encoding.

Events travel msgpack-encoded, one message per ring-buffer drain, so a
channel's bound is a bound on bytes held, and the stages never share mutable
objects.  The structs are ``array_like`` (positional on the wire: smaller and
faster) and ``gc=False`` (they never hold cycles).
"""

from __future__ import annotations

import msgspec


class StackTrace(msgspec.Struct, tag="stack", array_like=True, gc=False, frozen=True):
    """The addresses behind a stack key, sent once per key.

    ``key`` is unique within a run: (stack-map generation epoch << 32) | id.
    ``addresses`` are leaf first, as the kernel records them.
    """

    key: int
    addresses: list[int]


class CpuSample(msgspec.Struct, tag="cpu", array_like=True, gc=False, frozen=True):
    """One CPU sample.

    ``user_stack`` and ``kernel_stack`` are stack keys (see ``StackTrace``),
    or a negative errno when the kernel stored no stack: ``-EFAULT`` for "no
    such stack" (a kernel thread has no user stack), ``-EEXIST``/``-ENOMEM``
    for a stack that could not be stored.
    """

    timestamp_ns: int
    pid: int
    tid: int
    cpu: int
    comm: str
    user_stack: int
    kernel_stack: int


Event = StackTrace | CpuSample


class EventMessage(msgspec.Struct, gc=False, frozen=True):
    """One encoded message and how many samples it carries (for loss accounting)."""

    samples: int
    payload: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Event])


def encode_events(events: list[Event], samples: int) -> EventMessage:
    return EventMessage(samples, _encoder.encode(events))


def decode_events(message: EventMessage) -> list[Event]:
    return _decoder.decode(message.payload)
