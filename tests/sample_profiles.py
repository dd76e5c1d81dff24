"""What the output tests share: sample profiles and batches, and readers of the SVG
and pprof they render."""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET

from sample_frames import (
    DB_MAIN,
    EVAL,
    EXT4,
    HANDLE_RUN,
    HANDLER,
    HANDLER_LATER,
    MAIN,
    PERIOD,
    READ,
    RUN_ONCE,
    START,
    WORK,
    native,
)

from ebpf_stream._convert.pprof_pb2 import Profile as PprofProfile
from ebpf_stream._model.profile import ProcessInfo, Profile, RequestContext
from ebpf_stream.exporters import Batch

SVG = "{http://www.w3.org/2000/svg}"
ODD = native("tmpl<int>::run&;go\nnow", module="/usr/lib/libodd.so", address=0x3000)


def sample_profile() -> Profile:
    """Two pids of "app" sharing a stack, one with a kernel tail, and "db" with an odd name."""
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=START + 2_000_000_000)
    p.add(10, "app", (MAIN, WORK, READ, EXT4), count=3, timestamps_ns=[START + 1] * 3)
    p.add(11, "app", (MAIN, WORK, READ, EXT4), count=2)
    p.add(10, "app", (MAIN, WORK), count=4)
    p.add(20, "db", (DB_MAIN, ODD), count=1)
    p.add(20, "db", (DB_MAIN, native("operator new(unsigned long)", address=0x4000)), count=2)
    return p


def empty_profile() -> Profile:
    return Profile(period_ns=PERIOD, start_ns=START, end_ns=START)


def python_profile() -> Profile:
    """An asyncio service's merged stacks, in two lines of one handler."""
    p = empty_profile()
    p.add(40, "python3", (MAIN, EVAL, RUN_ONCE, HANDLE_RUN, HANDLER), count=3)
    p.add(40, "python3", (MAIN, EVAL, RUN_ONCE, HANDLE_RUN, HANDLER_LATER), count=1)
    return p


# Two requests to one endpoint, one to another that was routed without tracing,
# and a route without a method.
ITEM = RequestContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "/items/{id}",
                      "GET")
ITEM_AGAIN = RequestContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7",
                            "/items/{id}", "GET")
CHECKOUT = RequestContext(route="/checkout", method="POST")
HEALTH = RequestContext("0af7651916cd43dd8448eb211c80319c", "c0ffee0000000001", "/health")


def request_profile() -> Profile:
    """A web app whose stacks ran for requests, some for several, and outside any."""
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=START + 1_000_000_000,
                processes={10: ProcessInfo(10, "app", "app", "app --serve")})
    for frames, count, context in (
        ((MAIN, WORK), 3, ITEM),
        ((MAIN, WORK), 2, ITEM_AGAIN),
        ((MAIN, WORK, READ), 4, CHECKOUT),
        ((MAIN, WORK), 1, None),
        ((MAIN,), 2, HEALTH),
    ):
        p.add(10, "app", frames, count, [START + 1] * count, context)
    return p


def batch(count: int) -> Batch:
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=START + 1)
    p.add(10, "app", (MAIN, WORK, READ), count=count, timestamps_ns=[START] * count)
    return Batch(p)


def decode_pprof(data: bytes) -> PprofProfile:
    out = PprofProfile()
    out.ParseFromString(gzip.decompress(data))
    return out


def frames_of(svg: str) -> dict[str, ET.Element]:
    """Each drawn frame's <g>, by the name in its tooltip."""
    root = ET.fromstring(svg)
    out = {}
    for g in root.iter(f"{SVG}g"):
        tip = g.findtext(f"{SVG}title")
        assert tip is not None
        out[tip[: tip.rindex(" (")]] = g
    return out
