"""The SVG flame graph."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from sample_frames import native
from sample_profiles import (
    SVG,
    empty_profile,
    frames_of,
    python_profile,
    request_profile,
    sample_profile,
)

from ebpf_stream._outputs.flamegraph import WIDTH, render_flamegraph_svg


def width(g: ET.Element) -> float:
    rect = g.find(f"{SVG}rect")
    assert rect is not None
    return float(rect.attrib["width"])


def test_svg_is_valid_xml_with_escaped_names_and_proportional_widths() -> None:
    svg = render_flamegraph_svg(sample_profile(), title="<cpu> & more")
    frames = frames_of(svg)
    assert {"all", "app", "db", "main", "work", "vfs_read_[k]",
            "tmpl<int>::run&:go now"} <= set(frames)
    assert "&lt;int&gt;::run&amp;:go now" in svg
    assert "&lt;cpu&gt; &amp; more" in svg

    total = width(frames["all"])
    assert width(frames["app"]) == pytest.approx(total * 9 / 12, abs=0.01)
    assert width(frames["db"]) == pytest.approx(total * 3 / 12, abs=0.01)
    tip = frames["app"].findtext(f"{SVG}title")
    assert tip == "app (9 samples, 75.00%)"

    # Root at the bottom: callees are drawn above their callers.
    def y(g: ET.Element) -> float:
        rect = g.find(f"{SVG}rect")
        assert rect is not None
        return float(rect.attrib["y"])

    assert y(frames["all"]) > y(frames["app"]) > y(frames["work"]) > y(frames["vfs_read_[k]"])
    # Kernel frames get their own hue.
    kernel_fill = frames["vfs_read_[k]"].find(f"{SVG}rect")
    user_fill = frames["work"].find(f"{SVG}rect")
    assert kernel_fill is not None and user_fill is not None
    assert kernel_fill.attrib["fill"] != user_fill.attrib["fill"]


def test_svg_omits_tiny_frames_and_truncates_long_names() -> None:
    p = empty_profile()
    long_name = "x" * 400
    p.add(1, "app", (native("hot"),), count=100_000)
    p.add(1, "app", (native("rare"),), count=1)
    p.add(1, "app", (native("hot"), native(long_name)), count=20_000)
    frames = frames_of(render_flamegraph_svg(p))
    assert "rare" not in frames
    text = frames[long_name].findtext(f"{SVG}text")
    assert text is not None and text.endswith("..") and len(text) < len(long_name)
    assert frames["hot"].findtext(f"{SVG}text") == "hot"
    assert width(frames["all"]) <= WIDTH


def test_svg_without_samples_says_so() -> None:
    svg = render_flamegraph_svg(empty_profile())
    root = ET.fromstring(svg)
    assert "No samples" in "".join(root.itertext())
    assert frames_of(svg) == {}


def test_svg_python_frames_are_labelled_like_folded() -> None:
    frames = frames_of(render_flamegraph_svg(python_profile()))
    assert {"BaseEventLoop._run_once (asyncio/base_events.py:1922)",
            "Handle._run (asyncio/events.py:80)", "handler (app.py:3)",
            "handler (app.py:4)"} <= set(frames)
    assert frames["handler (app.py:3)"].findtext(f"{SVG}title") == (
        "handler (app.py:3) (3 samples, 75.00%)")


def test_svg_by_route_stands_each_processs_stacks_on_their_endpoints() -> None:
    frames = frames_of(render_flamegraph_svg(request_profile(), by_route=True))
    assert frames["GET /items/{id}"].findtext(f"{SVG}title") == (
        "GET /items/{id} (5 samples, 41.67%)")
    assert frames["[no route]"].findtext(f"{SVG}title") == "[no route] (1 samples, 8.33%)"
    assert {"/health", "POST /checkout"} <= set(frames)

    def y(name: str) -> float:
        rect = frames[name].find(f"{SVG}rect")
        assert rect is not None
        return float(rect.attrib["y"])

    assert y("app") > y("GET /items/{id}") == y("[no route]") > y("work")
    assert "GET /items/{id}" not in frames_of(render_flamegraph_svg(request_profile()))
