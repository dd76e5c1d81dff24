"""Publishing requests in the app, and reading them as a profiler does, without BPF.

The lookup the kernel runs is mirrored in ``layout.find``; these tests run
it on real contexts of this interpreter, and read the region back through
``/proc/self``, as a profiler reads any process's.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider

from ebpf_stream._context import layout, publisher, region
from ebpf_stream._context.reader import Names, find_published
from ebpf_stream._symbols.requests import Requests

tracer = TracerProvider().get_tracer("tests")


@pytest.fixture(scope="module")
def publication() -> Iterator[publisher.Publication]:
    published = publisher.publish()
    assert published is not None
    yield published


def current_value(found: layout.Layout) -> bytes:
    """The request the kernel would read now, through the running context."""
    header = find_published(os.getpid())
    assert header is not None
    address = layout.find(found, contextvars.copy_context(), publisher.REQUEST,
                          header.header.var_hash)
    if not address:
        return b""
    return ctypes.string_at(address + layout.BYTES_DATA, region.VALUE_SIZE)


def named(raw: bytes) -> tuple[str, str, str, str]:
    context = Requests().context(os.getpid(), raw)
    assert context is not None
    return context.trace_id, context.span_id, context.route, context.method


def test_the_region_is_found_in_the_maps_and_says_where_to_look(
        publication: publisher.Publication) -> None:
    published = find_published(os.getpid())
    assert published is not None
    h = published.header
    assert h.var == id(publisher.REQUEST)
    assert h.var_hash == layout.hamt_hash(publisher.REQUEST)
    assert h.bytes_type == id(bytes)
    assert layout.proven(publisher.REQUEST) == (h.thread_context, h.bitmap_type, h.array_type,
                                                h.bytes_type)


def test_a_span_made_current_is_published_with_its_local_roots_route(
        publication: publisher.Publication) -> None:
    found = layout.discover()
    assert current_value(found) in (b"", publisher.NONE)
    attributes = {"http.route": "/items/{item_id}", "http.request.method": "GET"}
    with tracer.start_as_current_span("GET /items/{item_id}", attributes=attributes) as root:
        ids = root.get_span_context()
        assert named(current_value(found)) == (
            f"{ids.trace_id:032x}", f"{ids.span_id:016x}", "/items/{item_id}", "GET")
        with tracer.start_as_current_span("db query") as child:
            # A child has no route of its own: its root's.
            assert named(current_value(found)) == (
                f"{ids.trace_id:032x}", f"{child.get_span_context().span_id:016x}",
                "/items/{item_id}", "GET")
        assert named(current_value(found))[1] == f"{ids.span_id:016x}"
    assert current_value(found) in (b"", publisher.NONE)


def test_the_old_semantic_conventions_name_the_method_too(
        publication: publisher.Publication) -> None:
    with tracer.start_as_current_span("x", attributes={"http.route": "/r", "http.method": "PUT"}):
        assert named(publisher.REQUEST.get())[2:] == ("/r", "PUT")


def test_a_new_trace_does_not_inherit_another_traces_route(
        publication: publisher.Publication) -> None:
    with tracer.start_as_current_span("outer", attributes={"http.route": "/outer"}), \
            tracer.start_as_current_span("new root", context=otel_context.Context()):
        assert named(publisher.REQUEST.get())[2] == ""


def test_each_task_publishes_its_own_request_and_children_inherit_it(
        publication: publisher.Publication) -> None:
    """Tasks interleave on one thread; each reads as its own request, and tasks a
    request starts read as that request."""
    found = layout.discover()
    seen: dict[str, set[str]] = {}

    async def child(route: str) -> None:
        await asyncio.sleep(0)
        seen.setdefault(route, set()).add(named(current_value(found))[2])

    async def request(route: str) -> None:
        with tracer.start_as_current_span(route, attributes={"http.route": route}):
            for _ in range(3):
                seen.setdefault(route, set()).add(named(current_value(found))[2])
                await asyncio.sleep(0)
            await asyncio.gather(child(route), asyncio.to_thread(
                lambda: seen.setdefault(route, set()).add(named(publisher.REQUEST.get())[2])))

    async def main() -> None:
        await asyncio.gather(*(request(f"/r{i}") for i in range(5)))

    asyncio.run(main())
    assert seen == {f"/r{i}": {f"/r{i}"} for i in range(5)}


def test_the_middleware_names_a_route_without_any_span(
        publication: publisher.Publication) -> None:
    with publisher.request_scope("/health", "GET"):
        assert named(publisher.REQUEST.get()) == ("", "", "/health", "GET")
        with tracer.start_as_current_span("inner"):  # a span under it keeps the route
            assert named(publisher.REQUEST.get())[2:] == ("/health", "GET")
    assert publisher.REQUEST.get(None) is None


def test_a_token_attached_before_the_wrapping_is_still_detached(
        publication: publisher.Publication) -> None:
    runtime = otel_context._RUNTIME_CONTEXT  # type: ignore[attr-defined]
    inner = runtime._inner
    token = inner.attach(otel_context.Context({"k": 1}))
    runtime.detach(token)  # a plain token: handed to the wrapped context
    assert otel_context.get_value("k") is None


def test_names_are_written_once_and_read_back(publication: publisher.Publication) -> None:
    published = find_published(os.getpid())
    assert published is not None
    names = Names(os.getpid(), published.address)
    at = publication.name("/orders/{order_id}")
    assert at == publication.name("/orders/{order_id}")
    assert names(at) == "/orders/{order_id}"
    assert names(0) == ""
    assert names(region.SIZE + 5) == ""
    long = publication.name("/" + "x" * 1000)
    assert names(long) == "/" + "x" * (region.MAX_NAME - 1)


def test_a_forked_child_writes_its_names_into_its_own_copy(
        publication: publisher.Publication) -> None:
    to_parent, from_child = os.pipe()
    to_child, from_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a name the parent never sees
        try:
            at = publication.name("/only-in-the-child")
            os.write(from_child, at.to_bytes(4, "little"))
            os.read(to_child, 1)
        finally:
            os._exit(0)
    try:
        at = int.from_bytes(os.read(to_parent, 4), "little")
        child = find_published(pid)
        assert child is not None
        assert Names(pid, child.address)(at) == "/only-in-the-child"
        mine = find_published(os.getpid())
        assert mine is not None
        assert Names(os.getpid(), mine.address)(at) != "/only-in-the-child"
    finally:
        os.write(from_parent, b"x")
        os.waitpid(pid, 0)
        for fd in (to_parent, from_child, to_child, from_parent):
            os.close(fd)


def test_a_process_that_publishes_nothing_has_no_region() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        assert find_published(child.pid) is None
    finally:
        child.communicate(b"")


def test_publishing_leaves_an_app_without_opentelemetry_without_it() -> None:
    code = textwrap.dedent("""
        import sys
        from ebpf_stream._context import publisher
        assert publisher.publish() is not None
        assert "opentelemetry.context" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
