"""The network family: one record per TCP connection, and per-process TCP totals.

The kernel program (``kernel/network.bpf.c``) follows TCP sockets over IPv4
and IPv6 through their state changes and the bytes each process sends and
receives through them.  A connection is reported once, when its socket is
destroyed (so the byte counts are final), or when a connect fails:

- ``role`` is ``"client"`` for a connect() and ``"server"`` for an accepted
  connection; ``start_ns`` is when connect() was called, or when the
  accepted handshake completed.
- An accepted connection's ``pid`` and ``comm`` are those of the first
  process that sent, received or closed it (the handshake completes in
  softirq context, on behalf of no process).  One that ended before any
  process touched it has pid 0; it is counted (``COUNTER_OWNER_UNKNOWN``)
  and, when recording only some processes, not reported.
- Byte counts are what went through send/recv-family calls (including
  sendfile and io_uring sends, which use the same path); zero-copy receive
  and splice from a socket are not seen.
- An IPv6 socket talking to an IPv4 peer uses v4-mapped addresses
  (``::ffff:a.b.c.d``).  They are reported as IPv4 (``family`` 4, dotted
  addresses), because the connection runs over IPv4 on the wire.

Per-process totals count every TCP byte a process moves (long-lived
connections included), connect attempts (failed ones too), accepts,
failed connects, retransmits, and resets sent and received on its
connections; a refused connect counts as a failed connect and a reset
received.  Connections opened before tracing began add bytes to the totals
but are not reported as records.
"""

from __future__ import annotations

import ipaddress
from typing import ClassVar

import numpy as np

from .._model.events import Event, NetworkTotals, TcpConnection
from .records import PID
from .tracing import TracingProbe

COUNTER_CONNECTIONS_FULL = 1
COUNTER_PROCESSES_FULL = 2
COUNTER_OWNER_UNKNOWN = 3

_AF_INET = 2
_ROLES = ("client", "server")
_OUTCOMES = ("closed", "reset", "failed")
_V4_MAPPED = bytes(10) + b"\xff\xff"

RECORD = np.dtype([
    ("start_ns", "<u8"), ("end_ns", "<u8"), ("bytes_sent", "<u8"), ("bytes_received", "<u8"),
    ("pid", "<u4"), ("retransmits", "<u4"), ("role", "u1"), ("outcome", "u1"),
    ("family", "<u2"), ("local_port", "<u2"), ("peer_port", "<u2"),
    ("local_address", "u1", 16), ("peer_address", "u1", 16),
    ("comm", "S16"),
])
TOTALS_FIELDS = ("bytes_sent", "bytes_received", "connects", "accepts", "failed_connects",
                 "retransmits", "resets_sent", "resets_received")
TOTALS = np.dtype([*((name, "<u8") for name in TOTALS_FIELDS), ("comm", "S16")])


def endpoints(family: int, local: bytes, peer: bytes) -> tuple[int, str, str]:
    """The IP version and both addresses, with v4-mapped IPv6 shown as IPv4."""
    if family == _AF_INET:
        return 4, str(ipaddress.IPv4Address(local[:4])), str(ipaddress.IPv4Address(peer[:4]))
    if peer.startswith(_V4_MAPPED):
        # The local side is mapped too, or unspecified (::) if the connect failed early.
        return 4, str(ipaddress.IPv4Address(local[12:])), str(ipaddress.IPv4Address(peer[12:]))
    return 6, str(ipaddress.IPv6Address(local)), str(ipaddress.IPv6Address(peer))


class NetworkProbe(TracingProbe):
    """TCP connection records and per-process TCP totals."""

    source = "network.bpf.c"
    record = RECORD
    maps = ("totals",)
    max_connections = 16384  # open connections tracked at once
    max_processes = 8192
    losses: ClassVar[dict[int, str]] = {
        COUNTER_CONNECTIONS_FULL: f"the table of {max_connections} open connections is full; "
                                  "connections beyond it get no record",
        COUNTER_PROCESSES_FULL: f"the table of {max_processes} processes is full; "
                                "their TCP totals were not counted",
    }

    def cflags(self) -> list[str]:
        return [f"-DMAX_CONNECTIONS={self.max_connections}",
                f"-DMAX_PROCESSES={self.max_processes}"]

    def decode(self, records: np.ndarray) -> list[Event]:
        events: list[Event] = []
        offset = self.wall_offset_ns
        for r in records:
            family, local, peer = endpoints(int(r["family"]), r["local_address"].tobytes(),
                                            r["peer_address"].tobytes())
            events.append(TcpConnection(
                start_ns=int(r["start_ns"]) + offset, end_ns=int(r["end_ns"]) + offset,
                pid=int(r["pid"]), comm=self.comm(r["comm"]),
                role=_ROLES[r["role"]], outcome=_OUTCOMES[r["outcome"]], family=family,
                local_address=local, local_port=int(r["local_port"]),
                peer_address=peer, peer_port=int(r["peer_port"]),
                bytes_sent=int(r["bytes_sent"]), bytes_received=int(r["bytes_received"]),
                retransmits=int(r["retransmits"])))
        return events

    def read_totals(self) -> list[Event]:
        keys, totals = self.read_table("totals", PID, TOTALS)
        comms = [self.comm(c) for c in totals["comm"].tolist()]
        return [NetworkTotals(pid, comm, *counts) for pid, comm, *counts in zip(
                    keys["pid"].tolist(), comms, *(totals[f].tolist() for f in TOTALS_FIELDS),
                    strict=True)]
