"""The folded-stacks format."""

from __future__ import annotations

from sample_frames import native
from sample_profiles import empty_profile, python_profile, request_profile, sample_profile

from ebpf_stream._outputs.folded import render_folded

PYTHON_ROOT = ("python3;main;_PyEval_EvalFrameDefault;"
               "BaseEventLoop._run_once (asyncio/base_events.py:1922);"
               "Handle._run (asyncio/events.py:80)")


def test_folded_lines_are_root_first_merged_across_pids_and_sorted() -> None:
    assert render_folded(sample_profile()).splitlines() == [
        "app;main;work 4",
        "app;main;work;vfs_read_[k];ext4_file_read_iter_[k] 5",
        "db;main;operator new(unsigned long) 2",
        "db;main;tmpl<int>::run&:go now 1",
    ]


def test_folded_count_follows_the_last_space() -> None:
    for line in render_folded(sample_profile()).splitlines():
        stack, count = line.rsplit(" ", 1)
        assert int(count) > 0
        assert "\n" not in stack


def test_folded_empty_profile_is_an_empty_file() -> None:
    assert render_folded(empty_profile()) == ""


def test_folded_never_writes_an_empty_or_unencodable_name() -> None:
    p = empty_profile()
    p.add(1, "", (native("bad\udcff"),), count=1)
    line = render_folded(p)
    assert line == "[unknown];bad? 1\n"
    line.encode("utf-8")


def test_folded_python_frames_read_qualname_file_and_line() -> None:
    assert render_folded(python_profile()).splitlines() == [
        f"{PYTHON_ROOT};handler (app.py:3) 3",
        f"{PYTHON_ROOT};handler (app.py:4) 1",
    ]


def test_folded_by_route_roots_each_stack_at_its_endpoint() -> None:
    assert render_folded(request_profile(), by_route=True).splitlines() == [
        "app;/health;main 2",  # a route without a method
        "app;GET /items/{id};main;work 5",  # two requests to one endpoint
        "app;POST /checkout;main;work;vfs_read_[k] 4",
        "app;[no route];main;work 1",
    ]
    # Without the option, requests are summed as before.
    assert render_folded(request_profile()).splitlines() == [
        "app;main 2", "app;main;work 6", "app;main;work;vfs_read_[k] 4"]
